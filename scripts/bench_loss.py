"""Benchmark the loss family on a GPU: every losslab loss, fused vs naive (materialised logits), forward +
backward time and peak memory above the inputs, side by side with Liger Kernel's fused linear cross-entropy;
optionally a full 468M-preset training step with ``mile`` vs ``ce``.

Correctness first: each fused loss is compared with its materialised reference before anything is timed.

    python scripts/bench_loss.py                      # N=16384, d=1024, V=50304 and 32000, bf16
    python scripts/bench_loss.py --train-step         # also the 468M full-step overhead of mile vs ce
    python scripts/bench_loss.py --json out.json      # machine-readable results
    python scripts/bench_loss.py --cpu-memory --tokens 4096 --dim 256 --vocab 32000   # issue #17, on the CPU

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
from pathlib import Path

import _bootstrap  # noqa: F401  (this checkout first on sys.path)
import torch

from losslab.log import fail, get_logger
from losslab.losses import LOSSES, build_loss
from losslab.losses.kernels import kernel_name, select_rows, verdicts

log = get_logger(__name__)

LOSS_ARGS = {"mile": {"gamma": 1.0}, "focal": {"gamma": 1.0}, "focal_lin": {"gamma": 2.0}}  # the rest: defaults
MODIFIERS = {"label_smoothing": 0.1, "z_loss": 1e-4}  # the memory comparison's "+modifiers" rows


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


def token_inputs(n: int, device: str = "cuda", seed: int = 0) -> dict[str, torch.Tensor]:
    """weighted's per-token weights, and rho1's reference losses — far apart, so that the bf16 and the
    materialised paths keep the same tokens (another kept set would be another loss, not a rounding error)."""
    g = torch.Generator(device=device).manual_seed(seed + 1)
    ref_ce = -100.0 * torch.randperm(n, device=device, generator=g).float()
    return {"weight": torch.rand(n, device=device, generator=g) * 2, "ref_ce": ref_ce}


def step_fn(loss_fn, hidden, weight, labels, inputs=None) -> Callable[[], None]:
    def run() -> None:
        hidden.grad = weight.grad = None
        out = loss_fn(hidden, weight, labels, token_inputs=inputs)
        out.loss.backward()

    return run


def liger_step_fn(liger, hidden, weight, labels) -> Callable[[], None]:
    def run() -> None:
        hidden.grad = weight.grad = None
        liger(weight, hidden, labels).backward()

    return run


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def check(name: str, hidden, weight, labels, counts, inputs) -> dict[str, float]:
    """Fused (default kernel) vs the materialised reference, same bf16 inputs."""
    results = []
    for fused in ("true", "false"):
        hidden.grad = weight.grad = None
        loss_fn = build_loss({"name": name, "fused": fused, **LOSS_ARGS.get(name, {})}, counts)
        out = loss_fn(hidden, weight, labels, token_inputs=inputs)
        out.loss.backward()
        results.append((out.loss.detach().float(), hidden.grad.clone(), weight.grad.clone()))
    (lf, hf, wf), (lr, hr, wr) = results
    return {"loss_rel": abs((lf - lr) / lr).item(), "grad_h_rel": rel(hf, hr), "grad_w_rel": rel(wf, wr)}


LIGER_MIN = (0, 8, 2)  # earlier versions give wrong gradients with per-token weights


def liger_loss_class(device: str):
    """-> (Liger's fused linear cross-entropy class, its version) or (None, why there is no Liger row)."""
    if device != "cuda":
        return None, "Liger's kernels need CUDA"
    try:
        import importlib.metadata as md

        version = md.version("liger-kernel")
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
    except Exception as e:  # not installed, or an import that fails on this stack: the other rows still run
        return None, f"liger-kernel cannot be imported: {type(e).__name__}: {e}"
    parts = tuple(int(x) for x in version.split(".")[:3] if x.isdigit())
    if parts < LIGER_MIN:
        return None, f"liger-kernel {version} < {'.'.join(map(str, LIGER_MIN))} (wrong gradients with weights)"
    return LigerFusedLinearCrossEntropyLoss, version


def liger_rows(hidden, weight, labels, warmup: int, iters: int, device: str) -> list[dict]:
    """Liger Kernel's fused linear cross-entropy (plain CE) as users run it (its default: grad-weight accumulated
    in the weight's dtype) and with fp32 accumulation (``accum_dtype``; losslab always accumulates in fp32).
    Where it cannot run, one row saying why (``skipped``)."""
    base = {"V": weight.shape[0], "loss": "ce"}
    cls, version = liger_loss_class(device)
    if cls is None:
        log.warning(f"no Liger rows: {version}")
        return [{**base, "impl": "liger", "skipped": version}]
    rows = []
    for impl, kwargs in (("liger", {}), ("liger-fp32-accum", {"accum_dtype": torch.float32})):
        try:
            liger = cls(**kwargs)
            ms, gib = timed(liger_step_fn(liger, hidden, weight, labels), warmup, iters, device)
        except Exception as e:
            log.warning(f"no {impl} row: {type(e).__name__}: {e}")
            rows.append({**base, "impl": impl, "skipped": f"{type(e).__name__}: {str(e)[:300]}"})
            continue
        rows.append({**base, "impl": impl, "ms": ms, "peak_gib": gib, "version": version})
    return rows


def bench_losses(
    n: int, d: int, vocabs: list[int], warmup: int, iters: int, device: str = "cuda", emit=lambda rows: None
) -> list[dict]:
    """``emit(rows)`` is called after every row (the script rewrites its JSON: a run cut short keeps its rows)."""
    rows: list[dict] = []
    for v in vocabs:
        hidden, weight, labels, counts = make_inputs(n, d, v, device)
        inputs = token_inputs(n, device)
        rows += liger_rows(hidden, weight, labels, warmup, iters, device)
        emit(rows)
        for name in sorted(LOSSES):
            errs = check(name, hidden, weight, labels, counts, inputs)
            for impl, cfg in (
                ("fused", {"fused": "true"}),
                ("fused-torch", {"fused": "true", "kernel": "torch"}),
                ("naive", {"fused": "false"}),
            ):
                loss_fn = build_loss({"name": name, **cfg, **LOSS_ARGS.get(name, {})}, counts)
                ms, gib = timed(step_fn(loss_fn, hidden, weight, labels, inputs), warmup, iters, device)
                row = {"V": v, "loss": name, "impl": impl, "ms": ms, "peak_gib": gib, **errs}
                if impl != "naive":  # which row kernel ran (auto: Triton on CUDA if it passed its self-check)
                    row["kernel"] = kernel_name(select_rows(cfg.get("kernel", "auto"), hidden.device, hidden.dtype))
                rows.append(row)
                emit(rows)
        hidden = weight = None
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def profiled_peak_mib(fn: Callable[[], None]) -> float:
    """Peak CPU memory allocated while fn() runs, from torch's profiler: its memory timeline (every tensor
    allocation and free, by category), summed over categories at each instant."""
    import tempfile
    import warnings

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # "deprecated": its replacement is CUDA-only
        prof.export_memory_timeline(f"{tmp}/timeline.json", device="cpu")
        _, sizes = json.loads(Path(f"{tmp}/timeline.json").read_text())
    return max((sum(s) for s in sizes), default=0) / 2**20


def cpu_inputs(n: int, d: int, v: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The CPU benchmarks' problem, seeded: hidden [n, d] and head [v, d] (both requiring grad), labels [n] and
    token counts [v] (for PDL)."""
    g = torch.Generator().manual_seed(0)
    hidden = (torch.randn(n, d, generator=g) * 0.5).requires_grad_()
    weight = (torch.randn(v, d, generator=g) * 0.02).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=g)
    counts = torch.randint(0, 10_000, (v,), generator=g)
    return hidden, weight, labels, counts


def cpu_memory(n: int, d: int, v: int, emit=lambda rows: None) -> list[dict]:
    """Issue #17: the fused path's peak memory for every loss (and with label smoothing and z-loss) next to fused
    CE's, fp32 on the CPU; the target is <= 1.10x."""
    hidden, weight, labels, counts = cpu_inputs(n, d, v)
    inputs = token_inputs(n, "cpu")
    rows: list[dict] = []
    for name in ["ce", *sorted(set(LOSSES) - {"ce"})]:
        for mods in ({}, MODIFIERS):
            loss_fn = build_loss({"name": name, "fused": "true", **LOSS_ARGS.get(name, {}), **mods}, counts)
            step = step_fn(loss_fn, hidden, weight, labels, inputs)
            step()  # warm-up: first-use allocations (and a kernel's self-check) are not the loss's
            peak = profiled_peak_mib(step)
            base = next((r["peak_mib"] for r in rows if r["loss"] == "ce" and r["modifiers"] == bool(mods)), peak)
            rows.append({"loss": name, "modifiers": bool(mods), "peak_mib": peak, "vs_ce": peak / base})
            print(f"| {name}{' +ls +z' if mods else ''} | {peak:.1f} | {peak / base:.3f}x |", flush=True)
            emit(rows)
    return rows


CPU_SPEED_LOSSES = ("ce", "mile", "focal", "pdl")


def cpu_speed(
    sizes: list[tuple[int, int]], d: int, precisions: list[str], iters: int, emit=lambda rows: None
) -> list[dict]:
    """Issue #18: forward + backward time on the CPU of ``F.cross_entropy`` over materialised logits (what HF
    models do: logits upcast to fp32), losslab's unfused CE (materialised, autograd) and the fused CE, MiLe, focal
    and PDL, at each (N, V) and precision (fp32, or bf16 autocast over fp32 inputs), steps alternating between
    the implementations (a busy machine hits all alike); -> rows with the median ms, its min-max, and the ratios
    fused CE / F.cross_entropy and each fused loss / fused CE."""
    rows: list[dict] = []
    for (n, v), precision in ((size, p) for size in sizes for p in precisions):
        times = _alternating_times(_cpu_speed_impls(n, d, v, precision == "bf16"), iters)
        med = {k: sorted(t)[len(t) // 2] for k, t in times.items()}
        for name, t in times.items():
            row = {"N": n, "d": d, "V": v, "precision": precision, "impl": name, "ms": med[name],
                   "ms_min": min(t), "ms_max": max(t), "iters": iters}  # fmt: skip
            if name == "fused ce":
                row["vs_F.cross_entropy"] = med[name] / med["F.cross_entropy"]
            elif name.startswith("fused"):
                row["vs_fused_ce"] = med[name] / med["fused ce"]
            rows.append(row)
            emit(rows)
    return rows


def _cpu_speed_impls(n: int, d: int, v: int, autocast: bool) -> dict[str, Callable[[], None]]:
    """name -> one forward + backward on the same [n, d] hidden, [v, d] head and labels."""
    import torch.nn.functional as F

    hidden, weight, labels, counts = cpu_inputs(n, d, v)

    def step(fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            hidden.grad = weight.grad = None
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = fn()
            loss.backward()

        return run

    naive = build_loss({"name": "ce", "fused": "false"})
    impls = {
        "F.cross_entropy": step(lambda: F.cross_entropy(F.linear(hidden, weight).float(), labels)),
        "naive ce": step(lambda: naive(hidden, weight, labels).loss),
    }
    for name in CPU_SPEED_LOSSES:
        fn = build_loss({"name": name, "fused": "true", **LOSS_ARGS.get(name, {})}, counts)
        impls[f"fused {name}"] = step(lambda fn=fn: fn(hidden, weight, labels).loss)
    return impls


def _alternating_times(impls: dict[str, Callable[[], None]], iters: int) -> dict[str, list[float]]:
    """One warm-up call each (first-use allocations, a loss's tables), then ``iters`` rounds in turn; ms."""
    for fn in impls.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in impls}
    for _ in range(iters):
        for name, fn in impls.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


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
    parser.add_argument("--tokens", type=int, nargs="+", default=[16384], dest="tokens_list",
                        help="N; several only with --cpu-speed")  # fmt: skip
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--vocab", type=int, nargs="+", default=[50304, 32000])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--train-step", action="store_true")
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--preset", default="468m", help="model of the --train-step comparison")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--cpu-memory", action="store_true",
                        help="only the fused path's peak memory of every loss vs CE's, on the CPU (issue #17): "
                             "N = --tokens, d = --dim, V = --vocab (first)")  # fmt: skip
    parser.add_argument("--cpu-speed", action="store_true",
                        help="only the CPU speed comparison (issue #18): F.cross_entropy, unfused and fused CE, fused "
                             "mile / focal / pdl at every --tokens x --vocab, --precision, d = --dim")  # fmt: skip
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"],
                        help="--cpu-speed: fp32, or bf16 autocast over fp32 inputs")  # fmt: skip
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    args.tokens = args.tokens_list[0]
    if args.cpu_speed:
        sizes = [(n, v) for n in args.tokens_list for v in args.vocab]
        print(f"# CPU ({torch.get_num_threads()} threads), torch {torch.__version__}, d={args.dim}: forward + "
              f"backward, median of {args.iters} alternating steps\n| N | V | precision | impl | ms (min-max) | "
              "ratio |\n|---|---|---|---|---|---|")  # fmt: skip
        result = {"d": args.dim, "torch": torch.__version__, "threads": torch.get_num_threads()}

        def emit_speed(rows: list[dict]) -> None:
            r = rows[-1]
            ratio = r.get("vs_F.cross_entropy") or r.get("vs_fused_ce")
            what = " vs F.cross_entropy" if "vs_F.cross_entropy" in r else " vs fused ce" if ratio else ""
            print(f"| {r['N']} | {r['V']} | {r['precision']} | {r['impl']} | {r['ms']:.1f} ({r['ms_min']:.1f}-"
                  f"{r['ms_max']:.1f}) | {f'{ratio:.3f}x{what}' if ratio else ''} |", flush=True)  # fmt: skip
            if args.json:
                Path(args.json).write_text(json.dumps({**result, "cpu_speed": rows}, indent=2))

        cpu_speed(sizes, args.dim, args.precision, args.iters, emit_speed)
        return 0
    if args.cpu_memory:
        print(f"# CPU, torch {torch.__version__}, fp32, N={args.tokens}, d={args.dim}, V={args.vocab[0]}: "
              "fused forward + backward, peak memory from torch's profiler\n| loss | peak MiB | vs fused CE |\n"
              "|---|---|---|")  # fmt: skip
        result = {"N": args.tokens, "d": args.dim, "V": args.vocab[0], "torch": torch.__version__}

        def emit_memory(rows: list[dict]) -> None:
            if args.json:
                Path(args.json).write_text(json.dumps({**result, "cpu_memory": rows}, indent=2))

        rows = cpu_memory(args.tokens, args.dim, args.vocab[0], emit_memory)
        return 0 if all(r["vs_ce"] <= 1.10 for r in rows) else 1
    if args.device == "cuda" and not torch.cuda.is_available():
        return fail("bench_loss.py needs a CUDA GPU (--device cpu only checks the script)", prefix="")
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"# {name}, torch {torch.__version__}, N={args.tokens}, d={args.dim}, bf16")
    result = {"device": name, "torch": torch.__version__, "N": args.tokens, "d": args.dim, "losses": []}

    def emit(rows: list[dict]) -> None:
        result["losses"] = rows
        result["self_checks"] = {k: {"ok": v.ok, "reason": v.reason} for k, v in verdicts().items()}
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))

    rows = bench_losses(args.tokens, args.dim, args.vocab, args.warmup, args.iters, args.device, emit)
    print("| V | loss | impl | ms (fwd+bwd) | peak GiB | loss rel err | grad_h rel err | grad_w rel err |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "skipped" in r:
            print(f"| {r['V']} | {r['loss']} | {r['impl']} | skipped: {r['skipped']} | | | | |")
            continue
        errs = " | ".join(f"{r[k]:.1e}" if k in r else "" for k in ("loss_rel", "grad_h_rel", "grad_w_rel"))
        print(f"| {r['V']} | {r['loss']} | {r['impl']} | {r['ms']:.2f} | {r['peak_gib']:.2f} | {errs} |")
    if args.train_step:
        steps = bench_train_step(args.warmup, args.iters, args.micro_batch, args.seq, args.preset, args.device)
        print(f"| {args.preset} step | ms | tokens/s | peak GiB |\n|---|---|---|---|")
        for r in steps:
            print(f"| {r['loss']} | {r['ms']:.1f} | {r['tokens_per_s']:.0f} | {r['peak_gib']:.1f} |")
        result["train_step"] = steps
        emit(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
