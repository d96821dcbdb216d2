"""The two paths from (hidden, head weight, labels) to per-token statistics and the loss numerator: the entry
points ``module.py`` calls.

``reference``: materialises the [N, V] logits and lets autograd do the rest. Simple, obviously right,
memory-hungry: the baseline for every test and benchmark.

``fused``: never holds more than a [chunk, V] block of logits. The gradients w.r.t. hidden and head weight are
computed inside the forward, block by block, and the backward only scales them (the Liger-Kernel strategy).
The modules under it, each importing only those listed before it:

- ``rows.py``: the ``RowKernel`` protocol and the built-in row kernels (a block's statistics: lse, CE, entropy);
- ``grads.py``: a block's gradients w.r.t. hidden and head weight from its per-row coefficients ``Coefs``;
- ``blocks.py``: the block loop, ``forward_blocks``: statistics, row terms (``block_fn``), gradients;
- ``kernels.py``: which kernel runs (``loss.kernel``), and the self-check a kernel passes before it is trusted;
- here: the block size, the CPU's precision, the autograd function, and ``token_ce`` for scoring.

``block_fn(rows: Block, need_coefs) -> (terms [c], w [c], Coefs | None)`` applies the loss and the masks
(``module.py``); ``Block``, ``Coefs``, ``FusedOptions`` and ``accumulation_dtype`` are part of this module's
interface (``__all__``), defined where the block loop needs them.

On a GPU the fused path is bound by launches as much as by FLOPs, so each block costs few: the Triton
statistics kernel writes straight into the [N] outputs, closed-form coefficients skip autograd, and the
gradient matmuls write in place.
"""

from __future__ import annotations

import contextlib
import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from losslab.losses.blocks import Block, BlockFn, FusedOptions, accumulation_dtype, forward_blocks, logits_dtype
from losslab.losses.config import IGNORE_INDEX
from losslab.losses.kernels import select_rows
from losslab.losses.rows import Coefs

__all__ = [
    "CHUNK_BYTES",
    "CPU_CHUNK_BYTES",
    "Block",
    "BlockFn",
    "Coefs",
    "FusedOptions",
    "Reference",
    "accumulation_dtype",
    "default_chunk_rows",
    "entropy_from_logits",
    "fused",
    "reference",
    "slow_low_precision_cpu",
    "token_ce",
]

CHUNK_BYTES = 64 * 2**20
CPU_CHUNK_BYTES = 8 * 2**20
"""On a CPU every row-wise op is a pass over the block, and smaller blocks keep more of it in the cache; on the
project's 2-core machine the full step is within noise from 128 to 1024 rows (``docs/benchmarks.md``), so the
smallest (least memory) that keeps the ``dim``-row floor."""


def entropy_from_logits(z: Tensor, clamp: float = 0.0) -> Tensor:
    """z [n, V] (detached) -> H [n] = -sum_v p_v log p_v, natural log; with ``clamp`` > 0 every p_v is first
    clamped below at it (the official MiLe code's entropy)."""
    if clamp:
        p = torch.softmax(z, dim=-1).clamp_min_(clamp)
        return -(p * p.log()).sum(-1)
    logp = F.log_softmax(z, dim=-1)
    return -(logp.exp() * logp).sum(-1)


class Reference(NamedTuple):
    """The reference path's per-row tensors: ce, lse and mean_z carry gradient; entropy is detached."""

    ce: Tensor
    lse: Tensor
    mean_z: Tensor
    entropy: Tensor


def reference(hidden: Tensor, weight: Tensor, labels: Tensor, entropy_clamp: float = 0.0) -> Reference:
    # hidden [N, d], weight [V, d], labels [N]
    acc = accumulation_dtype(hidden.dtype)
    z = F.linear(hidden, weight).to(acc)  # [N, V], materialised
    ce = F.cross_entropy(z, labels, ignore_index=IGNORE_INDEX, reduction="none")  # [N], 0 where ignored
    return Reference(ce, torch.logsumexp(z, dim=-1), z.mean(-1), entropy_from_logits(z.detach(), entropy_clamp))


