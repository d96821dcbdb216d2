#!/usr/bin/env bash
# The CPU study of issue #19, end to end: every loss of configs/experiments/cpu_study/ x 3 seeds on real text from
# ../shared/corpora, equal tokens per run, then the comparison report (docs/results/cpu-study/ holds the committed
# one). About an hour on 2 cores; a stopped grid resumes where it stopped (run this again). Usage:
#   bash scripts/cpu_study.sh [SHARED_CORPORA_DIR] [-- extra key=value overrides for every run]
set -euo pipefail
cd "$(dirname "$0")/.."
corpora=${1:-../shared/corpora}; [ $# -gt 0 ] && [ "$1" != "--" ] && shift
[ "${1:-}" = "--" ] && shift
bash scripts/setup.sh
PY=.venv/bin/python
export WANDB_SILENT=true TOKENIZERS_PARALLELISM=false
# held-out documents from every domain (the shards are split by source), an 8k BPE trained on the training split,
# the training split pre-tokenised (each step reads a globally shuffled window), a cloze task on the held-out
# documents: all idempotent
"$PY" scripts/split_corpus.py --files "$corpora"/*.jsonl.zst --out corpus/cpu_study/text --fraction 0.02
[ -f corpus/cpu_study/tok8k.model ] || "$PY" scripts/train_tokenizer.py --files corpus/cpu_study/text/train.jsonl.zst \
    --vocab-size 8000 --byte-budget 30000000 --out corpus/cpu_study/tok8k
"$PY" scripts/prepare_data.py --files corpus/cpu_study/text/train.jsonl.zst --tokenizer corpus/cpu_study/tok8k.model \
    --out corpus/cpu_study/train_8k
"$PY" scripts/build_cloze_task.py --files corpus/cpu_study/text/val.jsonl.zst --name cpu_study_cloze \
    --out corpus/cpu_study/tasks
LAUNCHER="$PY" bash scripts/run_grid.sh configs/experiments/cpu_study 0 1 2 -- "$@"
echo "report: runs/cpu_study/report/summary.md"
