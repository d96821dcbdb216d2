"""Where a fused loss's time goes: torch's profiler over forward + backward of each loss, fp32 and bf16 autocast,
one markdown row per (loss, precision) with the total self CPU time and the top operators (ms per call).
``python scripts/profile_loss.py --losses ce mile --tokens 1024 --vocab 32000 --dim 128``; for a before/after table,
run the same file from a checkout of the earlier commit too (it runs the code of the checkout it lies in)."""

from __future__ import annotations

import argparse
import sys

import _bootstrap  # noqa: F401  (this checkout first on sys.path)
import torch
from torch.profiler import profile


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--losses", nargs="+", default=["ce", "mile"])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--iters", type=int, default=3, help="profiled calls (after two warm-up calls)")
    parser.add_argument("--top", type=int, default=7)
    args = parser.parse_args(argv)

    from losslab.losses import build_loss
    from scripts.bench_loss import cpu_inputs

    hidden, weight, labels, counts = cpu_inputs(args.tokens, args.dim, args.vocab)  # the speed benchmark's problem

    print(f"# {torch.get_num_threads()} threads, torch {torch.__version__}, N {args.tokens}, d {args.dim}, "
          f"V {args.vocab}: self CPU ms per forward + backward, mean of {args.iters} calls")  # fmt: skip
    print("| loss | precision | total ms | top operators (ms) |\n|---|---|---|---|")
    for name in args.losses:
        loss_fn = build_loss({"name": name, "fused": "true"}, counts)
        for precision in args.precision:

            def step(loss_fn=loss_fn, bf16: bool = precision == "bf16") -> None:
                hidden.grad = weight.grad = None
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    loss = loss_fn(hidden, weight, labels).loss
                loss.backward()

            step(), step()  # first-use allocations and a kernel's self-check are not the loss's
            with profile() as prof:
                for _ in range(args.iters):
                    step()
            ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
            ms = [(e.key, e.self_cpu_time_total / 1e3 / args.iters) for e in ops]
            # three significant digits: a toy size takes well under a millisecond, which "0" would hide
            top = ", ".join(f"`{k}` {t:.3g}" for k, t in ms[: args.top])
            print(f"| {name} | {precision} | {sum(t for _, t in ms):.3g} | {top} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
