"""Two ways to get per-token CE, entropy and the loss numerator from (hidden, head weight, labels).

``reference``: materialises the [N, V] logits and lets autograd do the rest. Simple, obviously right,
memory-hungry: the baseline for every test and benchmark.

``chunked``: never holds more than a [chunk, V] block of logits. One online pass per block gives logsumexp,
target logit and entropy, and — since each loss term depends on the logits only through the row's CE
(weights are detached, or, for focal_lin, functions of the CE itself) — the gradient w.r.t. the logits is
``c_i * (softmax_i - onehot_i)`` with ``c_i = dl_i/dce_i``. So the gradients w.r.t. hidden and head weight
are computed inside the forward, block by block, and the backward only scales them (the Liger-Kernel
strategy: 3 matmuls in all, no recomputation).

Both return ``(numerator, ce, entropy, w)``: numerator = sum_i l_i (differentiable scalar, accumulation
dtype), and detached [N] vectors. ``row_fn(ce, entropy, labels) -> (l, w)`` applies the loss and the masks.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from trainer.losses.config import IGNORE_INDEX

RowFn = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]
CHUNK_BYTES = 64 * 2**20


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmax statistics are kept in fp32 (fp64 when the inputs are fp64, for reference tests)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def entropy_from_logits(z: Tensor) -> Tensor:
    """z [n, V] (detached) -> H [n] = -sum_v p_v log p_v, natural log."""
    logp = F.log_softmax(z, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def reference(hidden: Tensor, weight: Tensor, labels: Tensor, row_fn: RowFn) -> tuple[Tensor, ...]:
    # hidden [N, d], weight [V, d], labels [N]
    acc = accumulation_dtype(hidden.dtype)
    z = F.linear(hidden, weight).to(acc)  # [N, V], materialised
    ce = F.cross_entropy(z, labels, ignore_index=IGNORE_INDEX, reduction="none")  # [N], 0 where ignored
    entropy = entropy_from_logits(z.detach())  # [N]
    terms, w = row_fn(ce, entropy, labels)
    return terms.sum(), ce.detach(), entropy, w


def default_chunk_rows(vocab: int, acc: torch.dtype) -> int:
    return max(1, CHUNK_BYTES // (vocab * torch.finfo(acc).bits // 8))


class TorchRows:
    """Row statistics and logit gradients of a [c, V] block with plain torch ops (any device, any dtype)."""

    @staticmethod
    def stats(z: Tensor, y: Tensor, valid: Tensor, acc: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        zf = z.to(acc)  # [c, V]
        lse = torch.logsumexp(zf, dim=-1)  # [c]
        zy = zf.gather(1, y.clamp_min(0)[:, None]).squeeze(1)  # [c]
        p = (zf - lse[:, None]).exp_()  # [c, V] softmax
        # H = lse - sum_v p_v z_v, as a batched dot to avoid another [c, V] temporary
        ent = lse - (p.unsqueeze(1) @ zf.unsqueeze(2)).view(-1)  # [c]
        return lse, zy, ent, p

    @staticmethod
    def grad(z: Tensor, y: Tensor, valid: Tensor, lse: Tensor, coef: Tensor, p: Tensor) -> Tensor:
        p[torch.arange(len(y), device=y.device), y.clamp_min(0)] -= valid.to(p.dtype)
        return p.mul_(coef[:, None].to(p.dtype)).to(z.dtype)  # [c, V] dl/dz


class TritonRows:
    """The same with the Triton kernels of ``triton_rows.py``: two passes over the block, gradient in place."""

    @staticmethod
    def stats(z: Tensor, y: Tensor, valid: Tensor, acc: torch.dtype) -> tuple[Tensor, Tensor, Tensor, None]:
        from trainer.losses.triton_rows import row_stats

        lse, zy, ent = row_stats(z, y)
        return lse, zy, ent, None

    @staticmethod
    def grad(z: Tensor, y: Tensor, valid: Tensor, lse: Tensor, coef: Tensor, _state: None) -> Tensor:
        from trainer.losses.triton_rows import row_grad_

        return row_grad_(z, y, lse, coef)


def _accumulate_grad_w(grad_w: Tensor, g: Tensor, h: Tensor) -> None:
    """grad_w [V, d] (fp32/fp64) += g.T [V, c] @ h [c, d]."""
    if g.dtype == grad_w.dtype:
        grad_w.addmm_(g.T, h.to(grad_w.dtype))
    elif g.is_cuda:
        # bf16 inputs, fp32 accumulation in cuBLAS, in place: no [V, d] temporary per chunk
        torch.ops.aten.addmm.dtype_out(grad_w, g.T, h, grad_w.dtype, out=grad_w)
    else:
        grad_w.addmm_(g.T.to(grad_w.dtype), h.to(grad_w.dtype))


class _ChunkedLinearLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, row_fn, chunk_rows, need_grad, rows):  # type: ignore[override]
        N, d = hidden.shape
        V = weight.shape[0]
        acc = accumulation_dtype(hidden.dtype)
        ce_all = hidden.new_empty(N, dtype=acc)
        ent_all = hidden.new_empty(N, dtype=acc)
        w_all = hidden.new_empty(N, dtype=acc)
        numerator = hidden.new_zeros((), dtype=acc)
        grad_h = torch.empty_like(hidden) if need_grad else None  # [N, d]
        grad_w = weight.new_zeros(V, d, dtype=acc) if need_grad else None  # [V, d], accumulated over chunks
        for s in range(0, N, chunk_rows):
            h = hidden[s : s + chunk_rows]  # [c, d]
            y = labels[s : s + chunk_rows]  # [c]
            valid = y != IGNORE_INDEX
            z = h @ weight.T  # [c, V], in the inputs' dtype
            lse, zy, ent, state = rows.stats(z, y, valid, acc)
            ce = torch.where(valid, lse - zy, 0.0).to(acc)  # [c]
            ent = ent.to(acc)
            with torch.enable_grad():
                ce_leaf = ce.detach().requires_grad_(need_grad)
                terms, w = row_fn(ce_leaf, ent, y)
                coef = torch.autograd.grad(terms.sum(), ce_leaf)[0] if need_grad else None  # [c] dl/dce
            numerator += terms.detach().sum()
            ce_all[s : s + chunk_rows] = ce
            ent_all[s : s + chunk_rows] = ent
            w_all[s : s + chunk_rows] = w.detach()
            if need_grad:
                # dl/dz = coef * (softmax - onehot); ignored rows have coef 0 through the masks in row_fn
                g = rows.grad(z, y, valid, lse, coef, state)  # [c, V]
                grad_h[s : s + chunk_rows] = g @ weight
                _accumulate_grad_w(grad_w, g, h)
            del z, state
        if need_grad:
            ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(ce_all, ent_all, w_all)
        return numerator, ce_all, ent_all, w_all

    @staticmethod
    def backward(ctx, g_num, *_unused):  # type: ignore[override]
        grad_h, grad_w = ctx.saved_tensors
        return (
            grad_h * g_num.to(grad_h.dtype),
            (grad_w * g_num).to(ctx.weight_dtype),
            None,
            None,
            None,
            None,
            None,
        )


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def pick_rows(kernel: str, device: torch.device, dtype: torch.dtype) -> type[TorchRows] | type[TritonRows]:
    """kernel: auto (Triton on CUDA when installed, for 16/32-bit floats) | triton | torch."""
    if kernel == "torch" or dtype == torch.float64:
        return TorchRows
    if kernel == "triton":
        if not triton_available():
            raise RuntimeError("loss.kernel=triton but triton is not installed")
        return TritonRows
    return TritonRows if device.type == "cuda" and triton_available() else TorchRows


def chunked(
    hidden: Tensor, weight: Tensor, labels: Tensor, row_fn: RowFn, chunk_rows: int = 0, kernel: str = "auto"
) -> tuple[Tensor, ...]:
    acc = accumulation_dtype(hidden.dtype)
    chunk_rows = chunk_rows or default_chunk_rows(weight.shape[0], acc)
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    rows = pick_rows(kernel, hidden.device, hidden.dtype)
    return _ChunkedLinearLoss.apply(hidden, weight, labels, row_fn, chunk_rows, need_grad, rows)
