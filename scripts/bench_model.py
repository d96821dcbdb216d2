"""Full training-step throughput: losslab's presets (both block families) against HF transformers models of the
same shape, eager and compiled, bf16 autocast (or fp32), fused AdamW, in one run.

On a GPU, for each configuration the largest micro-batch that fits (from --batches, largest first) is used;
reported: tokens/s, MFU (6N + 12 L d T per token, N = all parameters, peak 989 TFLOP/s dense bf16 on H100/H200)
and peak memory. Step = forward + loss + backward + optimizer step (no DeepSpeed: the engine adds its own cost).

On a CPU (``--device cpu``) both models of a configuration are built side by side and their steps alternate
(losslab, HF, losslab, ...: drift and a busy machine hit both alike), at the first --batches value; reported:
the median tokens/s of --iters steps each, the spread (min-max) and losslab / HF. ``--profile-ops N``: the top
N operators by self CPU time of each row (torch.profiler), for finding what limits the step.

    python scripts/bench_model.py                           # 468m, seq 1024 and 2048, both blocks, HF too
    python scripts/bench_model.py --preset 1.2b --seq 1024 --no-hf
    python scripts/bench_model.py --device cpu --preset tiny small --seq 128 --batches 8 --precision fp32 bf16

``--device cpu --preset debug --modes eager`` is a smoke test of the script itself (tests/test_bench.py).
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import _bootstrap  # noqa: F401  (this checkout first on sys.path)
import torch

from losslab.log import fail
from losslab.losses import build_loss
from models import GPT
from trainer import parallelize
from trainer.config import load_config, model_config
from trainer.perf import flops_per_token, peak_flops

VOCAB = 32000


def losslab_step(
    preset: str, block: str, seq: int, compile: bool, device: str, precision: str = "bf16"
) -> tuple[torch.nn.Module, Callable]:
    cfg = model_config(load_config(None, [f"model.preset={preset}", f"model.block={block}", f"data.seq_len={seq}",
                                          f"model.max_seq_len={max(seq, 1024)}"]), VOCAB)  # fmt: skip
    with torch.device(device):
        model = GPT(cfg)
    parallelize.apply(model, activation_checkpointing=False, compile=compile)
    loss_fn = build_loss({"name": "ce"})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step(ids: torch.Tensor) -> None:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16"):
            hidden = model(ids[:, :-1])
            out = model.head(hidden, lambda h, w: loss_fn(h, w, ids[:, 1:]))
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return model, step


def hf_step(
    preset: str, block: str, seq: int, compile: bool, device: str, precision: str = "bf16"
) -> tuple[torch.nn.Module, Callable]:
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
        with torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16"):
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


def op_table(step: Callable, ids: torch.Tensor, steps: int = 3, top: int = 12) -> list[dict]:
    """The ``top`` operators by self CPU time over ``steps`` steps (torch.profiler): name, ms per step, share."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step(ids)
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    events.sort(key=lambda e: -e.self_cpu_time_total)
    return [{"op": e.key, "ms_per_step": e.self_cpu_time_total / 1e3 / steps, "share": e.self_cpu_time_total / total,
             "calls_per_step": e.count / steps} for e in events[:top]]  # fmt: skip


