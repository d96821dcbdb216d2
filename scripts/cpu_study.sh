#!/usr/bin/env bash
# The CPU study (issues #19, #26), end to end, from a fresh clone:
#   1. the study corpus, built from pinned Debian packages (scripts/build_study_corpus.py; refused when a shard's
#      sha256 differs from configs/data/study_corpus.json), split so every domain has held-out documents;
#   2. an 8k BPE tokenizer trained on the training split, the split pre-tokenised, a cloze task on held-out text;
#   3. the grid: the seven losses of configs/experiments/cpu_study/ x 5 seeds at 614,400 tokens a run, then CE,
#      focal and MiLe x 3 seeds at 4x the tokens (configs/experiments/cpu_study_4x/);
#   4. the reports (runs/cpu_study/report, runs/cpu_study_4x/report; --publish writes them to
#      docs/results/cpu-study/ and docs/results/cpu-study/longer/), each with provenance.md: commit, commands, corpus.
# About 70 minutes on an idle 2-core machine (2 core-hours; docs/benchmarks.md, 2026-12-06). A stopped grid resumes
# where it stopped: run the same command again (finished runs are skipped, interrupted ones continue from their
# last checkpoint; exit 75 means "not finished yet").
#
#   bash scripts/cpu_study.sh [--accept-changed-corpus] [--accept-other-versions] [--publish] [-- key=value ...]
#
# --accept-changed-corpus   use shards whose text differs from the recorded one (the report's provenance says so)
# --accept-other-versions   where a pinned Debian version is no longer served, build from the one that is
# key=value ...             overrides for every run (a toy run: -- train.max_steps=4 eval.val_tokens=2000 ...)
# Environment: RUNS (runs), STUDY_DATA (corpus: where the corpus and its derived files go), CPU_STUDY_SEEDS
# ("0 1 2 3 4"), CPU_STUDY_LONG_SEEDS ("0 1 2"; "" skips the 4x grid), CPU_STUDY_JOBS (runs side by side, one
# thread each; default: the number of cores), LOSSLAB_NO_SETUP=1 (the environment is managed otherwise: skip
# scripts/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
COMMAND="bash scripts/cpu_study.sh $*"
corpus_flags=()
publish=0
while [ $# -gt 0 ]; do
  case "$1" in
    --accept-changed-corpus) corpus_flags+=(--accept-changed) ;;
    --accept-other-versions) corpus_flags+=(--accept-other-versions) ;;
    --publish) publish=1 ;;
    --) shift; break ;;
    *) echo "cpu_study.sh: unknown argument '$1' (overrides come after --; see the header of this script)" >&2; exit 2 ;;
  esac
  shift
done
[ "${LOSSLAB_NO_SETUP:-0}" = 1 ] || bash scripts/setup.sh
PY=${PYTHON:-.venv/bin/python}
export WANDB_SILENT=true TOKENIZERS_PARALLELISM=false
DATA=${STUDY_DATA:-corpus}
RUNS=${RUNS:-runs}
read -r -a seeds <<< "${CPU_STUDY_SEEDS:-0 1 2 3 4}"
read -r -a long_seeds <<< "${CPU_STUDY_LONG_SEEDS-0 1 2}"

# 1-2. data, each step idempotent (an existing output of the same inputs is reused)
"$PY" scripts/build_study_corpus.py --out "$DATA/study" "${corpus_flags[@]}"
"$PY" scripts/split_corpus.py --files "$DATA"/study/*.jsonl.zst --out "$DATA/study_split" --fraction 0.03 --min-docs 6
tok=$DATA/study_8k/tokenizer
split_sha=$(sha256sum "$DATA/study_split/manifest.json" | cut -d' ' -f1)
if [ "$(cat "$tok.split-sha256" 2>/dev/null)" != "$split_sha" ]; then  # retrained when the split changes
  mkdir -p "$DATA/study_8k"
  "$PY" scripts/train_tokenizer.py --files "$DATA/study_split/train.jsonl.zst" --vocab-size 8000 \
    --byte-budget 30000000 --out "$tok"
  echo "$split_sha" > "$tok.split-sha256"
fi
"$PY" scripts/prepare_data.py --files "$DATA/study_split/train.jsonl.zst" --tokenizer "$tok.model" \
  --out "$DATA/study_8k/train"
"$PY" scripts/build_cloze_task.py --files "$DATA/study_split/val.jsonl.zst" --name cpu_study_cloze \
  --out "$DATA/study_8k/tasks"

# 3. the grids (run_grid.sh: finished runs skipped, the others resumed)
data_overrides=("data.prepared=$DATA/study_8k/train" "data.tokenizer=$tok.model"
  "data.val_files=[$DATA/study_split/val.jsonl.zst]" "eval.task_dir=$DATA/study_8k/tasks")
# A model this small uses two cores poorly: JOBS runs go side by side, one thread each, the grid's runs dealt out
# among them (run_grid.sh SHARD=i/JOBS, each resuming on its own); the grid has finished when all jobs have.
JOBS=${CPU_STUDY_JOBS:-$(nproc)}
threads=$([ "$JOBS" -gt 1 ] && echo 1 || echo "${OMP_NUM_THREADS:-$(nproc)}")
grid() {  # config directory, seeds...
  local dir=$1 pids=() status=0 i; shift
  for ((i = 0; i < JOBS; i++)); do
    OMP_NUM_THREADS=$threads SHARD=$i/$JOBS LAUNCHER="$PY" PYTHON="$PY" RUNS="$RUNS" REPORT=0 \
      bash scripts/run_grid.sh "$dir" "$@" -- "${data_overrides[@]}" "${OVERRIDES[@]}" &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
  return $status
}
OVERRIDES=("$@")
grid configs/experiments/cpu_study "${seeds[@]}"
[ ${#long_seeds[@]} -eq 0 ] || grid configs/experiments/cpu_study_4x "${long_seeds[@]}"

# 4. the reports: the one place the comparison is called (scripts/compare_runs.py), then the provenance
report() {  # grid name, output folder
  local name=$1 out=$2 runs=()
  for cfg in configs/experiments/"$name"/*.yaml; do
    for seed in "${@:3}"; do runs+=("$RUNS/$name/$(basename "$cfg" .yaml)-s$seed"); done
  done
  "$PY" scripts/compare_runs.py "${runs[@]}" --out "$out"
  "$PY" scripts/study_record.py --out "$out" --corpus "$DATA/study/manifest.json" \
    --data "$tok.model" "$DATA/study_split/val.jsonl.zst" \
    --command "$COMMAND" --command "python scripts/compare_runs.py ${runs[*]} --out $out" "${runs[@]}"
}
out=$RUNS/cpu_study/report; out4=$RUNS/cpu_study_4x/report
if [ $publish = 1 ]; then out=docs/results/cpu-study; out4=docs/results/cpu-study/longer; fi
report cpu_study "$out" "${seeds[@]}"
[ ${#long_seeds[@]} -eq 0 ] || report cpu_study_4x "$out4" "${long_seeds[@]}"
echo "reports: $out/summary.md$([ ${#long_seeds[@]} -eq 0 ] || echo " and $out4/summary.md")"
