"""Installing losslab: one console command, no generic top-level modules in site-packages, and scripts that run
the code of the checkout they sit in."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.test_train import REPO, clean_env

GENERIC = ("data", "models", "trainer", "evals", "scripts")
LOSSLAB = Path(sys.executable).parent / "losslab"


def run(cmd: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env={**clean_env(), **env}, capture_output=True, text=True, timeout=300)


@pytest.fixture
def elsewhere(tmp_path) -> Path:
    """A working directory outside the checkout."""
    d = tmp_path / "elsewhere"
    d.mkdir()
    return d


def test_the_losslab_command_fronts_the_scripts(elsewhere):
    assert LOSSLAB.is_file(), "the venv has no losslab command: run scripts/setup.sh"
    top = run([str(LOSSLAB), "--help"], elsewhere)
    assert top.returncode == 0, top.stderr
    for command in ("train", "eval", "export", "import", "prepare", "compare"):
        assert f"\n  {command} " in top.stdout
    train = run([str(LOSSLAB), "train", "--help"], elsewhere)
    assert train.returncode == 0 and train.stdout.startswith("usage: losslab train "), train.stderr[-2000:]
    compare = run([str(LOSSLAB), "compare", str(elsewhere), "--out", str(elsewhere / "out")], elsewhere)
    assert compare.returncode == 2 and "not run directories" in compare.stderr  # the script's own exit code
    wrong = run([str(LOSSLAB), "trian"], elsewhere)
    assert wrong.returncode == 2 and "unknown command 'trian'" in wrong.stderr


def test_no_generic_module_names_are_installed(elsewhere):
    for name in GENERIC:
        proc = run([sys.executable, "-c", f"import {name}"], elsewhere)
        assert proc.returncode != 0 and f"No module named '{name}'" in proc.stderr, name
    where = run([sys.executable, "-c", "import losslab; print(losslab.__file__)"], elsewhere)
    assert where.returncode == 0 and Path(where.stdout.strip()).parent == REPO / "losslab"


def test_scripts_run_their_own_checkout_before_any_other_copy(elsewhere):
    decoy = elsewhere / "decoy"
    for name in GENERIC[:-1]:  # another checkout's (or a user's) modules of the same names, first on the path
        (decoy / name).mkdir(parents=True)
        (decoy / name / "__init__.py").write_text(f"raise ImportError('the decoy {name} was imported')\n")
    for cmd in (
        [sys.executable, str(REPO / "scripts" / "export_hf.py"), "--help"],
        [sys.executable, str(REPO / "scripts" / "gpu" / "check_losses.py"), "--help"],  # one folder down
        [str(LOSSLAB), "eval", "--help"],
    ):
        proc = run(cmd, elsewhere, PYTHONPATH=str(decoy))
        assert proc.returncode == 0 and "decoy" not in proc.stderr, proc.stderr[-2000:]


CHECKOUT = ("data", "models", "evals", "trainer", "losslab", "tests", "scripts")


def test_every_script_puts_its_checkout_first_before_importing_from_it():
    """One mechanism: ``import _bootstrap`` (scripts/_bootstrap.py) comes before the first import of the checkout's
    code in every script that uses it, and no script edits sys.path itself."""
    checked = 0
    for path in sorted((REPO / "scripts").rglob("*.py")):
        if path.name in ("__init__.py", "_bootstrap.py"):
            continue
        source = path.read_text()
        assert "sys.path.insert" not in source, path
        tree = ast.parse(source)
        every = [_module(n) for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
        if not any(m.split(".")[0] in CHECKOUT for m in every):
            continue
        top = [_module(n) for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        first = min(i for i, m in enumerate([*top, "data"]) if m.split(".")[0] in CHECKOUT)
        assert "_bootstrap" in top[:first], f"{path.relative_to(REPO)}: import _bootstrap before {top[first:][:1]}"
        checked += 1
    assert checked >= 25


def _module(node: ast.Import | ast.ImportFrom) -> str:
    return node.names[0].name if isinstance(node, ast.Import) else node.module or ""


def test_a_wheel_holds_only_the_losslab_package_and_says_it_needs_a_checkout(tmp_path, elsewhere):
    """The distribution's contents, from a copy of the source (building in place would write build/ here)."""
    src = tmp_path / "src"
    skip = (".git", ".venv*", "runs", "corpus", "eval_data", ".whl*", "__pycache__", "*.egg-info", ".*_cache", "build")
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(*skip))
    built = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                 str(tmp_path / "dist"), str(src)], elsewhere)  # fmt: skip
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("losslab-*.whl")
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"losslab"}, tops
    entry_points = next(n for n in zipfile.ZipFile(wheel).namelist() if n.endswith("entry_points.txt"))
    assert "losslab = losslab.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
    # installed from the wheel (not editable), the command has no checkout to run and says so
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    proc = run([sys.executable, "-c", "import sys; from losslab.cli import main; sys.exit(main(['train', '--help']))"],
               elsewhere, PYTHONPATH=str(site), PYTHONSAFEPATH="1")  # fmt: skip
    assert proc.returncode == 2 and "pip install -e" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert os.sep + "site" in proc.stderr  # names where it looked
