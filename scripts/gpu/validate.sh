#!/usr/bin/env bash
# GPU truth in one call (issue #20): kernels correct on CUDA, then the speed and memory figures, most important
# first, each stage cut at its own time budget and writing its JSON as it goes, so a late failure or the
# device's time limit loses nothing earlier. About 6 minutes on one H100/H200, wheel install included.
#
#   bash scripts/gpu/validate.sh OUTDIR          # on the GPU machine (scripts/gpu/README.md: the one call)
#   bash scripts/gpu/validate.sh --toy OUTDIR    # the same script at toy sizes on the CPU (tests/test_gpu_validate.py)
#   python scripts/gpu/report.py OUTDIR          # here, afterwards: the rows for docs/benchmarks.md
#
# Stages, in order (VALIDATE_STAGES picks some, e.g. "setup model" to re-run one that was cut):
#   setup    install the carried wheels (.whl/), record date, GPU, versions, command       -> stages.jsonl
#   kernels  every fused loss (and the modifiers) in bf16 vs float64 at V=50304, Triton and torch -> kernels.json
#   tests    tests/test_cuda.py and the Triton / self-check tests (pytest-reportlog)       -> tests.jsonl
#   loss     bench_loss.py: every loss fused vs naive, next to Liger, N=16384 d=1024 V=50304 -> bench_loss.json
#   model    bench_model.py: 468M, both blocks, seq 1024, micro-batch 32, vs HF, compiled  -> bench_model.json
#   hf       bench_hf_patch.py: HF Trainer steps of a SmolLM2-135M-shaped Llama (random weights), losslab.hf's
#            patch vs transformers' own loss: loss, time and peak memory of a step   -> added to bench_model.json
#   eval     bench_eval.py (#25): SmolLM2's shape (random weights: its own do not travel) next to the stock tools:
#            greedy generation vs generate() at batch 8 and 32, evaluate.py vs lm_eval --model hf (needs
#            .whl-eval), the fine-tuning step vs transformers in fp32 and bf16 autocast        -> bench_eval.json
#   big      if time is left: a 1.2B step (llama, micro-batch 16, compiled)      -> rows added to bench_model.json
#   scale    if time is left: 6.7B ZeRO-3 + optimizer offload, steps reached in the rest    -> scale_6.7b.json
# Everything printed also goes to OUTDIR/validate.log: 8 files in all, the most the device tool returns.
#
# Time: VALIDATE_BUDGET (s, default 350; 720 with --toy) for the whole script; a stage gets min(its budget, what is
# left) and is skipped when less than its minimum is left. Budgets BUDGET_<STAGE>, minima MIN_<STAGE> (seconds).
# Sizes (defaults on the GPU / with --toy): CHECK_N CHECK_D CHECK_V (2048 256 50304 / 64 16 300), LOSS_N LOSS_D
# LOSS_V (16384 1024 50304 / 64 16 300), MODEL_PRESET MODEL_SEQ MODEL_BATCH MODEL_MODES (468m 1024 32 compiled /
# debug 32 2 eager), HF_SEQ HF_BATCH HF_STEPS HF_PRECISION HF_SHAPE (1024 8 5 bf16 SmolLM2-135M / 16 2 1 fp32 a
# one-layer toy), BIG_PRESET BIG_BATCH (1.2b 16 / debug 2), SCALE_OVERRIDES, EVAL_SHAPE EVAL_PARTS EVAL_RUNS
# EVAL_EVAL_RUNS EVAL_BATCHES EVAL_PROMPTS EVAL_TOKENS EVAL_LL_LIMIT EVAL_GEN_LIMIT EVAL_TRAIN_BATCH EVAL_TRAIN_SEQ
# (smollm2, "gen train eval", 5, 3, "8 32", 64, 32, 200, 32, 8, 512 / toy, "gen train", 1, 1, "2 5", 5, 4, 4, 3,
# 2, 16: the toy run leaves the evaluate.py / lm_eval subprocesses to tests/test_bench.py). Data for the scale
# stage: VALIDATE_SHARD, VALIDATE_TOKENIZER (default: under .carry/data, else corpus/). Wheels: VALIDATE_WHEELS
# (.whl) and VALIDATE_EVAL_WHEELS (.whl-eval: lm-eval; none of either with --toy), installed into VALIDATE_SITE
# (/tmp/losslab-site); scratch run directories under VALIDATE_WORK.
set -uo pipefail
TOY=${VALIDATE_TOY:-0}
if [ "${1:-}" = "--toy" ]; then TOY=1; shift; fi
[ $# -eq 1 ] || { echo "usage: bash scripts/gpu/validate.sh [--toy] OUTDIR" >&2; exit 2; }
COMMAND="bash scripts/gpu/validate.sh $([ "$TOY" = 1 ] && echo '--toy ')$1"
mkdir -p "$1" || exit 2
OUT=$(cd "$1" && pwd)
cd "$(dirname "$0")/../.."
PY=${PY:-python3}
SITE=${VALIDATE_SITE:-/tmp/losslab-site}
WHEELS=${VALIDATE_WHEELS-$([ "$TOY" = 1 ] || echo .whl)}  # --toy: none (.whl/ holds the GPU image's cp312 wheels)
EVAL_WHEELS=${VALIDATE_EVAL_WHEELS-$([ "$TOY" = 1 ] || echo .whl-eval)}
WORK=${VALIDATE_WORK:-/tmp/losslab-validate}
STAGES=" ${VALIDATE_STAGES:-setup kernels tests loss model hf eval big scale} "
TOTAL=${VALIDATE_BUDGET:-$([ "$TOY" = 1 ] && echo 720 || echo 350)}  # --toy: a busy 2-core machine (load 10+) starts each stage slowly
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH=$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}
DATA=corpus; [ -d .carry/data ] && DATA=$PWD/.carry/data  # scripts/gpu/pack.sh builds it here
SHARD=${VALIDATE_SHARD:-$DATA/study/anarchist_faq.jsonl.zst}
TOKENIZER=${VALIDATE_TOKENIZER:-$DATA/tokenizers/llama-style-32k-bpe.model}

