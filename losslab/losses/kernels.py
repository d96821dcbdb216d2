"""Which row kernel the fused loss runs (``loss.kernel``), and the check a kernel passes before it is trusted.

``loss.kernel`` is one of
- ``auto``: Triton on CUDA when it is installed, else torch;
- ``torch``: plain torch ops (``rows.TorchRows``), the reference every other kernel is checked against;
- ``triton``: the kernels of ``triton_rows.py`` (``rows.TritonRows``; on CPU tensors only under
  ``TRITON_INTERPRET=1``);
- ``"package.module:Class"``: a plug-in ``rows.RowKernel`` (a class or object with its members, checked when the
  loss is built), e.g. a kernel under development.

Self-check: the Triton kernels were written and tested in Triton's CPU interpreter, and a GPU can compile them
differently. So on first use per (kernel, device, logits dtype), a kernel other than torch runs the fused path
on a small random problem next to the torch kernel — loss, per-row CE, entropy and logsumexp, and both
gradients (hidden and head weight), with every term of the gradient (label smoothing's, the z-loss's) in use —
and if it raises or disagrees, the fused path uses torch instead and says why in one warning line. The verdict
is cached for the process (``verdicts()`` lists them); the check costs a few milliseconds on a GPU, well under a
second in the interpreter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from losslab.log import get_logger
from losslab.losses.blocks import Block, FusedOptions, forward_blocks
from losslab.losses.config import IGNORE_INDEX
from losslab.losses.plugins import import_plugin
from losslab.losses.rows import Coefs, RowKernel, TorchRows, TritonRows, missing

log = get_logger(__name__)

BUILTIN = ("auto", "torch", "triton")
# The check's problem: several rows and two blocks (the last ragged) so every code path runs; a vocabulary
# above the Triton kernels' 4096-column tile, so their loop over tiles runs more than once.
CHECK_ROWS, CHECK_DIM, CHECK_VOCAB, CHECK_CHUNK = 24, 32, 5000, 16
# Relative (norm) error allowed against the torch kernel: both accumulate in fp32, so in fp32 they agree to
# rounding; in bf16 / fp16 the gradient blocks are rounded to the logits' dtype in a different order.
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 2e-2, torch.float16: 1e-2}
# the clamped entropy at a clamp large enough (the official 1e-8 changes it by 1e-5 here) to catch one ignored
CLAMPED = FusedOptions(mean_z=True, entropy_clamp=1e-3)


@dataclass(frozen=True)
class Verdict:
    ok: bool
    reason: str = ""
    """Empty when ok; else the exception or the mismatching quantities."""


_verdicts: dict[tuple[str, str, torch.dtype], Verdict] = {}


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def kernel_name(rows: object) -> str:
    cls = rows if isinstance(rows, type) else type(rows)
    return f"{cls.__module__}:{cls.__qualname__}"


def resolve(kernel: str) -> RowKernel | None:
    """A named kernel -> its implementation; ``auto`` -> None (decided per device). ValueError naming
    ``loss.kernel`` for anything else."""
    if kernel == "auto":
        return None
    if kernel == "torch":
        return TorchRows
    if kernel == "triton":
        if not triton_available():
            raise ValueError("loss.kernel=triton but triton is not installed")
        return TritonRows
    module, sep, attr = kernel.partition(":")
    if not sep or not module or not attr:
        raise ValueError(f"loss.kernel must be auto, torch, triton or 'package.module:Class', got {kernel!r}")
    rows = import_plugin(kernel, "loss.kernel")
    lacks = missing(rows)
    if lacks:
        raise ValueError(f"loss.kernel={kernel!r} is not a row kernel: it lacks {', '.join(lacks)} "
                         "(see losslab.losses.rows.RowKernel)")  # fmt: skip
    return rows


def select_rows(kernel: str, device: torch.device, dtype: torch.dtype) -> RowKernel:
    """The kernel the fused path runs for logits of ``dtype`` on ``device``: the one asked for if it passed its
    self-check there, else torch. float64 (reference tests) always runs torch."""
    if kernel == "torch" or dtype == torch.float64:
        return TorchRows
    rows = resolve(kernel)
    if rows is None:  # auto
        if device.type != "cuda" or not triton_available():
            return TorchRows
        rows = TritonRows
    return rows if check(rows, device, dtype).ok else TorchRows


def check(rows: RowKernel, device: torch.device, dtype: torch.dtype) -> Verdict:
    """The cached verdict of ``rows`` on (device, dtype), running the self-check the first time (one warning
    line on stderr if it fails)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (kernel_name(rows), str(device), dtype)
    if key not in _verdicts:
        verdict = self_check(rows, device, dtype)
        _verdicts[key] = verdict
        if not verdict.ok:
            log.warning(
                f"warning: loss kernel {key[0]} failed its self-check on {device} in {str(dtype)[6:]} "
                f"({verdict.reason}); the fused loss uses the torch kernel instead"
            )
    return _verdicts[key]


