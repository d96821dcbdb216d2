"""Full training-step throughput on one GPU: losslab's presets (both block families) against HF transformers
models of the same shape, eager and compiled, bf16 autocast, fused AdamW, in one run.

For each configuration the largest micro-batch that fits (from --batches, largest first) is used; reported:
tokens/s, MFU (6N + 12 L d T per token, N = all parameters, peak 989 TFLOP/s dense bf16 on H100/H200) and
peak memory. Step = forward + loss + backward + optimizer step (no DeepSpeed: the engine adds its own cost).

    python scripts/bench_model.py                           # 468m, seq 1024 and 2048, both blocks, HF too
    python scripts/bench_model.py --preset 1.2b --seq 1024 --no-hf

``--device cpu --preset debug --modes eager`` is a smoke test of the script itself (tests/test_bench.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run this checkout's code, never an installed copy

import argparse
import gc
import json
import math
import time
from collections.abc import Callable

import torch

from models import GPT
from trainer import parallelize
from trainer.config import load_config, model_config
from trainer.losses import build_loss
from trainer.perf import flops_per_token, peak_flops

VOCAB = 32000


def losslab_step(preset: str, block: str, seq: int, compile: bool, device: str) -> tuple[torch.nn.Module, Callable]:
    cfg = model_config(load_config(None, [f"model.preset={preset}", f"model.block={block}", f"data.seq_len={seq}",
                                          f"model.max_seq_len={max(seq, 1024)}"]), VOCAB)  # fmt: skip
    with torch.device(device):
        model = GPT(cfg)
    parallelize.apply(model, activation_checkpointing=False, compile=compile)
    loss_fn = build_loss({"name": "ce"})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step(ids: torch.Tensor) -> None:
        with torch.autocast(device, dtype=torch.bfloat16):
            hidden = model(ids[:, :-1])
            out = model.head(hidden, lambda h, w: loss_fn(h, w, ids[:, 1:]))
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return model, step


def hf_step(preset: str, block: str, seq: int, compile: bool, device: str) -> tuple[torch.nn.Module, Callable]:
    from models.hf import hf_config

    cfg = model_config(load_config(None, [f"model.preset={preset}", f"model.block={block}", f"data.seq_len={seq}",
                                          f"model.max_seq_len={max(seq, 1024)}"]), VOCAB)  # fmt: skip
    import transformers

    hf_cfg = hf_config(cfg)
    hf_cfg._attn_implementation = "sdpa"
    cls = transformers.LlamaForCausalLM if block == "llama" else transformers.GPTNeoXForCausalLM
    with torch.device(device):
        model = cls(hf_cfg)
    fwd = torch.compile(model) if compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step(ids: torch.Tensor) -> None:
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = fwd(input_ids=ids[:, :-1], labels=ids[:, :-1]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return model, step


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# Kernel name fragments -> where step time goes (for "what limits MFU": matmuls at their best are the ceiling).
KERNEL_KINDS = {
    "matmul": ("gemm", "cutlass", "xmma", "cublas", "nvjet", "aten::mm", "aten::addmm", "aten::bmm"),
    "attention": ("flash", "fmha", "attention", "sdpa", "cudnn"),
    "loss": ("_row_stats", "_row_grad"),
    "optimizer": ("adam", "multi_tensor"),
    "compiled elementwise": ("triton_",),
}


def kernel_breakdown(step: Callable, ids: torch.Tensor, device: str, steps: int = 3) -> dict[str, float]:
    """Share of device (CUDA) or CPU self time by kind of kernel over a few steps, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            step(ids)
        _sync(device)
    from torch.autograd import DeviceType

    times: dict[str, float] = {}
    for evt in prof.key_averages():
        if device == "cuda" and evt.device_type != DeviceType.CUDA:
            continue  # kernels only: an aten op's device time is its kernels' again
        us = evt.self_device_time_total if device == "cuda" else evt.self_cpu_time_total
        if us <= 0:
            continue
        name = evt.key.lower()
        kind = next((k for k, frags in KERNEL_KINDS.items() if any(f in name for f in frags)), "other")
        times[kind] = times.get(kind, 0.0) + us
    total = sum(times.values()) or 1.0
    return {k: v / total for k, v in sorted(times.items(), key=lambda kv: -kv[1])}


def measure(
    build: Callable,
    preset: str,
    block: str,
    seq: int,
    compile: bool,
    batches: list[int],
    iters: int,
    device: str,
    profile: bool = False,
) -> dict:
    for batch in batches:
        model = step = None
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            model, step = build(preset, block, seq, compile, device)
            ids = torch.randint(0, VOCAB, (batch, seq + 1), device=device)
            for _ in range(3):
                step(ids)
            _sync(device)
            start = time.perf_counter()
            for _ in range(iters):
                step(ids)
            _sync(device)
        except torch.OutOfMemoryError:
            continue
        except Exception as e:  # a configuration that does not run here (a compile error, say): report, go on
            return {"micro_batch": 0, "error": f"{type(e).__name__}: {str(e)[:500]}"}
        secs = (time.perf_counter() - start) / iters
        n = sum(p.numel() for p in model.parameters())
        layers = model.config.num_hidden_layers if hasattr(model, "config") else model.cfg.n_layers
        width = model.config.hidden_size if hasattr(model, "config") else model.cfg.d_model
        tokens_s = batch * seq / secs
        fpt = 6.0 * n + 12.0 * layers * width * seq
        peak = (peak_flops() or 989e12) if device == "cuda" else math.nan
        gib = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else math.nan
        result = {"micro_batch": batch, "s_per_step": secs, "tokens_per_s": tokens_s, "mfu": tokens_s * fpt / peak,
                  "peak_gib": gib, "params": n}  # fmt: skip
        if profile:
            result["time_share"] = kernel_breakdown(step, ids, device)
        return result
    return {"micro_batch": 0, "error": "out of memory at every micro-batch"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="468m")
    parser.add_argument("--blocks", nargs="+", default=["neox", "llama"])
    parser.add_argument("--seq", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 48, 32, 24, 16, 8, 4, 2, 1])
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--no-hf", action="store_true")
    parser.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--profile", action="store_true", help="losslab rows: share of kernel time by kind")
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_model.py needs a CUDA GPU (--device cpu only checks the script)", file=sys.stderr)
        return 2
    assert flops_per_token  # the same convention as the trainer's MFU (trainer/perf.py)
    rows = []
    for seq in args.seq:
        for block in args.blocks:
            impls = [("losslab", losslab_step)] + ([] if args.no_hf else [("hf", hf_step)])
            for name, build in impls:
                for compile in [mode == "compiled" for mode in args.modes]:
                    profile = args.profile and name == "losslab"
                    r = measure(build, args.preset, block, seq, compile, args.batches, args.iters, args.device, profile)
                    r.update(impl=name, block=block, seq=seq, compiled=compile, preset=args.preset)
                    rows.append(r)
                    print(json.dumps(r), flush=True)
                    if args.json:  # after every configuration: a run cut at its time limit keeps its rows
                        Path(args.json).write_text(json.dumps(rows, indent=2))
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"\n# {name}, torch {torch.__version__}, preset {args.preset}, vocab {VOCAB}")
    print(
        "| impl | block | seq | compiled | micro-batch | tokens/s | MFU | peak GiB |\n|---|---|---|---|---|---|---|---|"
    )
    for r in rows:
        if r["micro_batch"]:
            print(f"| {r['impl']} | {r['block']} | {r['seq']} | {r['compiled']} | {r['micro_batch']} | "
                  f"{r['tokens_per_s']:.0f} | {r['mfu']:.1%} | {r['peak_gib']:.1f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
