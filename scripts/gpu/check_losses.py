"""Every fused loss configuration on the GPU in bf16 against a float64 reference, as JSON (stage 1 of
``scripts/gpu/validate.sh``): loss and both gradients, with the Triton kernels (as a user gets them: through
``build_loss``, after their self-check) and with the torch kernel.

    python scripts/gpu/check_losses.py --json OUT/kernels.json            # N=2048, d=256, V=50304 on CUDA
    python scripts/gpu/check_losses.py --device cpu --tokens 64 --dim 16 --vocab 300 --json k.json  # dry run

The reference is the test suite's (``tests/test_losses.naive_loss``, written from the papers' formulas and
sharing no code with ``losslab.losses``). The JSON is rewritten after every row, so a run cut short keeps what it
measured. Exit 1 if any row is out of tolerance or the Triton kernels failed their self-check.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import _bootstrap  # noqa: F401  (this checkout first on sys.path)
import torch

from losslab.log import fail
from losslab.losses import LossConfig, build_loss
from losslab.losses.kernels import kernel_name, select_rows, verdicts
from tests.test_losses import FUSED_CASES, naive_loss, rel_err

# bf16 inputs and gradients against float64: the loss is accumulated in fp32, the gradients are bf16 tensors.
TOL_LOSS, TOL_GRAD = 2e-3, 2e-2


def inputs(n: int, d: int, v: int, device: str):
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(n, d, device=device, generator=g).bfloat16()  # [n, d]
    weight = (torch.randn(v, d, device=device, generator=g) * 0.05).bfloat16()  # [V, d]
    labels = torch.randint(0, v, (n,), device=device, generator=g)  # [n]
    labels[::7] = -100
    counts = torch.randint(0, 1000, (v,), generator=torch.Generator().manual_seed(0))  # pdl's corpus counts
    # rho1's reference losses far apart, so that bf16 and float64 keep the same tokens (another kept set would be
    # another loss, not a rounding error); weighted's weights with zeros
    weights = torch.rand(n, device=device, generator=g) * 2
    weights[::5] = 0.0
    inputs = {"weight": weights, "ref_ce": -100.0 * torch.randperm(n, device=device, generator=g).float()}
    return hidden, weight, labels, counts, inputs


def check(cfg: dict, kernel: str, hidden, weight, labels, counts, inputs) -> dict:
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    loss_cfg = LossConfig(**{**cfg, "fused": "true", "kernel": kernel})
    start = time.perf_counter()
    out = build_loss(loss_cfg, counts)(h, w, labels, token_inputs=inputs)
    gh, gw = torch.autograd.grad(out.loss, (h, w))
    ms = (time.perf_counter() - start) * 1e3
    h64 = hidden.double().requires_grad_()
    w64 = weight.double().requires_grad_()
    ref = naive_loss(h64, w64, labels, loss_cfg, counts.to(hidden.device), inputs)
    rh, rw = torch.autograd.grad(ref, (h64, w64))
    row = {
        "kernel": kernel,
        "ran": kernel_name(select_rows(kernel, hidden.device, hidden.dtype)),
        "loss_rel": abs(out.loss.item() - ref.item()) / abs(ref.item()),
        "grad_h_rel": rel_err(gh, rh),
        "grad_w_rel": rel_err(gw, rw),
        "first_call_ms": ms,
    }
    row["ok"] = row["loss_rel"] < TOL_LOSS and row["grad_h_rel"] < TOL_GRAD and row["grad_w_rel"] < TOL_GRAD
    if kernel == "triton" and not row["ran"].endswith(":TritonRows"):
        row["ok"] = False  # the Triton kernels failed their self-check: the row measured the torch fallback
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=50304)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--kernels", nargs="+", default=["triton", "torch"])
    parser.add_argument("--json", required=True)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        return fail("check_losses.py needs a CUDA GPU (--device cpu only checks the script)", prefix="")
    result = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "torch": torch.__version__,
        "dtype": "bfloat16",
        "N": args.tokens,
        "d": args.dim,
        "V": args.vocab,
        "tol_loss": TOL_LOSS,
        "tol_grad": TOL_GRAD,
        "rows": [],
    }
    hidden, weight, labels, counts, token_inputs = inputs(args.tokens, args.dim, args.vocab, args.device)
    failed = 0
    for label, cfg in FUSED_CASES:
        for kernel in args.kernels:
            try:
                row = {"case": label, "config": cfg, **check(cfg, kernel, hidden, weight, labels, counts, token_inputs)}
            except Exception as e:  # report and go on: one broken configuration must not hide the others
                row = {"case": label, "config": cfg, "kernel": kernel, "ok": False, "error": f"{type(e).__name__}: {e}"}
            failed += not row["ok"]
            result["rows"].append(row)
            result["self_checks"] = {k: {"ok": v.ok, "reason": v.reason} for k, v in verdicts().items()}
            Path(args.json).write_text(json.dumps(result, indent=1))
            errs = " ".join(f"{k}={row[k]:.1e}" for k in ("loss_rel", "grad_h_rel", "grad_w_rel") if k in row)
            print(
                f"{'ok  ' if row['ok'] else 'FAIL'} {label:<12} {kernel:<7} ran {row.get('ran', '-')} {errs}"
                f"{' ' + row['error'] if 'error' in row else ''}",
                flush=True,
            )
    print(f"{len(result['rows']) - failed} of {len(result['rows'])} fused configurations within tolerance")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
