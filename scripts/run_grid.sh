#!/usr/bin/env bash
# Run every experiment config of a directory for each seed, one after the other, then compare them:
#   bash scripts/run_grid.sh configs/experiments/small 0 1 [-- extra key=value overrides]
# Each run writes to $RUNS/<grid>/<config>-s<seed> (RUNS default: runs); set LAUNCHER (default: deepspeed) for
# other launchers and PYTHON (default: .venv/bin/python) for another interpreter. Every run is relaunched with
# train.resume=auto: a finished one does nothing, an interrupted one resumes — after an interruption, run the same
# command again (exit 75 means "not finished yet") — and one whose directory holds a run with other settings (a
# smoke test's, say) is refused (exit 2) rather than reused. Delete a run's directory to run it again.
# REPORT=0 skips the comparison; SHARD=i/n runs only runs i, i+n, i+2n, ... of the grid (n jobs side by side, each
# with its own SHARD).
set -euo pipefail
cd "$(dirname "$0")/.."
# SIGTERM (a scheduler, `timeout`) reaches the running trainer too, which saves a checkpoint and stops; the trap
# keeps this script alive until then, so it reports the run as unfinished (exit 75) instead of vanishing.
trap 'echo "run_grid: SIGTERM, stopping once the current run has saved" >&2' TERM
dir=$1; shift
seeds=(); while [ $# -gt 0 ] && [ "$1" != "--" ]; do seeds+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
grid=$(basename "$dir")
runs=()
IFS=/ read -r shard shards <<< "${SHARD:-0/1}"  # SHARD=i/n: only every n-th run from the i-th (jobs side by side)
k=-1
for cfg in "$dir"/*.yaml; do
  for seed in "${seeds[@]}"; do
    run="${RUNS:-runs}/$grid/$(basename "$cfg" .yaml)-s$seed"
    runs+=("$run")
    k=$((k + 1))
    [ $((k % shards)) = "$shard" ] || continue
    # finished runs do nothing (train.py checks they are this grid's); pre-empted ones continue where they stopped
    ${LAUNCHER:-.venv/bin/deepspeed} scripts/train.py "$cfg" "train.seed=$seed" "run.dir=$run" "wandb.group=$grid" train.resume=auto "$@"
    grep -q '"complete": true' "$run/result.json" || { echo "$run did not finish; run the grid again to resume"; exit 75; }
  done
done
# REPORT=0: the caller writes the report (the study drivers compare several grids in their own way)
[ "${REPORT:-1}" = 0 ] || ${PYTHON:-.venv/bin/python} scripts/compare_runs.py "${runs[@]}" --out "${RUNS:-runs}/$grid/report"
