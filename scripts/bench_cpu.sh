#!/usr/bin/env bash
# Issue #18's CPU benchmarks in one go, each losslab row next to what users would run instead, in the same
# process: the fused loss against F.cross_entropy on materialised logits (fp32 and bf16 autocast), and the full
# training step against HF transformers (tiny and small presets, both blocks, fp32 and bf16 autocast).
# Writes OUT/*.json and OUT/*.md as it goes (about 20 minutes on 2 cores). Usage: bash scripts/bench_cpu.sh [OUT]
# Keep the machine otherwise idle: the rows alternate, so drift hits both sides alike, but noise still adds.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/bench_cpu}
mkdir -p "$out"
PY=.venv/bin/python
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
run() { local name=$1; shift; echo "== $name: $*"; "$PY" "$@" --json "$out/$name.json" | grep -v "^{" | tee "$out/$name.md"; }
run loss_fp32 scripts/bench_loss.py --cpu-speed --tokens 1024 4096 --vocab 32000 50304 --dim 128 --iters 5 --precision fp32
# bf16 autocast: F.cross_entropy's bf16 matmuls are emulated on CPUs without AVX512-BF16/AMX (10-50x fp32), so
# only the smallest size
run loss_bf16 scripts/bench_loss.py --cpu-speed --tokens 1024 --vocab 32000 --dim 128 --iters 5 --precision bf16
run step_fp32 scripts/bench_model.py --device cpu --preset tiny small --seq 128 --batches 8 --modes eager \
    --precision fp32 --iters 5
run step_bf16_tiny scripts/bench_model.py --device cpu --preset tiny --seq 128 --batches 8 --modes eager \
    --precision bf16 --iters 5
# small in bf16: micro-batch 8 where the CPU has native bf16 (AVX512-BF16 / AMX); else 2, since an emulated HF bf16
# step of 8 x 128 takes minutes
native=$("$PY" -c "import torch; from losslab.losses.paths import slow_low_precision_cpu as slow
print(int(not slow(torch.bfloat16)))" 2>/dev/null || echo 0)
run step_bf16_small scripts/bench_model.py --device cpu --preset small --seq 128 --batches $([ "$native" = 1 ] && echo 8 || echo 2) \
    --modes eager --precision bf16 --iters 5 --warmup 1