def side_by_side(
    builds: dict[str, Callable], preset: str, block: str, seq: int, batch: int, iters: int, precision: str,
    profile_ops: int = 0, warmup: int = 2,
) -> dict[str, dict]:  # fmt: skip
    """CPU: every implementation built at once, their steps alternating for ``iters`` rounds after ``warmup``
    steps each; -> per implementation the median tokens/s and the spread of its steps."""
    torch.manual_seed(0)
    ids = torch.randint(0, VOCAB, (batch, seq + 1))
    models, steps, times = {}, {}, {}
    for name, build in builds.items():
        models[name], steps[name] = build(preset, block, seq, False, "cpu", precision)
        times[name] = []
    for _ in range(warmup):
        for step in steps.values():
            step(ids)
    for _ in range(iters):
        for name, step in steps.items():
            start = time.perf_counter()
            step(ids)
            times[name].append(time.perf_counter() - start)
    out = {}
    for name, ts in times.items():
        ts = sorted(ts)
        median = ts[len(ts) // 2] if len(ts) % 2 else (ts[len(ts) // 2 - 1] + ts[len(ts) // 2]) / 2
        n = sum(p.numel() for p in models[name].parameters())
        out[name] = {"micro_batch": batch, "s_per_step": median, "tokens_per_s": batch * seq / median,
                     "tokens_per_s_min": batch * seq / ts[-1], "tokens_per_s_max": batch * seq / ts[0],
                     "steps": len(ts), "params": n, "mfu": math.nan, "peak_gib": math.nan}  # fmt: skip
        if profile_ops:
            out[name]["ops"] = op_table(steps[name], ids, top=profile_ops)
    return out


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
    precision: str = "bf16",
) -> dict:
    for batch in batches:
        model = step = None
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            model, step = build(preset, block, seq, compile, device, precision)
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
    parser.add_argument("--preset", nargs="+", default=["468m"])
    parser.add_argument("--blocks", nargs="+", default=["neox", "llama"])
    parser.add_argument("--seq", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 48, 32, 24, 16, 8, 4, 2, 1])
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2, help="CPU: untimed steps of each implementation first")
    parser.add_argument("--no-hf", action="store_true")
    parser.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"])
    parser.add_argument("--precision", nargs="+", default=["bf16"], choices=["bf16", "fp32"],
                        help="bf16: autocast over fp32 weights (as the trainer on a GPU); fp32: none")  # fmt: skip
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--profile", action="store_true", help="losslab rows: share of kernel time by kind")
    parser.add_argument("--profile-ops", type=int, default=0, help="CPU: the top N operators of every row")
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        return fail("bench_model.py needs a CUDA GPU (--device cpu only checks the script)", prefix="")
    assert flops_per_token  # the same convention as the trainer's MFU (trainer/perf.py)
    rows = []

    def emit(r: dict) -> None:
        rows.append(r)
        print(json.dumps({k: v for k, v in r.items() if k != "ops"}), flush=True)
        if args.json:  # after every configuration: a run cut at its time limit keeps its rows
            Path(args.json).write_text(json.dumps(rows, indent=2))

    impls = {"losslab": losslab_step} | ({} if args.no_hf else {"hf": hf_step})
    for preset, seq, block, precision in itertools.product(args.preset, args.seq, args.blocks, args.precision):
        key = {"block": block, "seq": seq, "preset": preset, "precision": precision}
        if args.device == "cpu" and "compiled" not in args.modes:
            results = side_by_side(
                impls, preset, block, seq, args.batches[0], args.iters, precision, args.profile_ops, args.warmup
            )
            base = results.get("hf", {}).get("tokens_per_s")
            for name, r in results.items():
                r.update(impl=name, compiled=False, **key)
                if base:
                    r["vs_hf"] = r["tokens_per_s"] / base
                if args.profile and name == "losslab":
                    step = losslab_step(preset, block, seq, False, "cpu", precision)[1]
                    r["time_share"] = kernel_breakdown(step, torch.randint(0, VOCAB, (args.batches[0], seq + 1)), "cpu")
                emit(r)
            continue
        for name, build in impls.items():
            for compile in [mode == "compiled" for mode in args.modes]:
                profile = args.profile and name == "losslab"
                r = measure(
                    build, preset, block, seq, compile, args.batches, args.iters, args.device, profile, precision
                )
                r.update(impl=name, compiled=compile, **key)
                emit(r)
    name = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"\n# {name}, torch {torch.__version__}, vocab {VOCAB}, medians of {args.iters} steps")
    print("| preset | impl | block | seq | precision | compiled | micro-batch | tokens/s (min-max) | vs HF | MFU | "
          "peak GiB |\n|---|---|---|---|---|---|---|---|---|---|---|")  # fmt: skip
    for r in rows:
        if r["micro_batch"]:
            spread = f" ({r['tokens_per_s_min']:.0f}-{r['tokens_per_s_max']:.0f})" if "tokens_per_s_min" in r else ""
            ratio = f"{r['vs_hf']:.2f}x" if "vs_hf" in r else ""
            print(f"| {r['preset']} | {r['impl']} | {r['block']} | {r['seq']} | {r['precision']} | {r['compiled']} | "
                  f"{r['micro_batch']} | {r['tokens_per_s']:.0f}{spread} | {ratio} | {r['mfu']:.1%} | "
                  f"{r['peak_gib']:.1f} |")  # fmt: skip
    for r in rows:
        if r.get("ops"):
            print(f"\n{r['impl']} {r['preset']} {r['block']} {r['precision']}: top operators by self CPU time\n"
                  "| op | ms/step | share | calls/step |\n|---|---|---|---|")  # fmt: skip
            for o in r["ops"]:
                print(f"| {o['op']} | {o['ms_per_step']:.1f} | {o['share']:.1%} | {o['calls_per_step']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
