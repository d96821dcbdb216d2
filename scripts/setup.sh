#!/usr/bin/env bash
# Create (or reuse) .venv and install losslab with its dev tools.
# torch is installed first so that pip never pulls a multi-GB CUDA build onto a machine without a GPU:
#   - no NVIDIA GPU: torch==2.13.0 (a CPU build where one is provided locally);
#   - NVIDIA GPU: the newest torch from the index.
# Override with LOSSLAB_TORCH (any pip requirement spec, e.g. LOSSLAB_TORCH="torch==2.11.0").
set -euo pipefail
cd "$(dirname "$0")/.."

quiet_pip() {  # pip, without the noise of this machine's unused local index locations
  "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }
}

# A new environment takes about 3.1 GiB (torch 0.8, Triton 1.0, the rest lm-eval's, DeepSpeed's and W&B's
# dependencies; docs/benchmarks.md): on a disk without that room pip dies half-way with "No space left on device",
# so say it first, in one line
need_kib=$((3584 * 1024))
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  free_kib=$(df -Pk . | awk 'NR == 2 {print $4}')
  if [ -n "$free_kib" ] && [ "$free_kib" -lt "$need_kib" ]; then
    echo "setup: $((free_kib / 1024)) MiB free on the disk of $(pwd); a new .venv needs about $((need_kib / 1024)) MiB" \
      "(torch, Triton, DeepSpeed, lm-eval and their dependencies): free some space and run it again" >&2
    exit 2
  fi
fi
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if gpu; then
    spec="${LOSSLAB_TORCH:-torch}"
  else
    spec="${LOSSLAB_TORCH:-torch==2.13.0}"
  fi
  echo "setup: installing $spec"
  quiet_pip .venv/bin/pip install -q "$spec"
fi
# Re-install only when the project's requirements change.
stamp=.venv/.losslab-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing losslab and its dependencies"
  quiet_pip .venv/bin/pip install -q -e '.[dev]'
  echo "$want" >"$stamp"
fi
# DeepSpeed's CPU Adam (ZeRO-Offload's optimizer) compiled once per machine and kept, instead of at its first use in
# every new environment (scripts/prebuild_cpu_adam.py); a machine with a GPU keeps DeepSpeed's default
if ! gpu; then
  .venv/bin/python scripts/prebuild_cpu_adam.py
fi
