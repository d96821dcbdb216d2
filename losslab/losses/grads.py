"""The fused loss's gradients w.r.t. hidden and head weight, block by block, from each row's coefficients
(``rows.Coefs``: dl/dz = a * softmax - b * onehot(y) - u), computed inside the forward (the Liger-Kernel strategy:
the backward only scales them).

Two ways, chosen by the kernel (``rows.RowKernel.softmax_state``), behind one interface for the block loop:

- ``LogitGrads``: the kernel forms dl/dz [c, V] (``rows.GradKernel.grad``), then grad_h = dl/dz @ W and
  grad_W += dl/dz.T @ h: two matmuls per block;
- ``SoftmaxGrads``: from the block's softmax p itself, never forming dl/dz (see the class).

Either gets a block's logits one of two ways: ``hold`` takes what the block's statistics left (one-pass mode),
``recompute`` starts from logits computed again after the statistics of every row (two-pass mode); ``add`` then
adds the block's contribution, and ``finish`` returns the gradients.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from losslab.losses.rows import Coefs, GradKernel


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
    g = torch.randn(64, 24, device=device, generator=gen).to(dtype)  # [n, V]
    h = torch.randn(64, 16, device=device, generator=gen).to(dtype)  # [n, d]
    base = torch.randn(24, 16, device=device, generator=gen).to(acc_dtype)  # [V, d]
    expected = base.double() + g.double().T @ h.double()  # [V, d]
    for fn in candidates[:-1]:
        acc = base.clone()
        try:
            fn(acc, g, h)
        except (RuntimeError, NotImplementedError, TypeError):
            continue
        if torch.allclose(acc.double(), expected, rtol=1e-4, atol=1e-4):
            return fn
    return candidates[-1]


def _accumulate_grad_w(grad_w: Tensor, g: Tensor, h: Tensor, first: bool) -> None:
    """grad_w [V, d] (fp32/fp64) += g.T [V, c] @ h [c, d]; ``first``: grad_w is uninitialised, write it (addmm
    with beta 0 ignores its contents, NaN included): no [V, d] zero-fill pass."""
    beta = 0.0 if first else 1.0
    if g.dtype == grad_w.dtype:
        grad_w.addmm_(g.T, h.to(grad_w.dtype), beta=beta)
    elif g.is_cuda:
        if first:
            grad_w.zero_()
        key = (g.device, g.dtype, grad_w.dtype)
        if key not in _mixed_addmm:
            _mixed_addmm[key] = pick_mixed_addmm(g.device, g.dtype, grad_w.dtype)
        _mixed_addmm[key](grad_w, g, h.to(g.dtype))
    else:
        grad_w.addmm_(g.T.to(grad_w.dtype), h.to(grad_w.dtype), beta=beta)


class _Grads:
    """The [N, d] and [V, d] gradients of the numerator, filled block by block."""

    def __init__(self, hidden: Tensor, weight: Tensor, labels: Tensor, valid: Tensor, acc: torch.dtype) -> None:
        self.hidden, self.weight, self.labels, self.valid = hidden, weight, labels, valid
        self.grad_h = torch.empty_like(hidden)  # [N, d]
        self.grad_w = weight.new_empty(weight.shape, dtype=acc)  # [V, d], written by the first block

    def finish(self) -> tuple[Tensor, Tensor]:
        """-> (grad_h [N, d], grad_w [V, d]) in the inputs' dtypes. The head's is converted now, not in backward:
        only the weight-dtype copy is held while the rest of the model's backward runs, and backward scales in
        place with no [V, d] temporaries."""
        return self.grad_h, self.grad_w.to(self.weight.dtype)


class LogitGrads(_Grads):
    """From the kernel's dl/dz [c, V]: two matmuls per block."""

    def __init__(self, rows: GradKernel, hidden: Tensor, weight: Tensor, labels: Tensor, valid: Tensor,
                 acc: torch.dtype) -> None:  # fmt: skip
        super().__init__(hidden, weight, labels, valid, acc)
        self.rows = rows

    def hold(self, z: Tensor, lse: Tensor, state: Any) -> tuple[Tensor, Tensor, Any]:
        """What the gradient needs of a block just through its statistics: its logits, lse and the kernel's state."""
        return z, lse, state

    def recompute(self, z: Tensor, lse: Tensor) -> tuple[Tensor, Tensor, None]:
        """The same for logits computed again, with lse from the statistics pass (no state)."""
        return z, lse, None

    def add(self, s: int, held: tuple[Tensor, Tensor, Any], coefs: Coefs) -> None:
        """Rows s..s+c's contribution; ignored rows have a = b = u = 0 through the masks in ``block_fn``."""
        z, lse, state = held
        e = s + len(z)
        g = self.rows.grad(z, self.labels[s:e], self.valid[s:e], lse, coefs, state)  # [c, V] dl/dz
        if self.grad_h.dtype == g.dtype == self.weight.dtype and not torch.is_autocast_enabled(g.device.type):
            torch.matmul(g, self.weight, out=self.grad_h[s:e])  # [c, d], no temporary
        else:  # mixed dtypes (autocast over fp32 weights): the matmul's own output dtype, then copied
            self.grad_h[s:e] = g @ self.weight  # [c, d]
        _accumulate_grad_w(self.grad_w, g, self.hidden[s:e], first=s == 0)  # [V, d]


