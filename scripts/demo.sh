#!/usr/bin/env bash
# The main job on the embedded default data: set-up -> corpus -> tokenizer -> train a tiny GPT-NeoX-style
# model with MiLe through DeepSpeed -> checkpoints -> lm-eval on a held-out task -> summary.
# Extra arguments are config overrides, e.g. `bash scripts/demo.sh train.max_steps=50`.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
bash scripts/setup.sh
.venv/bin/python scripts/build_default_corpus.py
export WANDB_SILENT=true TOKENIZERS_PARALLELISM=false
.venv/bin/python scripts/train.py configs/experiments/demo.yaml "run.dir=runs/demo-$(date +%Y%m%d-%H%M%S)" "$@"
echo "demo finished in $(( $(date +%s) - start )) s"
