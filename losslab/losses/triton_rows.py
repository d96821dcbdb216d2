"""Triton kernels for the row-wise part of the fused loss on a [c, V] block of logits.

The matmuls stay with cuBLAS; these two kernels replace the chain of elementwise torch ops over the block
(upcast, logsumexp, exp, dot, scatter, scale, downcast — about seven passes) with two passes:

- ``row_stats``: one online pass per row -> logsumexp, cross-entropy (0 for an ignored label), entropy and,
  for label smoothing, the mean logit, with running max m, d = sum e^(z-m), s = sum e^(z-m) z  =>
  lse = m + log d,  H = lse - s / d.
- ``row_grad``: overwrites the logits in place with dl/dz = a * softmax - b * onehot(target) - u (per-row
  coefficients: ``rows.Coefs``), in the logits' dtype, ready for the two gradient matmuls.

They also run under ``TRITON_INTERPRET=1`` on CPU tensors, which is how the tests check them on machines
without a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from losslab.losses.config import IGNORE_INDEX


@triton.jit
def _row_stats_kernel(
    z_ptr, z_stride, y_ptr, lse_ptr, ce_ptr, ent_ptr, mz_ptr, V, ignore_index, clamp, BLOCK_V: tl.constexpr,
    HAS_MZ: tl.constexpr, CLAMP: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * z_stride
    m = tl.full((), float("-inf"), tl.float32)
    d = tl.zeros((), tl.float32)
    s = tl.zeros((), tl.float32)
    total = tl.zeros((), tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        z = tl.load(z_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
        z0 = tl.where(mask, z, 0.0)  # no 0 * -inf at masked columns
        m_new = tl.maximum(m, tl.max(z, axis=0))
        scale = tl.exp(m - m_new)
        e = tl.exp(z - m_new)  # 0 at masked columns
        d = d * scale + tl.sum(e, axis=0)
        s = s * scale + tl.sum(e * z0, axis=0)
        if HAS_MZ:
            total += tl.sum(z0, axis=0)
        m = m_new
    lse = m + tl.log(d)
    tl.store(lse_ptr + row, lse)
    ent = lse - s / d
    if CLAMP:  # the official MiLe code's entropy: every probability clamped at `clamp` first; a second read
        acc = tl.zeros((), tl.float32)
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = cols < V
            z = tl.load(z_row + cols, mask=mask, other=0.0).to(tl.float32)
            p = tl.maximum(tl.exp(z - lse), clamp)
            acc += tl.sum(tl.where(mask, p * tl.log(p), 0.0), axis=0)
        ent = -acc
    tl.store(ent_ptr + row, ent)
    if HAS_MZ:
        tl.store(mz_ptr + row, total / V)
    y = tl.load(y_ptr + row)
    valid = y != ignore_index
    zy = tl.load(z_row + tl.where(valid, y, 0)).to(tl.float32)
    tl.store(ce_ptr + row, tl.where(valid, lse - zy, 0.0))


@triton.jit
def _row_grad_kernel(
    z_ptr, z_stride, y_ptr, lse_ptr, a_ptr, b_ptr, u_ptr, V, ignore_index, BLOCK_V: tl.constexpr,
    HAS_U: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * z_stride
    lse = tl.load(lse_ptr + row)
    a = tl.load(a_ptr + row)
    b = tl.load(b_ptr + row)
    if HAS_U:  # noqa: SIM108 (a constexpr branch, resolved when the kernel is compiled)
        u = tl.load(u_ptr + row)
    else:
        u = 0.0
    y = tl.load(y_ptr + row)
    y = tl.where(y != ignore_index, y, -1)  # an ignored row has no one-hot term (and zero coefficients)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        z = tl.load(z_row + cols, mask=mask, other=0.0).to(tl.float32)
        g = a * tl.exp(z - lse) - tl.where(cols == y, b, 0.0) - u
        tl.store(z_row + cols, g.to(z_ptr.dtype.element_ty), mask=mask)


def _block(V: int) -> int:
    return min(triton.next_power_of_2(V), 4096)


def row_stats(
    z: torch.Tensor,
    labels: torch.Tensor,
    ce: torch.Tensor | None = None,
    ent: torch.Tensor | None = None,
    mz: torch.Tensor | None = None,
    entropy_clamp: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """z [c, V] (any float dtype, unit stride in V), labels [c] -> (lse, ce, entropy), fp32 [c]; ce is 0 where
    the label is ignored. ``ce`` / ``ent``: contiguous fp32 [c] outputs to write into (e.g. slices of [N]);
    ``mz``: one for the mean logit, computed only when given. ``entropy_clamp`` > 0: the entropy of the
    probabilities clamped below at it (-sum max(p, c) log max(p, c)), as the official MiLe code computes it."""
    c, V = z.shape
    lse = torch.empty(c, dtype=torch.float32, device=z.device)
    ce = torch.empty_like(lse) if ce is None else ce
    ent = torch.empty_like(lse) if ent is None else ent
    mz_arg = lse if mz is None else mz  # a placeholder pointer when not computed
    _row_stats_kernel[(c,)](
        z, z.stride(0), labels, lse, ce, ent, mz_arg, V, IGNORE_INDEX, float(entropy_clamp), BLOCK_V=_block(V),
        HAS_MZ=mz is not None, CLAMP=entropy_clamp > 0,
    )  # fmt: skip
    return lse, ce, ent


def row_grad_(
    z: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    coef: torch.Tensor,
    b: torch.Tensor | None = None,
    u: torch.Tensor | None = None,
) -> torch.Tensor:
    """In place: z [c, V] <- coef[:, None] * softmax(z) - b[:, None] * onehot(labels) - u[:, None] (b defaults
    to coef: coef * (softmax - onehot), the CE case; u to 0). Returns z."""
    c, V = z.shape
    a = coef.to(torch.float32).contiguous()
    b = a if b is None else b.to(torch.float32).contiguous()
    u_arg = a if u is None else u.to(torch.float32).contiguous()
    _row_grad_kernel[(c,)](
        z, z.stride(0), labels, lse, a, b, u_arg, V, IGNORE_INDEX, BLOCK_V=_block(V), HAS_U=u is not None
    )
    return z