class SoftmaxGrads(_Grads):
    """The gradients from a block's softmax p [c, V] itself, never forming dl/dz = a p - b onehot(y) - u:

        grad_h = a * (p @ W) - b * W[y] - u * sum_v W_v          ([c, d]: one matmul, the rest is [c, d] work)
        grad_W += p.T @ (a * h);  grad_W[y] -= b * h;  grad_W -= sum_i u_i h_i   (the last once, at the end)

    So the [c, V] block costs no elementwise pass after the softmax (one cast when the matmuls run in bf16/fp16):
    the row scalings move onto [c, d] operands. And ``p @ W`` also gives each row's entropy for free,
    H = lse - sum_v p_v z_v = lse - h . (p @ W), which otherwise costs a dot pass over two [c, V] blocks: MiLe
    costs what CE costs.

    The matmuls run in ``mm_dtype``, the logits' (autocast's where it is on): in fp32/fp64 everything is exact to
    rounding; in bf16/fp16, p is rounded to it as dl/dz was before and p @ W comes out in it; the head-weight
    gradient accumulates in fp32 inside the matmul on a GPU (``pick_mixed_addmm``), and on a CPU, which has no
    mixed-dtype matmul, each block's p.T @ (a h) comes out in bf16/fp16 and is summed in fp32. Used when the
    kernel's state is the softmax (``rows.RowKernel.softmax_state``)."""

    def __init__(self, hidden: Tensor, weight: Tensor, labels: Tensor, valid: Tensor, acc: torch.dtype,
                 mm_dtype: torch.dtype) -> None:  # fmt: skip
        super().__init__(hidden, weight, labels, valid, acc)
        self.mm_dtype = mm_dtype
        self.weight_mm = weight.detach().to(mm_dtype)  # [V, d]; no copy unless autocast lowers an fp32 weight
        self.weight_sum: Tensor | None = None  # [d] sum_v W_v, for label smoothing's u
        self.u_h: Tensor | None = None  # [d] sum_i u_i h_i, subtracted from every row of grad_W at the end

    def hold(self, z: Tensor, lse: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """The softmax (the kernel's state) is all the gradients need of a block: not z."""
        return self._p_w(state)

    def recompute(self, z: Tensor, lse: Tensor) -> tuple[Tensor, Tensor]:
        """The softmax again, from logits computed again and the statistics pass's lse [c]."""
        p = z.to(lse.dtype)  # [c, V]; z itself in fp32 / fp64, so the softmax is computed in place
        del z
        p.sub_(lse[:, None]).exp_()
        return self._p_w(p)

    def _p_w(self, p: Tensor) -> tuple[Tensor, Tensor]:
        """p [c, V] (accumulation dtype) -> (p in mm_dtype, p @ W [c, d] in the accumulation dtype)."""
        p_mm = p.to(self.mm_dtype)  # no copy in fp32 / fp64
        with torch.autocast(p.device.type, enabled=False):  # the dtypes are chosen here, not by autocast
            return p_mm, (p_mm @ self.weight_mm).to(p.dtype)

    def entropy(self, s: int, held: tuple[Tensor, Tensor], lse: Tensor, out: Tensor) -> None:
        """H = lse - h . (p @ W) for rows s..s+c of the held block into ``out`` [c]."""
        p_w = held[1]  # [c, d]
        h = self.hidden[s : s + len(p_w)].to(self.mm_dtype).to(p_w.dtype)  # [c, d] as the logits' matmul saw it
        torch.sub(lse, (h.unsqueeze(1) @ p_w.unsqueeze(2)).view(-1), out=out)

    def add(self, s: int, held: tuple[Tensor, Tensor], coefs: Coefs) -> None:
        """Rows s..s+c's contribution (held: p [c, V] in mm_dtype, p @ W [c, d]; coefs [c] each)."""
        p_mm, p_w = held
        e = s + len(p_mm)
        acc = p_w.dtype
        h, y = self.hidden[s:e].to(acc), self.labels[s:e].clamp_min(0)  # [c, d], [c]
        a, b = coefs.a[:, None].to(acc), (coefs.b * self.valid[s:e])[:, None].to(acc)  # [c, 1] each
        gh = p_w * a - b * self.weight[y].to(acc)  # [c, d]
        if coefs.u is not None:
            u = coefs.u[:, None].to(acc)  # [c, 1]
            if self.weight_sum is None:
                self.weight_sum = self.weight.detach().sum(0, dtype=acc)  # [d]
                self.u_h = torch.zeros_like(self.weight_sum)  # [d]
            gh.sub_(u * self.weight_sum)
            self.u_h.add_((u * h).sum(0))
        self.grad_h[s:e] = gh
        with torch.autocast(h.device.type, enabled=False):
            if self.mm_dtype == self.grad_w.dtype or p_mm.is_cuda:  # fp32 accumulation in the matmul itself
                _accumulate_grad_w(self.grad_w, p_mm, a * h, first=s == 0)  # [V, d]
            elif s == 0:  # a CPU has no mixed-dtype matmul: the block's product in bf16/fp16, summed in fp32
                self.grad_w.copy_(p_mm.T @ (a * h).to(self.mm_dtype))  # [V, d]
            else:
                self.grad_w.add_(p_mm.T @ (a * h).to(self.mm_dtype))  # [V, d]
        self.grad_w.index_add_(0, y, b * h, alpha=-1.0)  # the one-hot term, row by row into W[y]

    def finish(self) -> tuple[Tensor, Tensor]:
        if self.u_h is not None:
            self.grad_w.sub_(self.u_h)  # [V, d] - [d]: sum_i u_i h_i from every row
        return super().finish()
