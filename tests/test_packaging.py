"""Installing losslab: one console command, no generic top-level modules in site-packages, and scripts that run
the code of the checkout they sit in."""

from __future__ import annotations

import ast
import importlib.metadata
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


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The distribution, built once from a copy of the source (building in place would write build/ here)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    skip = (".git", ".venv*", "runs", "corpus", "eval_data", ".whl*", "__pycache__", "*.egg-info", ".*_cache", "build")
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(*skip))
    built = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                 str(tmp / "dist"), str(src)], tmp)  # fmt: skip
    assert built.returncode == 0, built.stderr[-3000:]
    (path,) = (tmp / "dist").glob("losslab-*.whl")
    return path


def test_a_wheel_holds_only_the_losslab_package_and_says_it_needs_a_checkout(wheel, tmp_path, elsewhere):
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


def closure(*names: str) -> list[importlib.metadata.Distribution]:
    """The installed distributions ``names`` need (their requirements, recursively; extras left out)."""
    from packaging.requirements import Requirement

    seen: dict[str, importlib.metadata.Distribution] = {}
    todo = list(names)
    while todo:
        name = todo.pop().lower().replace("_", "-")
        if name in seen:
            continue
        dist = importlib.metadata.distribution(name)
        seen[name] = dist
        for spec in dist.requires or []:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return list(seen.values())


def site_of(dists: list[importlib.metadata.Distribution], folder: Path) -> Path:
    """A folder of links to these distributions' files in this venv (modules and metadata): what a .pth line
    makes importable in another environment — those packages and nothing else."""
    folder.mkdir()
    for dist in dists:
        for file in dist.files or []:
            top = file.parts[0]
            if top.endswith((".pth", "__pycache__")) or top == ".." or (folder / top).exists():
                continue
            source = Path(dist.locate_file(top))
            if source.exists():
                (folder / top).symlink_to(source)
    return folder


FRESH_LOSSES = """
import importlib.util, sys
import torch
import losslab, losslab.hf
from losslab.losses import build_loss

assert losslab.__file__.startswith(sys.prefix), losslab.__file__  # the installed copy, no checkout
g = torch.Generator().manual_seed(0)
h = torch.randn(64, 16, generator=g, dtype=torch.float64).requires_grad_()
w = torch.randn(50, 16, generator=g, dtype=torch.float64).requires_grad_()
y = torch.randint(0, 50, (64,), generator=g)
y[:9] = -100
out = build_loss("mile", gamma=1.0, fused="true", chunk_size=16)(h, w, y)
gh, gw = torch.autograd.grad(out.loss, (h, w))
logp = (h @ w.T).log_softmax(-1)  # MiLe from its formula: sum (1 + H) CE / sum (1 + H), weights detached
valid = y != -100
ce = -logp[torch.arange(64), y.clamp(min=0)][valid]
weight = 1 - (logp.detach().exp() * logp.detach()).sum(-1)[valid]
ref = (weight * ce).sum() / weight.sum()
rh, rw = torch.autograd.grad(ref, (h, w))
assert abs(out.loss.item() - ref.item()) < 1e-12 and (gh - rh).abs().max() < 1e-12 and (gw - rw).abs().max() < 1e-12
present = [m for m in ("deepspeed", "omegaconf", "wandb", "lm_eval", "transformers", "data", "trainer", "models",
                       "evals", "scripts") if m in sys.modules or importlib.util.find_spec(m) is not None]
assert not present, present
print("losses ok")
"""

FRESH_HF = """
import sys, tempfile
import torch, transformers
from losslab import hf

folder = tempfile.mkdtemp()
config = transformers.LlamaConfig(vocab_size=80, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, intermediate_size=48, tie_word_embeddings=True)
torch.manual_seed(0)
transformers.LlamaForCausalLM(config).save_pretrained(folder)
model = hf.from_pretrained(folder, loss="mile", gamma=1.0, dtype=torch.float64).train()
ids = torch.randint(0, 80, (2, 12))
fused = model(input_ids=ids, labels=ids)
assert fused.logits is None
fused.loss.backward()
g = model.model.embed_tokens.weight.grad.clone()
model.zero_grad()
full = model(input_ids=ids, labels=ids, return_logits=True)  # the same loss from materialised logits
full.loss.backward()
assert abs(fused.loss.item() - full.loss.item()) < 1e-12, (fused.loss.item(), full.loss.item())
assert (g - model.model.embed_tokens.weight.grad).abs().max() < 1e-12
print("hf ok", transformers.__version__)
"""