if [ "$TOY" = 1 ]; then  # every stage at toy sizes on the CPU: checks the script, measures nothing
  DEVICE=cpu
  export TRITON_INTERPRET=1  # the Triton kernels run in Triton's interpreter on CPU tensors
  : "${CHECK_N:=64}" "${CHECK_D:=16}" "${CHECK_V:=300}" "${LOSS_N:=64}" "${LOSS_D:=16}" "${LOSS_V:=300}"
  : "${LOSS_WARMUP:=0}" "${LOSS_ITERS:=1}" "${MODEL_PRESET:=debug}" "${MODEL_SEQ:=32}" "${MODEL_BATCH:=2}"
  : "${MODEL_MODES:=eager}" "${MODEL_ITERS:=1}" "${BIG_PRESET:=debug}" "${BIG_SEQ:=32}" "${BIG_BATCH:=2}"
  : "${HF_SEQ:=16}" "${HF_BATCH:=2}" "${HF_STEPS:=1}" "${HF_PRECISION:=fp32}" "${MIN_HF:=0}" "${BUDGET_HF:=150}"
  : "${HF_SHAPE:=vocab_size=300 hidden_size=16 intermediate_size=32 num_hidden_layers=1 num_attention_heads=2 num_key_value_heads=1 head_dim=8}"
  : "${BIG_MODES:=eager}" "${TEST_FILES:=tests/test_cuda.py}" "${MIN_BIG:=0}" "${MIN_SCALE:=0}"
  : "${SCALE_OVERRIDES:=model.preset=debug data.seq_len=32 train.micro_batch_size=2 train.global_batch_size=2 train.max_steps=3 train.precision=auto}"
  : "${EVAL_SHAPE:=toy}" "${EVAL_PARTS:=gen train}" "${EVAL_RUNS:=1}" "${EVAL_EVAL_RUNS:=1}" "${EVAL_BATCHES:=2 5}"
  : "${EVAL_PROMPTS:=5}" "${EVAL_TOKENS:=4}" "${EVAL_LL_LIMIT:=4}" "${EVAL_GEN_LIMIT:=3}" "${EVAL_TRAIN_BATCH:=2}"
  : "${EVAL_TRAIN_SEQ:=16}" "${MIN_EVAL:=0}"
else
  DEVICE=cuda
