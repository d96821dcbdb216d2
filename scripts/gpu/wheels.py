"""Collect the wheels the GPU machine lacks into ``.whl/`` (carried to it by the device tool).

The GPU image has torch, triton and transformers but not deepspeed, lm-eval, omegaconf, ...; it cannot reach
PyPI. This downloads each named package for CPython 3.12 / manylinux x86-64 (the version installed in this
checkout's ``.venv`` where there is one, so both machines run the same code), builds deepspeed's wheel from
its source distribution, and follows ``Requires-Dist`` until every requirement is either on the image
(``device_packages.txt``) or among the wheels. Prints the sizes (the device tool carries 64 MiB a call, so
calls that do not evaluate leave the lm-eval set behind).

    .venv/bin/python scripts/gpu/wheels.py            # training + benchmarks -> .whl/
    .venv/bin/python scripts/gpu/wheels.py --eval     # ... and lm-eval with what it needs -> .whl-eval/
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import subprocess
import sys
import zipfile
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

HERE = Path(__file__).resolve().parent
TRAIN = ["deepspeed", "omegaconf", "zstandard", "liger-kernel", "pytest-reportlog"]
EVAL = ["lm-eval"]
# Built here from the sdist (no binary wheel on PyPI); its ops are JIT-compiled on the GPU machine.
SDIST_ONLY = {"deepspeed", "sqlitedict", "word2number", "rouge-score"}
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]
TARGET_ENV = {**default_environment(), "python_version": "3.12", "python_full_version": "3.12.3",
              "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
              "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}  # fmt: skip


def on_device() -> set[str]:
    lines = (HERE / "device_packages.txt").read_text().splitlines()
    return {canonicalize_name(x) for x in lines if x.strip() and not x.startswith("#")}


def pinned(name: str) -> str:
    try:
        return f"{name}=={md.version(name)}"
    except md.PackageNotFoundError:
        return name


def fetch(name: str, out: Path) -> None:
    spec = pinned(name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    if canonicalize_name(name) in SDIST_ONLY:
        subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(out), spec], check=True)
        return
    plats = [a for p in PLATFORMS for a in ("--platform", p)]
    cmd = [*pip, "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12", "--implementation",
           "cp", *plats, "-d", str(out), spec]  # fmt: skip
    subprocess.run(cmd, check=True)


def wheel_names(out: Path) -> dict[str, Path]:
    return {canonicalize_name(parse_wheel_filename(p.name)[0]): p for p in out.glob("*.whl")}


def requirements(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        lines = zf.read(meta).decode().splitlines()
    needs = []
    for line in lines:
        if line.startswith("Requires-Dist:"):
            req = Requirement(line.split(":", 1)[1].strip())
            if req.marker is None or req.marker.evaluate(TARGET_ENV):
                needs.append(canonicalize_name(req.name))
    return needs


def collect(names: list[str], out: Path, have: set[str]) -> None:
    """Wheels for ``names`` and everything they need that is not in ``have`` into ``out``."""
    out.mkdir(exist_ok=True)
    todo = [canonicalize_name(n) for n in names]
    while todo:
        name = todo.pop()
        if name in have or name in wheel_names(out):
            continue
        print(f"fetching {pinned(name)}", flush=True)
        fetch(name, out)
        todo += requirements(wheel_names(out)[name])
    size = sum(p.stat().st_size for p in out.glob("*.whl"))
    print(f"{len(list(out.glob('*.whl')))} wheels in {out}/, {size / 2**20:.1f} MiB")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=".whl")
    parser.add_argument("--eval", action="store_true", help="also lm-eval and what it needs, into OUT-eval")
    parser.add_argument("extra", nargs="*", help="more packages for OUT")
    args = parser.parse_args(argv)
    out = Path(args.out)
    collect(TRAIN + args.extra, out, on_device())
    if args.eval:
        collect(EVAL, Path(f"{args.out}-eval"), on_device() | set(wheel_names(out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
