"""Triton kernels for the row-wise part of the fused loss on a [c, V] block of logits.

The matmuls stay with cuBLAS; these two kernels replace the chain of elementwise torch ops over the block
(upcast, logsumexp, exp, dot, scatter, scale, downcast — about seven passes) with two passes:

- ``row_stats``: one online pass per row -> logsumexp, cross-entropy (0 for an ignored label) and entropy,
  with running max m, d = sum e^(z-m), s = sum e^(z-m) z  =>  lse = m + log d,  H = lse - s / d.
- ``row_grad``: overwrites the logits in place with dl/dz = coef * (softmax - onehot(target)), in the
  logits' dtype, ready for the two gradient matmuls.

They also run under ``TRITON_INTERPRET=1`` on CPU tensors, which is how the tests check them on machines
without a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from trainer.losses.config import IGNORE_INDEX


@triton.jit
def _row_stats_kernel(
    z_ptr, z_stride, y_ptr, lse_ptr, ce_ptr, ent_ptr, V, ignore_index, BLOCK_V: tl.constexpr
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * z_stride
    m = tl.full((), float("-inf"), tl.float32)
    d = tl.zeros((), tl.float32)
    s = tl.zeros((), tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        z = tl.load(z_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        scale = tl.exp(m - m_new)
        e = tl.exp(z - m_new)  # 0 at masked columns
        d = d * scale + tl.sum(e, axis=0)
        s = s * scale + tl.sum(e * tl.where(mask, z, 0.0), axis=0)  # no 0 * -inf at masked columns
        m = m_new
    lse = m + tl.log(d)
    tl.store(lse_ptr + row, lse)
    tl.store(ent_ptr + row, lse - s / d)
    y = tl.load(y_ptr + row)
    valid = y != ignore_index
    zy = tl.load(z_row + tl.where(valid, y, 0)).to(tl.float32)
    tl.store(ce_ptr + row, tl.where(valid, lse - zy, 0.0))


@triton.jit
def _row_grad_kernel(z_ptr, z_stride, y_ptr, lse_ptr, coef_ptr, V, ignore_index, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * z_stride
    lse = tl.load(lse_ptr + row)
    coef = tl.load(coef_ptr + row)
    y = tl.load(y_ptr + row)
    y = tl.where(y != ignore_index, y, -1)  # an ignored row has no one-hot term (and coef 0)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        z = tl.load(z_row + cols, mask=mask, other=0.0).to(tl.float32)
        g = coef * (tl.exp(z - lse) - tl.where(cols == y, 1.0, 0.0))
        tl.store(z_row + cols, g.to(z_ptr.dtype.element_ty), mask=mask)


def _block(V: int) -> int:
    return min(triton.next_power_of_2(V), 4096)


def row_stats(
    z: torch.Tensor, labels: torch.Tensor, ce: torch.Tensor | None = None, ent: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """z [c, V] (any float dtype, unit stride in V), labels [c] -> (lse, ce, entropy), fp32 [c]; ce is 0 where
    the label is ignored. ``ce`` / ``ent``: contiguous fp32 [c] outputs to write into (e.g. slices of [N])."""
    c, V = z.shape
    lse = torch.empty(c, dtype=torch.float32, device=z.device)
    ce = torch.empty_like(lse) if ce is None else ce
    ent = torch.empty_like(lse) if ent is None else ent
    _row_stats_kernel[(c,)](z, z.stride(0), labels, lse, ce, ent, V, IGNORE_INDEX, BLOCK_V=_block(V))
    return lse, ce, ent


def row_grad_(z: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """In place: z [c, V] <- coef[:, None] * (softmax(z) - onehot(labels)). Returns z."""
    c, V = z.shape
    coef = coef.to(torch.float32).contiguous()
    _row_grad_kernel[(c,)](z, z.stride(0), labels, lse, coef, V, IGNORE_INDEX, BLOCK_V=_block(V))
    return z
