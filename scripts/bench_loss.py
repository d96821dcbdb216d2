"""Benchmark the loss family on a GPU: every losslab loss, fused vs naive (materialised logits), forward +
backward time and peak memory above the inputs, side by side with Liger Kernel's fused linear cross-entropy;
optionally a full 468M-preset training step with ``mile`` vs ``ce``.

Correctness first: each fused loss is compared with its materialised reference before anything is timed.

    python scripts/bench_loss.py                      # N=16384, d=1024, V=50304 and 32000, bf16
    python scripts/bench_loss.py --train-step         # also the 468M full-step overhead of mile vs ce
    python scripts/bench_loss.py --json out.json      # machine-readable results

``--device cpu`` with small sizes is a smoke test of the script itself (tests/test_bench.py): times from the
wall clock, no memory figures, no Liger row.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable

import torch

from trainer.losses import LOSSES, build_loss

LOSS_ARGS = {"ce": {}, "mile": {"gamma": 1.0}, "focal": {"gamma": 1.0}, "focal_lin": {"gamma": 2.0}, "pdl": {}}


def timed(fn: Callable[[], None], warmup: int, iters: int, device: str = "cuda") -> tuple[float, float]:
    """(median ms, peak GiB above what was allocated before) of fn(); peak is NaN off CUDA."""
    for _ in range(warmup):
        fn()
    if device != "cuda":
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return sorted(times)[len(times) // 2], math.nan
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    return sorted(times)[len(times) // 2], peak


def make_inputs(n: int, d: int, v: int, device: str = "cuda", seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    hidden = (torch.randn(n, d, device=device, generator=g) * 0.5).bfloat16().requires_grad_()
    weight = (torch.randn(v, d, device=device, generator=g) * 0.02).bfloat16().requires_grad_()
    labels = torch.randint(0, v, (n,), device=device, generator=g)
    counts = torch.randint(0, 10_000, (v,), generator=torch.Generator().manual_seed(seed))
    return hidden, weight, labels, counts


def step_fn(loss_fn, hidden, weight, labels) -> Callable[[], None]:
    def run() -> None:
        hidden.grad = weight.grad = None
        out = loss_fn(hidden, weight, labels)
        out.loss.backward()

    return run


def liger_step_fn(liger, hidden, weight, labels) -> Callable[[], None]:
    def run() -> None:
        hidden.grad = weight.grad = None
        liger(weight, hidden, labels).backward()

    return run


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def check(name: str, hidden, weight, labels, counts) -> dict[str, float]:
    """Fused (default kernel) vs the materialised reference, same bf16 inputs."""
    results = []
    for fused in ("true", "false"):
        hidden.grad = weight.grad = None
        out = build_loss({"name": name, "fused": fused, **LOSS_ARGS[name]}, counts)(hidden, weight, labels)
        out.loss.backward()
        results.append((out.loss.detach().float(), hidden.grad.clone(), weight.grad.clone()))
    (lf, hf, wf), (lr, hr, wr) = results
    return {"loss_rel": abs((lf - lr) / lr).item(), "grad_h_rel": rel(hf, hr), "grad_w_rel": rel(wf, wr)}


def liger_rows(hidden, weight, labels, warmup: int, iters: int, device: str) -> list[dict]:
    """Liger Kernel's fused linear cross-entropy as users run it (its default: grad-weight accumulated in the
    weight's dtype) and with fp32 accumulation (``accum_dtype``; losslab always accumulates in fp32)."""
    if device != "cuda":
        print("no Liger rows: its kernels need CUDA", file=sys.stderr)
        return []
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
    except Exception as e:  # not installed, or an import that fails on this stack: the other rows still run
        print(f"no Liger rows: {type(e).__name__}: {e}", file=sys.stderr)
        return []
    rows = []
    for impl, kwargs in (("liger", {}), ("liger-fp32-accum", {"accum_dtype": torch.float32})):
        try:
            liger = LigerFusedLinearCrossEntropyLoss(**kwargs)
            ms, gib = timed(liger_step_fn(liger, hidden, weight, labels), warmup, iters, device)
        except Exception as e:
            print(f"no {impl} row: {type(e).__name__}: {e}", file=sys.stderr)
            continue
        rows.append({"V": weight.shape[0], "loss": "ce", "impl": impl, "ms": ms, "peak_gib": gib})
    return rows