def test_a_wheel_in_a_fresh_virtualenv_runs_the_losses_with_torch_alone(wheel, tmp_path, elsewhere):
    """Acceptance of #28: the built wheel installed (not editable) in a fresh virtualenv with no checkout beside
    it. torch (and what it requires) is reached through a .pth line to this venv's copies, nothing else: no
    DeepSpeed, OmegaConf, W&B, lm-eval or transformers. Then transformers is added the same way and a patched tiny
    Llama trains from the installed copy."""
    venv = tmp_path / "fresh"
    made = run([sys.executable, "-m", "venv", "--without-pip", str(venv)], elsewhere)
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"
    installed = run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index",
                     str(wheel)], elsewhere)  # fmt: skip
    assert installed.returncode == 0, installed.stderr[-3000:]
    (purelib,) = (venv / "lib").glob("python3*/site-packages")
    torch_site = site_of(closure("torch"), tmp_path / "torch_site")
    (purelib / "torch_only.pth").write_text(f"{torch_site}\n")
    env = {"PYTHONSAFEPATH": "1", "PYTHONPATH": "", "PYTHONNOUSERSITE": "1"}
    losses = run([str(python), "-c", FRESH_LOSSES], elsewhere, **env)
    assert losses.returncode == 0 and "losses ok" in losses.stdout, losses.stderr[-3000:]
    command = run([str(venv / "bin" / "losslab"), "train", "--help"], elsewhere, **env)
    assert command.returncode == 2 and "pip install -e" in command.stderr and "Traceback" not in command.stderr
    hf_site = site_of([d for d in closure("transformers") if d.metadata["Name"].lower() != "torch"], tmp_path / "hf")
    (purelib / "transformers.pth").write_text(f"{hf_site}\n")
    patched = run([str(python), "-c", FRESH_HF], elsewhere, **env)
    assert patched.returncode == 0 and "hf ok" in patched.stdout, patched.stderr[-3000:]


def test_the_cpu_adam_wheel_is_keyed_by_what_the_compiled_op_depends_on():
    from scripts.prebuild_cpu_adam import cpu_flags, wheel_key

    info = "processor\t: 0\nflags\t\t: sse avx2 fpu\n\nprocessor\t: 1\nflags\t\t: sse avx2 fpu avx512f\n"
    assert cpu_flags(info) == "avx2 fpu sse"  # the first CPU's, in a fixed order
    assert cpu_flags("Features\t: fp asimd crc32\n") == "asimd crc32 fp" and cpu_flags("") == ""
    base = ("0.19.8", "2.13.0+cpu", "cp311", "avx2 fpu sse")
    assert wheel_key(*base).startswith("deepspeed-0.19.8-torch-2.13.0_cpu-cp311-")
    others = ("0.19.9", "2.12.0", "cp312", "avx2")
    keys = {wheel_key(*base[:i], other, *base[i + 1 :]) for i, other in enumerate(others)}
    assert wheel_key(*base) not in keys and len(keys) == 4  # each part changes the key


@pytest.mark.skipif(
    shutil.which("nvidia-smi") is not None or not Path("/proc/cpuinfo").is_file(),
    reason="scripts/setup.sh compiles CPU Adam ahead of time on Linux machines without a GPU",
)
def test_setup_leaves_deepspeeds_cpu_adam_compiled_so_that_no_run_compiles_it(tmp_path):
    """What scripts/setup.sh ran, run again: nothing to do (or, in an environment set up before it, the build,
    once). Then DeepSpeed loads the op without compiling anything: torch's JIT build folder is never created."""
    proc = subprocess.run([sys.executable, "scripts/prebuild_cpu_adam.py"], cwd=REPO, capture_output=True, text=True,
                          timeout=900)  # fmt: skip
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    load = "from deepspeed.ops.op_builder import CPUAdamBuilder; CPUAdamBuilder().load(verbose=False)"
    ext = tmp_path / "torch_extensions"
    proc = run([sys.executable, "-c", load], REPO, TORCH_EXTENSIONS_DIR=str(ext))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not ext.exists(), sorted(ext.rglob("*"))


def test_setup_on_a_disk_too_small_for_the_environment_says_so_before_installing(tmp_path):
    """A checkout on a disk with no room for the environment (a CI machine once had 287 MB free, and pip died
    half-way with "No space left on device"): one line saying how much is free and needed, exit 2, no .venv begun.
    The small disk is a real 64 MiB tmpfs, mounted in a mount namespace of the test's own."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare (util-linux) for a private mount namespace")
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"no private mount namespace here: {probe.stderr.decode().strip()}")
    small = tmp_path / "small"
    small.mkdir()
    shell = (
        f"mount -t tmpfs -o size=64m tmpfs {small} && mkdir -p {small}/repo/scripts && "
        f"cp {REPO}/scripts/setup.sh {small}/repo/scripts/ && cp {REPO}/pyproject.toml {small}/repo/ && "
        f"bash {small}/repo/scripts/setup.sh; echo rc=$?; ls -A {small}/repo"
    )
    proc = subprocess.run(["unshare", "-m", "sh", "-c", shell], env=clean_env(), capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert "rc=2" in proc.stdout, proc.stdout + proc.stderr
    assert proc.stderr.count("\n") == 1 and "MiB free on the disk of" in proc.stderr and "needs about" in proc.stderr
    assert ".venv" not in proc.stdout.split("rc=2")[1]  # nothing installed
