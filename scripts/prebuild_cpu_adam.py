"""DeepSpeed's CPU Adam (``DeepSpeedCPUAdam``, ZeRO-Offload's optimizer) compiled once, ahead of time, into a wheel
kept in the user's cache, and installed into this environment. ``scripts/setup.sh`` runs it on machines without an
NVIDIA GPU.

Left to DeepSpeed, the op is compiled by torch's JIT at its first use in every new environment: a minute or more of
both cores of a 2-core machine, paid again by every fresh clone's test suite (a new virtualenv's sources are newer
than any earlier build, so the JIT always rebuilds). DeepSpeed's documented alternative is to build the op while
building its wheel (``DS_BUILD_CPU_ADAM=1``): the same sources and flags, loaded at run time instead of compiled.
That wheel is built here once per key and reused by every environment with the same key:

- DeepSpeed's version (the op's sources), torch's (the ABI it links against), the Python tag;
- this CPU's instruction sets: DeepSpeed compiles the op with ``-march=native``, so a wheel built on one CPU may
  not run on another.

Nothing here is needed for correctness: if the build fails, the message says so and DeepSpeed compiles the op at
first use as before. ``python scripts/prebuild_cpu_adam.py [--cache DIR]``; exit 0 either way.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import platform
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

STAMP = ".losslab-cpu-adam"
"""In the environment's root (``sys.prefix``): the key of the op wheel installed there."""


def cpu_flags(cpuinfo: str) -> str:
    """The instruction sets the kernel lists for the first CPU (``flags``, or ``Features`` on ARM)."""
    for line in cpuinfo.splitlines():
        name, _, value = line.partition(":")
        if name.strip() in ("flags", "Features"):
            return " ".join(sorted(value.split()))
    return ""


def wheel_key(deepspeed: str, torch: str, python: str, flags: str) -> str:
    """``deepspeed-0.19.8-torch-2.13.0-cp311-<12 hex of the CPU's instruction sets>``."""
    cpu = hashlib.sha256(flags.encode()).hexdigest()[:12]
    return f"deepspeed-{deepspeed}-torch-{torch.replace('+', '_')}-{python}-{cpu}"


def current_key() -> str | None:
    """This environment's key, or None where the op cannot be built ahead of time (no instruction sets listed)."""
    try:
        flags = cpu_flags(Path("/proc/cpuinfo").read_text())
        versions = metadata.version("deepspeed"), metadata.version("torch")
    except (OSError, metadata.PackageNotFoundError):
        return None
    if not flags or platform.machine() not in ("x86_64", "aarch64"):
        return None
    return wheel_key(*versions, f"cp{sys.version_info.major}{sys.version_info.minor}", flags)


def op_installed() -> bool:
    """DeepSpeed as installed holds the compiled op (its RECORD lists ``deepspeed/ops/adam/cpu_adam_op*.so``)."""
    files = metadata.distribution("deepspeed").files or []
    return any(f.name.startswith("cpu_adam_op") and f.parent.as_posix() == "deepspeed/ops/adam" for f in files)


def build_wheel(deepspeed: str, dest: Path) -> Path:
    """DeepSpeed's sdist built into a wheel holding the compiled CPU Adam, written into ``dest`` whole or not at
    all (a second setup running at the same time finds either nothing or the finished wheel)."""
    dest.mkdir(parents=True, exist_ok=True)
    if importlib.util.find_spec("setuptools") is None:  # DeepSpeed's setup.py runs in this environment (it needs
        # torch, so no isolated build), and a Python 3.12+ virtualenv comes without setuptools
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "setuptools"], capture_output=True, check=False)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".build-") as tmp:
        env = {**os.environ, "DS_BUILD_OPS": "0", "DS_BUILD_CPU_ADAM": "1"}
        cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-cache-dir",
               "-w", tmp, f"deepspeed=={deepspeed}"]  # fmt: skip
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("deepspeed-*.whl"))
        if proc.returncode != 0 or len(wheels) != 1:
            tail = [x for x in proc.stderr.splitlines() if not x.startswith("WARNING: Location")][-1:] or ["none"]
            raise RuntimeError(f"pip wheel failed (exit {proc.returncode}): {tail[0]}")
        target = dest / wheels[0].name
        os.replace(wheels[0], target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "losslab" / "deepspeed-cpu-adam"
    parser.add_argument("--cache", type=Path, default=cache, help=f"where the wheels are kept (default {cache})")
    args = parser.parse_args(argv)
    key = current_key()
    stamp = Path(sys.prefix) / STAMP
    if key is None or (stamp.is_file() and stamp.read_text().strip() == key and op_installed()):
        return 0
    folder = args.cache / key
    wheels = sorted(folder.glob("deepspeed-*.whl"))
    try:
        if not wheels:
            print("setup: compiling DeepSpeed's CPU Adam once for this machine (about a minute; then kept in "
                  f"{folder})", flush=True)  # fmt: skip
            wheels = [build_wheel(metadata.version("deepspeed"), folder)]
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", str(wheels[0])]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"pip install {wheels[0]} failed (exit {proc.returncode})")
    except (OSError, RuntimeError) as e:
        print(f"setup: DeepSpeed's CPU Adam not compiled ahead of time ({e}); DeepSpeed compiles it at first use",
              file=sys.stderr)  # fmt: skip
        return 0
    stamp.write_text(key + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