fi
: "${CHECK_N:=2048}" "${CHECK_D:=256}" "${CHECK_V:=50304}" "${LOSS_N:=16384}" "${LOSS_D:=1024}" "${LOSS_V:=50304}"
: "${LOSS_WARMUP:=3}" "${LOSS_ITERS:=10}" "${MODEL_PRESET:=468m}" "${MODEL_SEQ:=1024}" "${MODEL_BATCH:=32}"
: "${MODEL_MODES:=compiled}" "${MODEL_ITERS:=5}" "${BIG_PRESET:=1.2b}" "${BIG_SEQ:=1024}" "${BIG_BATCH:=16}"
: "${BIG_MODES:=compiled}" "${TEST_FILES:=tests/test_losses_triton.py tests/test_losses_selfcheck.py tests/test_cuda.py}"
# 6.7B: one micro-step of 8 x 2048 per optimizer step (not the config's 8), so a short window still counts steps
: "${SCALE_OVERRIDES:=train.global_batch_size=8 train.max_steps=1000}"
: "${BUDGET_SETUP:=60}" "${BUDGET_KERNELS:=60}" "${BUDGET_TESTS:=90}" "${BUDGET_LOSS:=60}" "${BUDGET_MODEL:=170}"
: "${BUDGET_BIG:=75}" "${BUDGET_SCALE:=600}" "${MIN_BIG:=45}" "${MIN_SCALE:=120}"
: "${HF_SEQ:=1024}" "${HF_BATCH:=8}" "${HF_STEPS:=5}" "${HF_PRECISION:=bf16}" "${HF_SHAPE:=}" "${BUDGET_HF:=60}"
: "${MIN_HF:=30}"
# eval: (b) starts lm_eval and evaluate.py 2 x 2 x EVAL_EVAL_RUNS times (~15 s each): 3 runs, not 5, to fit
: "${EVAL_SHAPE:=smollm2}" "${EVAL_PARTS:=gen train eval}" "${EVAL_RUNS:=5}" "${EVAL_EVAL_RUNS:=3}"
: "${EVAL_BATCHES:=8 32}" "${EVAL_PROMPTS:=64}" "${EVAL_TOKENS:=32}" "${EVAL_LL_LIMIT:=200}" "${EVAL_GEN_LIMIT:=32}"
: "${EVAL_TRAIN_BATCH:=8}" "${EVAL_TRAIN_SEQ:=512}" "${BUDGET_EVAL:=240}" "${MIN_EVAL:=60}"

export CHECK_N CHECK_D CHECK_V LOSS_N LOSS_D LOSS_V MODEL_PRESET MODEL_SEQ MODEL_BATCH MODEL_MODES BIG_PRESET BIG_BATCH \
  SCALE_OVERRIDES HF_SEQ HF_BATCH HF_PRECISION EVAL_SHAPE EVAL_PARTS EVAL_RUNS EVAL_EVAL_RUNS  # recorded in stages.jsonl

mkdir -p "$WORK"
exec > >(tee -a "$OUT/validate.log") 2>&1
TEE=$!
: > "$OUT/stages.jsonl"
START=$SECONDS

record() {  # stage, rc, seconds, budget, note: one line of stages.jsonl
  printf '{"stage": "%s", "rc": %d, "seconds": %d, "budget": %d, "timed_out": %s, "note": "%s"}\n' \
    "$1" "$2" "$3" "$4" "$([ "$2" = 137 ] && echo true || echo false)" "${5:-}" >> "$OUT/stages.jsonl"
}

run_stage() {  # name, budget, minimum, command...: the command reads its cut-off from STAGE_BUDGET
  local name=$1 budget=$2 minimum=$3 left t0 rc; shift 3
  [[ "$STAGES" == *" $name "* ]] || return 0
  left=$((TOTAL - (SECONDS - START)))
  if [ "$left" -lt "$minimum" ] || [ "$left" -lt 1 ]; then
    echo "=== $name: skipped, ${left} s left of ${TOTAL} s (needs ${minimum} s)"
    record "$name" 0 0 0 "skipped: ${left} s left of the ${TOTAL} s budget, ${minimum} s needed"
    return 0
  fi
  [ "$budget" -gt "$left" ] && budget=$left
  echo "=== $name ($(date -u +%H:%M:%S), budget ${budget} s)"
  t0=$SECONDS
  STAGE_BUDGET=$budget "$@"
  rc=$?
  echo "=== $name: exit $rc after $((SECONDS - t0)) s"
  record "$name" "$rc" $((SECONDS - t0)) "$budget" "$([ "$rc" = 137 ] && echo "cut at its ${budget} s budget")"
}

cut() { timeout -s KILL "$STAGE_BUDGET" "$@"; }  # the whole process group: launcher children too

