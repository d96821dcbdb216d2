#!/usr/bin/env bash
# The GPU session's work, in stages, run ON the device machine from the repo root (plan: scripts/gpu/README.md):
#   bash scripts/gpu/session.sh setup tests loss model1024
# Each stage logs to $OUT/<stage>.log (and JSON / metrics files beside it); a failed stage is reported and the
# next one runs. Idempotent: a warm machine keeps the installed wheels and the prepared corpus.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/losslab-out}
mkdir -p "$OUT"
PY=${PY:-python3}
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
SITE=/tmp/losslab-site
export PYTHONPATH=$SITE:$PWD

install_wheels() {  # .whl (training) and .whl-eval (lm-eval), each once per machine
  for d in .whl .whl-eval; do
    if [ -d $d ] && [ ! -f $SITE/$d.installed ]; then
      $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $SITE $d/*.whl \
        && touch $SITE/$d.installed || { echo "wheel install from $d failed"; return 1; }
    fi
  done
}

# The data the configs name under corpus/ (the study corpus and the 32k tokenizer, built here by
# scripts/gpu/pack.sh: the device reaches no package server) travel as .carry/data, so every command below names
# the data explicitly.
DATA=corpus; [ -d .carry/data ] && DATA=$PWD/.carry/data
TOKENIZER=$DATA/tokenizers/llama-style-32k-bpe.model

unpack_eval_data() {
  if [ -f .carry/eval_data.tar.gz ] && [ ! -d eval_data ]; then tar -xzf .carry/eval_data.tar.gz; fi
}

train_shards() { ls "$DATA"/study/*.jsonl.zst 2>/dev/null; }

prepare_bench_corpus() {  # whichever training shards were carried; benchmarks only need real tokens
  [ -f corpus/bench_32k/manifest.json ] && return 0
  local shards; shards=$(train_shards)
  [ -n "$shards" ] || { echo "no study corpus shard carried under $DATA/study"; return 1; }
  $PY scripts/prepare_data.py --files $shards --tokenizer "$TOKENIZER" --out corpus/bench_32k --workers "$(nproc)"
}

summarize() {  # run dir, stage: the metrics file and a one-line summary into $OUT
  cp "$1/metrics.jsonl" "$OUT/$2_metrics.jsonl" 2>/dev/null
  $PY scripts/gpu/summarize_run.py "$1" | tee "$OUT/$2_summary.json"
}

bench_train() {  # stage, run dir, train.py args...: a throughput run cut at TRAIN_BUDGET seconds (SIGKILL: a
  # SIGTERM would make the trainer save a pre-emption checkpoint), summarised whatever it reached. EXTRA holds
  # more key=value overrides, e.g. EXTRA="distributed.offload_ratio=0.9 train.global_batch_size=128".
  local stage=$1 dir=$2; shift 2
  prepare_bench_corpus || return 1
  # shellcheck disable=SC2086  # EXTRA is a list of overrides
  timeout -s KILL "${TRAIN_BUDGET:-540}" $PY scripts/train.py "$@" "data.tokenizer=$TOKENIZER" ${EXTRA:-}
  local rc=$?
  summarize "$dir" "$stage"
  return $rc
}

stage() {
  case "$1" in
    setup)
      install_wheels && unpack_eval_data
      nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
      echo "cpus $(nproc), memory $(free -g | awk '/Mem:/ {print $2}') GiB"
      $PY -c "import torch, triton, deepspeed, omegaconf, zstandard, sentencepiece, transformers
print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())
print('triton', triton.__version__, 'deepspeed', deepspeed.__version__, 'transformers', transformers.__version__)"
      $PY -c "import liger_kernel; print('liger-kernel ok')" || echo "no liger-kernel: bench_loss skips its row"
      $PY -c "import lm_eval; print('lm-eval', lm_eval.__version__)" || echo "no lm-eval: the eval468 stage cannot run"
      ;;
    tests)  # the CUDA-relevant tests on the GPU (Triton kernels compiled, not interpreted)
      $PY -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py tests/test_losses_triton.py tests/test_losses.py \
        tests/test_model.py tests/test_bench.py
      ;;
    loss) $PY scripts/bench_loss.py --train-step --json "$OUT/bench_loss.json" ;;
    model1024neox | model1024llama)  # one block family a stage: 4 configurations, each compiled once or twice
      $PY scripts/bench_model.py --seq 1024 --blocks "${1#model1024}" --batches 64 32 16 --profile \
        --json "$OUT/$1.json" ;;
    model2048neox | model2048llama)
      $PY scripts/bench_model.py --seq 2048 --blocks "${1#model2048}" --batches 32 16 8 --profile \
        --json "$OUT/$1.json" ;;
    model12b)
      $PY scripts/bench_model.py --preset 1.2b --seq 1024 --batches 32 16 8 --no-hf --profile --json "$OUT/$1.json"
      ;;
    scale12) bench_train scale12 runs/bench/1.2b configs/experiments/bench/1.2b_zero2.yaml ;;
    scale67) bench_train scale67 runs/bench/6.7b configs/experiments/bench/6.7b_offload.yaml ;;
    scale67neox) bench_train scale67neox runs/bench/6.7b configs/experiments/bench/6.7b_offload.yaml model.block=neox ;;
    eval468)  # a short 468M run, then the paper task set 0-shot, timed
      [ -d eval_data ] || { echo "eval_data missing: carry .carry/eval_data.tar.gz (scripts/gpu/pack.sh)"; return 1; }
      prepare_bench_corpus \
        && $PY scripts/train.py configs/experiments/bench/468m_eval.yaml "data.tokenizer=$TOKENIZER" \
        && summarize runs/bench/468m eval468_train || return 1
      local start=$SECONDS
      $PY scripts/evaluate.py --checkpoint runs/bench/468m --tasks paper --task-dir eval_data --batch-size 64 \
        && echo "paper task set, 0-shot: $((SECONDS - start)) s" \
        && cp "$(ls -t runs/bench/468m/checkpoints/step_*/evals/*/eval_results.json | head -1)" "$OUT/eval468_results.json"
      ;;
    grid)  # the small grid of issue #9 (long: see scripts/gpu/README.md); resumable, re-run to continue
      [ -n "$(train_shards)" ] || { echo "the grid needs the study corpus carried (.carry/data/study)"; return 1; }
      $PY scripts/split_corpus.py --files $(train_shards) --out corpus/study_split --fraction 0.03 --min-docs 6 \
        && { [ -f corpus/study_32k/manifest.json ] || $PY scripts/prepare_data.py \
          --files corpus/study_split/train.jsonl.zst --tokenizer "$TOKENIZER" --out corpus/study_32k \
          --workers "$(nproc)"; } || return 1
      # SIGTERM before the device's own limit: the current run saves a checkpoint, the next call resumes it.
      # W&B is not on the GPU image (metrics.jsonl holds everything the report needs).
      LAUNCHER=$PY PYTHON=$PY timeout -s TERM "${TRAIN_BUDGET:-540}" \
        bash scripts/run_grid.sh configs/experiments/small 0 1 -- "data.tokenizer=$TOKENIZER" \
        wandb.mode=disabled ${EXTRA:-} \
        && tar -czf "$OUT/small_report.tar.gz" -C runs/small report
      ;;
    *) echo "unknown stage $1"; return 2 ;;
  esac
}

status=0
for s in "$@"; do
  echo "=== $s ($(date -u +%H:%M:%S))"
  start=$SECONDS
  stage "$s" 2>&1 | tee "$OUT/$s.log"
  rc=${PIPESTATUS[0]}
  echo "=== $s: exit $rc after $((SECONDS - start)) s"
  [ "$rc" = 0 ] || status=1
done
exit $status
