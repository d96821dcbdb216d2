#!/usr/bin/env bash
# Run every experiment config of a directory for each seed, one after the other, then compare them:
#   bash scripts/run_grid.sh configs/experiments/small 0 1 [-- extra key=value overrides]
# Each run writes to runs/<grid>/<config>-s<seed>; set LAUNCHER (default: deepspeed) for other launchers and
# PYTHON (default: .venv/bin/python) for another interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=$1; shift
seeds=(); while [ $# -gt 0 ] && [ "$1" != "--" ]; do seeds+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
grid=$(basename "$dir")
runs=()
for cfg in "$dir"/*.yaml; do
  for seed in "${seeds[@]}"; do
    run="runs/$grid/$(basename "$cfg" .yaml)-s$seed"
    ${LAUNCHER:-.venv/bin/deepspeed} scripts/train.py "$cfg" "train.seed=$seed" "run.dir=$run" train.resume=auto "$@"
    runs+=("$run")
  done
done
${PYTHON:-.venv/bin/python} scripts/compare_runs.py "${runs[@]}" --out "runs/$grid/report"