def verdicts() -> dict[str, Verdict]:
    """Every self-check run in this process: 'kernel on device dtype' -> verdict (for benchmark reports)."""
    return {f"{k} on {dev} {str(dt)[6:]}": v for (k, dev, dt), v in _verdicts.items()}


def _check_problem(device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    gen = torch.Generator(device=device).manual_seed(1234)
    hidden = torch.randn(CHECK_ROWS, CHECK_DIM, device=device, generator=gen).to(dtype)  # [n, d]
    # logits of a few units: softmax neither uniform nor one-hot
    weight = (torch.randn(CHECK_VOCAB, CHECK_DIM, device=device, generator=gen) * 0.6).to(dtype)  # [V, d]
    labels = torch.randint(0, CHECK_VOCAB, (CHECK_ROWS,), device=device, generator=gen)  # [n]
    labels[3] = IGNORE_INDEX
    labels[5] = CHECK_VOCAB - 1  # the last column of the last (ragged) tile
    return hidden, weight, labels


def _check_block(b: Block, need_coefs: bool) -> tuple[Tensor, Tensor, Coefs]:
    """A loss that uses every coefficient of the gradient: MiLe-like weights (1 + H), label smoothing 0.1 (the
    mean logit) and a z-loss-like lse term, masked like the real ones."""
    valid = b.valid
    w = (1.0 + b.entropy) * valid
    e = 0.1
    terms = w * ((1 - e) * b.ce + e * (b.lse - b.mean_z)) + 0.1 * b.lse.square() * valid
    return terms, w, Coefs(w + 0.2 * b.lse * valid, w * (1 - e), w * (e / b.vocab))


def self_check(rows: RowKernel, device: torch.device, dtype: torch.dtype) -> Verdict:
    """Run the fused path with ``rows`` and with the torch kernel on the same small random problem in ``dtype``
    on ``device`` — with the exact entropy and with the official code's clamped one; -> whether they agree, and
    if not, why."""
    tol = TOLERANCE.get(dtype, 2e-2)
    hidden, weight, labels = _check_problem(device, dtype)
    args = (hidden, weight, labels, _check_block, CHECK_CHUNK, True)
    errors, mismatches = [], []
    for variant, opts in (("", FusedOptions(mean_z=True)), (" (clamped entropy)", CLAMPED)):
        # whatever the caller's context (inference mode, autocast), the check runs the same: else a context that
        # breaks it would disable a good kernel for the whole process
        with torch.inference_mode(False), torch.no_grad(), torch.autocast(device.type, enabled=False):
            try:
                got = forward_blocks(*args, rows, opts)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)  # a kernel fault surfaces here, not in the next user op
            except Exception as e:  # any failure of the kernel under test (compile errors have many types)
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                errors.append(f"{type(e).__name__}{variant}: {first}")
                continue
            want = forward_blocks(*args, TorchRows, opts)
        for name, a, b in zip(("loss", "ce", "entropy", "w", "lse", "grad_h", "grad_w"), got, want, strict=True):
            if a.shape != b.shape:
                mismatches.append(f"{name}{variant} shape {tuple(a.shape)} != {tuple(b.shape)}")
                continue
            err = ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()
            if not err <= tol:  # NaN fails too
                mismatches.append(f"{name}{variant} rel err {err:.1e} > {tol:.0e}")
    reasons = errors + (["mismatch against torch: " + ", ".join(mismatches)] if mismatches else [])
    return Verdict(not reasons, "; ".join(reasons))
