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
dtype), and detached [N] vectors. ``row_fn(ce, entropy, labels) -> (l, w, coef)`` applies the loss and the
masks; ``coef`` is dl/dce where the loss gives it in closed form (l = w * ce with w detached: coef = w), else
None and the chunked path differentiates ``l`` with autograd.

On a GPU the chunked path is bound by launches as much as by FLOPs, so each block costs few: the Triton
statistics kernel writes straight into the [N] outputs, closed-form coefficients skip autograd, and the
gradient matmuls write in place.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from trainer.losses.config import IGNORE_INDEX

RowFn = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor | None]]
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
    terms, w, _ = row_fn(ce, entropy, labels)
    return terms.sum(), ce.detach(), entropy, w


def default_chunk_rows(vocab: int, dim: int, acc: torch.dtype) -> int:
    """Rows per block of logits: at least ``dim``, so that the fp32 accumulation of the head-weight gradient
    (an addmm with inner dimension = rows, reading and writing all of [V, d] every block) stays compute-bound
    rather than memory-bound, and so that the logits block (in bf16) is about half that accumulator; at least
    a ``CHUNK_BYTES`` block otherwise (fewer, larger blocks: fewer launches)."""
    return max(dim, CHUNK_BYTES // (vocab * torch.finfo(acc).bits // 8), 1)


class TorchRows:
    """Row statistics and logit gradients of a [c, V] block with plain torch ops (any device, any dtype)."""

    @staticmethod
    def stats(z: Tensor, y: Tensor, valid: Tensor, ce_out: Tensor, ent_out: Tensor) -> tuple[Tensor, Tensor]:
        """Writes ce (0 where ignored) and entropy into the [c] outputs; returns (lse, state for ``grad``)."""
        zf = z.to(ce_out.dtype)  # [c, V]
        lse = torch.logsumexp(zf, dim=-1)  # [c]
        zy = zf.gather(1, y.clamp_min(0)[:, None]).squeeze(1)  # [c]
        ce_out.copy_(lse - zy).masked_fill_(~valid, 0.0)
        p = (zf - lse[:, None]).exp_()  # [c, V] softmax
        # H = lse - sum_v p_v z_v, as a batched dot to avoid another [c, V] temporary
        torch.sub(lse, (p.unsqueeze(1) @ zf.unsqueeze(2)).view(-1), out=ent_out)
        return lse, p

    @staticmethod
    def grad(z: Tensor, y: Tensor, valid: Tensor, lse: Tensor, coef: Tensor, p: Tensor) -> Tensor:
        p[torch.arange(len(y), device=y.device), y.clamp_min(0)] -= valid.to(p.dtype)
        return p.mul_(coef[:, None].to(p.dtype)).to(z.dtype)  # [c, V] dl/dz


class TritonRows:
    """The same with the Triton kernels of ``triton_rows.py``: two passes over the block, gradient in place."""

    @staticmethod
    def stats(z: Tensor, y: Tensor, valid: Tensor, ce_out: Tensor, ent_out: Tensor) -> tuple[Tensor, None]:
        from trainer.losses.triton_rows import row_stats

        lse, _, _ = row_stats(z, y, ce=ce_out, ent=ent_out)
        return lse, None

    @staticmethod
    def grad(z: Tensor, y: Tensor, valid: Tensor, lse: Tensor, coef: Tensor, _state: None) -> Tensor:
        from trainer.losses.triton_rows import row_grad_

        return row_grad_(z, y, lse, coef)


def _addmm_fp32_out(acc: Tensor, g: Tensor, h: Tensor) -> None:
    """cuBLAS: bf16 inputs, fp32 accumulation, written in place: no [V, d] temporary."""
    torch.ops.aten.addmm.dtype_out(acc, g.T, h, acc.dtype, out=acc)


def _mm_fp32_then_add(acc: Tensor, g: Tensor, h: Tensor) -> None:
    acc.add_(torch.mm(g.T, h, out_dtype=acc.dtype))  # a [V, d] fp32 temporary per block


def _mm_then_add(acc: Tensor, g: Tensor, h: Tensor) -> None:
    acc.add_(g.T @ h)  # each block's contribution rounded to the inputs' dtype before it is accumulated


MIXED_ADDMM = (_addmm_fp32_out, _mm_fp32_then_add, _mm_then_add)
_mixed_addmm: dict[tuple[torch.device, torch.dtype, torch.dtype], Callable[[Tensor, Tensor, Tensor], None]] = {}


def pick_mixed_addmm(device: torch.device, dtype: torch.dtype, acc_dtype: torch.dtype, candidates=MIXED_ADDMM):
    """The first way of computing ``acc += g.T @ h`` (g, h in ``dtype``, acc in ``acc_dtype``) that this PyTorch
    build runs and gets right on a small probe; the last candidate is the fallback. The mixed-dtype cuBLAS
    overloads are recent and have had bugs (pytorch/pytorch#154086), hence the check rather than trust."""
    gen = torch.Generator(device=device).manual_seed(0)
    g = torch.randn(64, 24, device=device, generator=gen).to(dtype)
    h = torch.randn(64, 16, device=device, generator=gen).to(dtype)
    base = torch.randn(24, 16, device=device, generator=gen).to(acc_dtype)
    expected = base.double() + g.double().T @ h.double()
    for fn in candidates[:-1]:
        acc = base.clone()
        try:
            fn(acc, g, h)
        except (RuntimeError, NotImplementedError, TypeError):
            continue
        if torch.allclose(acc.double(), expected, rtol=1e-4, atol=1e-4):
            return fn
    return candidates[-1]


def _accumulate_grad_w(grad_w: Tensor, g: Tensor, h: Tensor) -> None:
    """grad_w [V, d] (fp32/fp64) += g.T [V, c] @ h [c, d]."""
    if g.dtype == grad_w.dtype:
        grad_w.addmm_(g.T, h.to(grad_w.dtype))
    elif g.is_cuda:
        key = (g.device, g.dtype, grad_w.dtype)
        if key not in _mixed_addmm:
            _mixed_addmm[key] = pick_mixed_addmm(g.device, g.dtype, grad_w.dtype)
        _mixed_addmm[key](grad_w, g, h.to(g.dtype))
    else:
        grad_w.addmm_(g.T.to(grad_w.dtype), h.to(grad_w.dtype))


class _ChunkedLinearLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, row_fn, chunk_rows, need_grad, rows):  # type: ignore[override]
        N, d = hidden.shape
        V = weight.shape[0]
        acc = accumulation_dtype(hidden.dtype)
        valid_all = labels != IGNORE_INDEX  # [N]
        ce_all = hidden.new_empty(N, dtype=acc)
        ent_all = hidden.new_empty(N, dtype=acc)
        terms_all = hidden.new_empty(N, dtype=acc)
        w_all = hidden.new_empty(N, dtype=acc)
        grad_h = torch.empty_like(hidden) if need_grad else None  # [N, d]
        grad_w = weight.new_zeros(V, d, dtype=acc) if need_grad else None  # [V, d], accumulated over blocks
        for s in range(0, N, chunk_rows):
            e = min(s + chunk_rows, N)
            h, y, valid = hidden[s:e], labels[s:e], valid_all[s:e]  # [c, d], [c], [c]
            z = h @ weight.T  # [c, V], in the inputs' dtype
            lse, state = rows.stats(z, y, valid, ce_all[s:e], ent_all[s:e])
            ce, ent = ce_all[s:e], ent_all[s:e]
            terms, w, coef = row_fn(ce, ent, y)
            if need_grad and coef is None:  # the loss is not linear in ce: differentiate its row terms
                with torch.enable_grad():
                    ce_leaf = ce.detach().requires_grad_()
                    coef = torch.autograd.grad(row_fn(ce_leaf, ent, y)[0].sum(), ce_leaf)[0]  # [c] dl/dce
            terms_all[s:e] = terms
            w_all[s:e] = w
            if need_grad:
                # dl/dz = coef * (softmax - onehot); ignored rows have coef 0 through the masks in row_fn
                g = rows.grad(z, y, valid, lse, coef, state)  # [c, V]
                if grad_h.dtype == g.dtype == weight.dtype and not torch.is_autocast_enabled(g.device.type):
                    torch.matmul(g, weight, out=grad_h[s:e])  # [c, d], no temporary
                else:  # mixed dtypes (autocast over fp32 weights): the matmul's own output dtype, then copied
                    grad_h[s:e] = g @ weight
                _accumulate_grad_w(grad_w, g, h)
            del z, state
        if need_grad:
            # Converted now, not in backward: only the weight-dtype copy is held while the rest of the model's
            # backward runs, and backward scales in place with no [V, d] temporaries.
            grad_w = grad_w.to(weight.dtype)
            ctx.save_for_backward(grad_h, grad_w)
        ctx.backward_done = False
        ctx.mark_non_differentiable(ce_all, ent_all, w_all)
        return terms_all.sum(), ce_all, ent_all, w_all

    @staticmethod
    def backward(ctx, g_num, *_unused):  # type: ignore[override]
        if ctx.backward_done:
            raise RuntimeError("the fused loss scales its precomputed gradients in place: backward runs once")
        ctx.backward_done = True
        grad_h, grad_w = ctx.saved_tensors
        grad_h.mul_(g_num)
        grad_w.mul_(g_num)
        return grad_h, grad_w, None, None, None, None, None


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
    chunk_rows = chunk_rows or default_chunk_rows(weight.shape[0], weight.shape[1], acc)
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    rows = pick_rows(kernel, hidden.device, hidden.dtype)
    return _ChunkedLinearLoss.apply(hidden, weight, labels, row_fn, chunk_rows, need_grad, rows)