def bench_losses(n: int, d: int, vocabs: list[int], warmup: int, iters: int, device: str = "cuda") -> list[dict]:
    rows = []
    for v in vocabs:
        hidden, weight, labels, counts = make_inputs(n, d, v, device)
        rows += liger_rows(hidden, weight, labels, warmup, iters, device)
        for name in sorted(LOSSES):
            errs = check(name, hidden, weight, labels, counts)
            for impl, cfg in (
                ("fused", {"fused": "true"}),
                ("fused-torch", {"fused": "true", "kernel": "torch"}),
                ("naive", {"fused": "false"}),
            ):
                loss_fn = build_loss({"name": name, **cfg, **LOSS_ARGS[name]}, counts)
                ms, gib = timed(step_fn(loss_fn, hidden, weight, labels), warmup, iters, device)
                rows.append({"V": v, "loss": name, "impl": impl, "ms": ms, "peak_gib": gib, **errs})
        hidden = weight = None
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def train_step_fn(model, opt, loss_fn, ids) -> Callable[[], None]:
    def run() -> None:
        with torch.autocast(ids.device.type, dtype=torch.bfloat16):
            hidden = model(ids[:, :-1])
            out = model.head(hidden, lambda h, w: loss_fn(h, w, ids[:, 1:]))
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return run


def bench_train_step(
    warmup: int, iters: int, micro_batch: int, seq: int, preset: str = "468m", device: str = "cuda"
) -> list[dict]:
    """The preset (neox), bf16 autocast, fused AdamW: a full step with mile vs ce, in the same process."""
    from models import GPT
    from trainer.config import load_config, model_config

    cfg = model_config(load_config(None, [f"model.preset={preset}", f"data.seq_len={seq}"]), 32000)
    with torch.device(device):
        model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ids = torch.randint(0, 32000, (micro_batch, seq + 1), device=device)
    rows = []
    for name in ("ce", "mile", "ce", "mile"):  # interleaved, to expose drift
        ms, gib = timed(train_step_fn(model, opt, build_loss({"name": name}), ids), warmup, iters, device)
        rows.append({"loss": name, "ms": ms, "tokens_per_s": micro_batch * seq / ms * 1e3, "peak_gib": gib})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--vocab", type=int, nargs="+", default=[50304, 32000])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--train-step", action="store_true")
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--preset", default="468m", help="model of the --train-step comparison")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_loss.py needs a CUDA GPU (--device cpu only checks the script)", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"# {name}, torch {torch.__version__}, N={args.tokens}, d={args.dim}, bf16")
    rows = bench_losses(args.tokens, args.dim, args.vocab, args.warmup, args.iters, args.device)
    print("| V | loss | impl | ms (fwd+bwd) | peak GiB | loss rel err | grad_h rel err | grad_w rel err |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        errs = " | ".join(f"{r[k]:.1e}" if k in r else "" for k in ("loss_rel", "grad_h_rel", "grad_w_rel"))
        print(f"| {r['V']} | {r['loss']} | {r['impl']} | {r['ms']:.2f} | {r['peak_gib']:.2f} | {errs} |")
    result = {"device": name, "torch": torch.__version__, "losses": rows}
    if args.train_step:
        steps = bench_train_step(args.warmup, args.iters, args.micro_batch, args.seq, args.preset, args.device)
        print(f"| {args.preset} step | ms | tokens/s | peak GiB |\n|---|---|---|---|")
        for r in steps:
            print(f"| {r['loss']} | {r['ms']:.1f} | {r['tokens_per_s']:.0f} | {r['peak_gib']:.1f} |")
        result["train_step"] = steps
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