def default_chunk_rows(vocab: int, dim: int, acc: torch.dtype, device: str = "cuda") -> int:
    """Rows per block of logits: at least ``dim``, so that the fp32 accumulation of the head-weight gradient (an
    addmm with inner dimension = rows, reading and writing all of [V, d] every block) stays compute-bound rather
    than memory-bound (on a GPU also so that the logits block, in bf16, is about half that accumulator); beyond
    that, a ``CHUNK_BYTES`` block on a GPU (fewer, larger blocks: fewer launches) and a ``CPU_CHUNK_BYTES`` one
    on a CPU (passes over the block closer to the cache)."""
    row_bytes = vocab * torch.finfo(acc).bits // 8
    return max(dim, (CPU_CHUNK_BYTES if device == "cpu" else CHUNK_BYTES) // row_bytes, 1)


@functools.cache  # a property of the machine, asked on every fused call: once per dtype
def slow_low_precision_cpu(dtype: torch.dtype) -> bool:
    """True when ``dtype`` is bf16 / fp16 and this CPU has no native matmul for it (no AVX512-BF16 / AMX /
    AVX512-FP16): oneDNN then emulates it, 10-50x slower than fp32 (``docs/benchmarks.md``)."""
    check = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}.get(dtype)
    if check is None:
        return False
    try:
        return not getattr(torch.ops.mkldnn, check)()
    except (AttributeError, RuntimeError):  # a build without oneDNN: no fast low-precision path either
        return True


class _ChunkedLinearLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, block_fn, chunk_rows, need_grad, rows, opts):  # type: ignore[override]
        out = forward_blocks(hidden, weight, labels, block_fn, chunk_rows, need_grad, rows, opts)
        if need_grad:
            ctx.save_for_backward(out.grad_h, out.grad_w)
        ctx.backward_done = False
        ctx.mark_non_differentiable(out.ce, out.entropy, out.w, out.lse)
        return out.numerator, out.ce, out.entropy, out.w, out.lse

    @staticmethod
    def backward(ctx, g_num, *_unused):  # type: ignore[override]
        if ctx.backward_done:
            raise RuntimeError("the fused loss scales its precomputed gradients in place: backward runs once")
        ctx.backward_done = True
        grad_h, grad_w = ctx.saved_tensors
        grad_h.mul_(g_num)
        grad_w.mul_(g_num)
        return grad_h, grad_w, None, None, None, None, None, None


def fused(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    block_fn: BlockFn,
    chunk_rows: int = 0,
    kernel: str = "auto",
    opts: FusedOptions | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> (numerator (differentiable), ce, entropy, w, lse) [N] detached. ``kernel``: auto | torch | triton |
    "package.module:Class" (``losslab.losses.kernels``); any kernel other than torch is checked against it on
    first use per device and dtype, and replaced by it if it fails."""
    device = hidden.device.type
    dtype = logits_dtype(hidden, weight)
    if device == "cpu" and slow_low_precision_cpu(dtype):
        # bf16 / fp16 (autocast or a low-precision model) on a CPU that only emulates it: the head's matmuls in
        # fp32 instead — faster there, and more exact, not less. The casts are differentiable (the gradients
        # come back in the inputs' dtypes) and cost [N, d] (+ [V, d] for a low-precision weight), not [N, V].
        hidden, weight, dtype = hidden.float(), weight.float(), torch.float32
    acc = accumulation_dtype(hidden.dtype)
    chunk_rows = chunk_rows or default_chunk_rows(weight.shape[0], weight.shape[1], acc, device)
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    rows = select_rows(kernel, hidden.device, dtype)
    # leaving autocast on would cast the fp32 operands back down (re-entering it would reset its dtype: no)
    upcast = dtype == torch.float32 and torch.is_autocast_enabled(device)
    with torch.autocast(device, enabled=False) if upcast else contextlib.nullcontext():
        return _ChunkedLinearLoss.apply(hidden, weight, labels, block_fn, chunk_rows, need_grad, rows, opts)


def _ce_block(b: Block, need_coefs: bool) -> tuple[Tensor, Tensor, Coefs | None]:
    """Plain CE as a ``block_fn``: l = ce, w = 1 (d l / d z = softmax - onehot: a = b = 1)."""
    ones = torch.ones_like(b.ce)  # [c]
    return b.ce, ones, Coefs(ones, ones) if need_coefs else None


def token_ce(hidden: Tensor, weight: Tensor, labels: Tensor) -> Tensor:
    """[N] cross-entropy of each row's label (0 where ignored), chunked: the [N, V] logits never exist.
    For scoring (a reference model, held-out loss), not for training: no gradient is kept."""
    with torch.no_grad():  # nothing reads the entropy: a kernel that can skip it does
        return fused(hidden, weight, labels, _ce_block, opts=FusedOptions(entropy=False))[1]