setup() {
  if [ -n "$WHEELS" ] && ls "$WHEELS"/*.whl > /dev/null 2>&1; then
    if [ ! -f "$SITE/.validate-installed" ]; then
      cut $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "$WHEELS"/*.whl && touch "$SITE/.validate-installed" || { echo "wheel install from $WHEELS failed"; return 1; }
    fi
  else
    echo "no wheels in '$WHEELS': using the packages installed here"
  fi
  if [ -n "$EVAL_WHEELS" ] && ls "$EVAL_WHEELS"/*.whl > /dev/null 2>&1 && [ ! -f "$SITE/.validate-eval-installed" ]; then
    cut $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      "$EVAL_WHEELS"/*.whl && touch "$SITE/.validate-eval-installed" || echo "wheel install from $EVAL_WHEELS failed"
  fi
  [ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  COMMAND=$COMMAND TOY=$TOY DEVICE=$DEVICE cut $PY - >> "$OUT/stages.jsonl" << 'EOF'
import datetime, importlib.metadata as md, json, os, platform, torch
versions = {}
for pkg in ("torch", "triton", "deepspeed", "transformers", "liger-kernel", "omegaconf", "sentencepiece", "lm_eval"):
    try:
        versions[pkg] = md.version(pkg)
    except md.PackageNotFoundError:
        versions[pkg] = None
cuda = os.environ["DEVICE"] == "cuda" and torch.cuda.is_available()
sizes = {k: os.environ.get(k) for k in ("CHECK_N", "CHECK_D", "CHECK_V", "LOSS_N", "LOSS_D", "LOSS_V", "MODEL_PRESET",
         "MODEL_SEQ", "MODEL_BATCH", "MODEL_MODES", "BIG_PRESET", "BIG_BATCH", "SCALE_OVERRIDES", "HF_SEQ",
         "HF_BATCH", "HF_PRECISION", "EVAL_SHAPE", "EVAL_PARTS", "EVAL_RUNS", "EVAL_EVAL_RUNS")}
print(json.dumps({"stage": "env", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "command": os.environ["COMMAND"], "toy": os.environ["TOY"] == "1", "device": os.environ["DEVICE"],
                  "gpu": torch.cuda.get_device_name() if cuda else "none (CPU dry run)",
                  "gpu_memory_gib": torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else None,
                  "cuda": torch.version.cuda, "python": platform.python_version(), "cpus": os.cpu_count(),
                  "versions": versions, "sizes": sizes}))
EOF
}

kernels() { cut $PY scripts/gpu/check_losses.py --device $DEVICE --tokens "$CHECK_N" --dim "$CHECK_D" \
  --vocab "$CHECK_V" --json "$OUT/kernels.json"; }

tests() {  # -p no:cacheprovider: nothing written into the checkout
  # shellcheck disable=SC2086  # TEST_FILES is a list
  cut $PY -m pytest -q -p no:cacheprovider -rs --report-log "$OUT/tests.jsonl" $TEST_FILES
}

loss() { cut $PY scripts/bench_loss.py --device $DEVICE --tokens "$LOSS_N" --dim "$LOSS_D" --vocab "$LOSS_V" \
  --warmup "$LOSS_WARMUP" --iters "$LOSS_ITERS" --json "$OUT/bench_loss.json"; }

model() {  # bench_model runs neox (losslab, HF) then llama (losslab, HF): a cut keeps the first pair
  # shellcheck disable=SC2086  # MODEL_MODES is a list
  cut $PY scripts/bench_model.py --device $DEVICE --preset "$MODEL_PRESET" --seq "$MODEL_SEQ" --blocks neox llama \
    --batches "$MODEL_BATCH" --modes $MODEL_MODES --iters "$MODEL_ITERS" --profile --json "$OUT/bench_model.json"
}

hf() {  # its rows are added to bench_model.json: 8 files is the most the device tool returns
  # shellcheck disable=SC2086  # HF_SHAPE is a list
  cut $PY scripts/bench_hf_patch.py --device $DEVICE --random-init --precision "$HF_PRECISION" --seq "$HF_SEQ" \
    --batch "$HF_BATCH" --steps "$HF_STEPS" ${HF_SHAPE:+--shape $HF_SHAPE} \
    --json "$OUT/bench_model.json" --append
}

evals() {  # not "eval" (a shell builtin); the stage is named eval
  # shellcheck disable=SC2086  # EVAL_PARTS and EVAL_BATCHES are lists
  cut $PY scripts/bench_eval.py --device $DEVICE --model "random:$EVAL_SHAPE" --tokenizer "$TOKENIZER" \
    --text "$SHARD" --work "$WORK/bench_eval" --parts $EVAL_PARTS --runs "$EVAL_RUNS" --eval-runs "$EVAL_EVAL_RUNS" \
    --gen-batches $EVAL_BATCHES --gen-prompts "$EVAL_PROMPTS" --gen-tokens "$EVAL_TOKENS" \
    --ll-limit "$EVAL_LL_LIMIT" --gen-limit "$EVAL_GEN_LIMIT" --train-batch "$EVAL_TRAIN_BATCH" \
    --train-seq "$EVAL_TRAIN_SEQ" --json "$OUT/bench_eval.json"
}

big() {  # its rows join bench_model.json, marked "stage": "big" (the device tool returns 8 files at most)
  local rc
  rm -f "$WORK/bench_model_big.json"
  # shellcheck disable=SC2086
  cut $PY scripts/bench_model.py --device $DEVICE --preset "$BIG_PRESET" --seq "$BIG_SEQ" --blocks llama \
    --batches "$BIG_BATCH" --modes $BIG_MODES --iters "$MODEL_ITERS" --no-hf --profile \
    --json "$WORK/bench_model_big.json"
  rc=$?
  BIG="$WORK/bench_model_big.json" MODEL="$OUT/bench_model.json" $PY - << 'EOF' || rc=1
import json, os
from pathlib import Path
big, model = Path(os.environ["BIG"]), Path(os.environ["MODEL"])
rows = json.loads(model.read_text()) if model.is_file() and model.read_text().strip() else []
added = json.loads(big.read_text()) if big.is_file() else []
model.write_text(json.dumps(rows + [{**r, "stage": "big"} for r in added], indent=2))
EOF
  return $rc
}

scale() {  # the trainer's whole step (DeepSpeed ZeRO-3, optimizer offload), SIGKILLed at the budget (a SIGTERM
  # would make it save a pre-emption checkpoint), then summarised from what it logged
  local dir=$WORK/scale_6.7b rc
  if [ ! -f "$SHARD" ] || [ ! -f "$TOKENIZER" ]; then
    echo "no training shard or tokenizer ($SHARD, $TOKENIZER): carry .carry/data (scripts/gpu/README.md)"
    printf '{"steps": 0, "skipped": "no training shard or tokenizer carried"}\n' > "$OUT/scale_6.7b.json"
    return 1
  fi
  # shellcheck disable=SC2086  # SCALE_OVERRIDES is a list
  STAGE_BUDGET=$((STAGE_BUDGET > 10 ? STAGE_BUDGET - 5 : STAGE_BUDGET)) cut $PY scripts/train.py \
    configs/experiments/bench/6.7b_offload.yaml "run.dir=$dir" "data.prepared=''" "data.train_files=[$SHARD]" \
    "data.tokenizer=$TOKENIZER" train.log_every=1 $SCALE_OVERRIDES
  rc=$?
  RC=$rc BUDGET=$STAGE_BUDGET DIR=$dir OVERRIDES=$SCALE_OVERRIDES $PY - > "$OUT/scale_6.7b.json" << 'EOF'
import json, os
from pathlib import Path
from scripts.gpu.summarize_run import summarize
row = {"config": "configs/experiments/bench/6.7b_offload.yaml", "overrides": os.environ["OVERRIDES"],
       "budget_s": int(os.environ["BUDGET"]), "rc": int(os.environ["RC"]), "killed_at_budget": os.environ["RC"] == "137"}
try:
    row.update(summarize(Path(os.environ["DIR"]), skip=0.25))
except (OSError, ValueError) as e:
    row.update(steps=0, error=f"{type(e).__name__}: {e}")
print(json.dumps(row))
EOF
  cat "$OUT/scale_6.7b.json"
  [ "$rc" = 137 ] && return 0  # cut at the budget is how this stage ends on the GPU
  return $rc
}

run_stage setup "$BUDGET_SETUP" 0 setup
run_stage kernels "$BUDGET_KERNELS" 0 kernels
run_stage tests "$BUDGET_TESTS" 0 tests
run_stage loss "$BUDGET_LOSS" 0 loss
run_stage model "$BUDGET_MODEL" 0 model
run_stage hf "$BUDGET_HF" "$MIN_HF" hf
run_stage eval "$BUDGET_EVAL" "$MIN_EVAL" evals
run_stage big "$BUDGET_BIG" "$MIN_BIG" big
run_stage scale "$BUDGET_SCALE" "$MIN_SCALE" scale
echo "=== done after $((SECONDS - START)) s: $(grep -c '"rc": 0' "$OUT/stages.jsonl") stage lines with exit 0" \
  "of $(grep -c '"rc"' "$OUT/stages.jsonl"); next: python scripts/gpu/report.py $OUT"
status=0
grep -q '"rc": [1-9]' "$OUT/stages.jsonl" && status=1
exec >&- 2>&-  # let tee write the log's last lines before the device tool collects OUTDIR
wait "$TEE"
exit $status
