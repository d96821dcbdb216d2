"""Two ways to get per-token statistics and the loss numerator from (hidden, head weight, labels).

``reference``: materialises the [N, V] logits and lets autograd do the rest. Simple, obviously right,
memory-hungry: the baseline for every test and benchmark.

``fused``: never holds more than a [chunk, V] block of logits. One online pass per block gives, per row,
logsumexp, the target's CE, the entropy and (for label smoothing) the mean logit. Every loss here depends on a
row's logits only through lse, the target logit z_y and the mean logit m (CE = lse - z_y, smoothed CE = lse -
(1-e) z_y - e m, z-loss = lse^2; weights are detached or functions of these), so the gradient w.r.t. the logits
is ``a_i * softmax_i - b_i * onehot_i - u_i`` with three per-row coefficients (``Coefs``: a = dl/dlse,
b = -dl/dz_y, u = -dl/dm / V). The gradients w.r.t. hidden and head weight are computed inside the forward,
block by block, and the backward only scales them (the Liger-Kernel strategy: 3 matmuls in all).

A loss whose row terms need every row first (``two_pass``: rho1's top-k, or a weight-normalised loss with a
z-loss, whose two parts have different normalisers) runs a statistics pass over all blocks, then the row terms
once over all rows, then a gradient pass that recomputes each block's logits: 4 matmuls instead of 3.

``block_fn(rows: Block, need_coefs) -> (terms [c], w [c], Coefs | None)`` applies the loss and the masks
(``module.py``); the z-loss is added here, with weight ``z_lambda`` relative to the numerator.

Which ``RowKernel`` computes the row-wise part (Torch, Triton or a plug-in) and the check it passes before it is
trusted: ``kernels.py``.

On a GPU the fused path is bound by launches as much as by FLOPs, so each block costs few: the Triton
statistics kernel writes straight into the [N] outputs, closed-form coefficients skip autograd, and the
gradient matmuls write in place.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from losslab.losses.config import IGNORE_INDEX

CHUNK_BYTES = 64 * 2**20
CPU_CHUNK_BYTES = 8 * 2**20
"""On a CPU every row-wise op is a pass over the block, and smaller blocks keep more of it in the cache; on the
project's 2-core machine the full step is within noise from 128 to 1024 rows (``docs/benchmarks.md``), so the
smallest (least memory) that keeps the ``dim``-row floor."""


class Coefs(NamedTuple):
    """Per-row gradient of a loss term w.r.t. its row of logits: ``a * softmax - b * onehot(y) - u`` ([c] each;
    u None when 0)."""

    a: Tensor
    b: Tensor
    u: Tensor | None = None


@dataclass
class Block:
    """Detached statistics of a block of rows (or of all rows, in the two-pass mode), for ``block_fn``."""

    ce: Tensor  # [c] CE of the target, 0 where ignored
    entropy: Tensor  # [c]
    lse: Tensor  # [c]
    mean_z: Tensor | None  # [c] mean logit over the vocabulary (only with label smoothing)
    labels: Tensor  # [c]
    valid: Tensor  # [c] bool
    vocab: int
    inputs: dict[str, Tensor] = field(default_factory=dict)  # token inputs of these rows, [c] each


BlockFn = Callable[[Block, bool], tuple[Tensor, Tensor, Coefs | None]]
RowFn = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor | None]]
"""The older interface, kept for callers that need CE only (evals/buckets.py): (ce, entropy, labels) -> (l, w,
dl/dce or None)."""


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmax statistics are kept in fp32 (fp64 when the inputs are fp64, for reference tests)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


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


class RowKernel(Protocol):
    """The row-wise part of the fused path on one [c, V] block of logits (``loss.kernel`` names one; a plug-in
    is any class or object with these two methods; the built-in torch kernel has only ``stats``, its state being the
    softmax: ``TorchRows.softmax_state``)."""

    def stats(
        self,
        z: Tensor,
        y: Tensor,
        valid: Tensor,
        ce_out: Tensor,
        ent_out: Tensor,
        mz_out: Tensor | None = None,
        entropy_clamp: float = 0.0,
    ) -> tuple[Tensor, Any]:
        """Write ce (0 where ignored), entropy (of the probabilities clamped below at ``entropy_clamp`` when it is
        > 0) and, if given, the mean logit into the [c] outputs; -> (lse [c], state for ``grad``). A kernel whose
        class sets ``optional_entropy = True`` is handed ``ent_out=None`` when nothing needs the entropy."""
        ...

    def grad(self, z: Tensor, y: Tensor, valid: Tensor, lse: Tensor, coefs: Coefs, state: Any) -> Tensor:
        """-> dl/dz [c, V] = a * softmax(z) - b * onehot(y) - u in z's dtype; may overwrite z. ``state`` is None
        when the block's statistics came from an earlier pass (two-pass mode)."""
        ...


class TorchRows:
    """Row statistics of a [c, V] block with plain torch ops (any device, any dtype); the gradients come from
    their softmax (``softmax_state``).

    On a CPU every op here is a pass over the block, so there are as few as the statistics allow: ATen's
    softmax (one fused kernel, row by row in cache) gives the CE (-log p_y) and, with the target's logit, the
    logsumexp; the entropy costs one more (dot) pass, taken only when asked for (``ent_out``) — and the fused
    path asks only when it cannot get it from the gradient's matmul instead (``softmax_state``)."""

    optional_entropy = True
    softmax_state = True
    """``stats``' state is the block's softmax [c, V] in the accumulation dtype, from which ``forward_blocks`` takes
    the gradients itself (``SoftmaxGrads``): a kernel that declares this needs no ``grad``."""

    @staticmethod
    def stats(
        z: Tensor,
        y: Tensor,
        valid: Tensor,
        ce_out: Tensor,
        ent_out: Tensor | None,
        mz_out: Tensor | None = None,
        entropy_clamp: float = 0.0,
    ) -> tuple[Tensor, Tensor]:
        """Writes ce (0 where ignored) and, unless ``ent_out`` is None, the entropy into the [c] outputs; returns
        (lse, state for ``grad``)."""
        acc = ce_out.dtype
        p = torch.softmax(z, dim=-1, dtype=acc)  # [c, V]; bf16 logits are read as they are, no fp32 copy of them
        idx = y.clamp_min(0)[:, None]  # [c, 1]
        z_y = z.gather(1, idx).squeeze(1).to(acc)  # [c]
        logp_y = p.gather(1, idx).squeeze(1).log_()  # [c]; exact to rounding while p_y is a normal float
        lse = z_y - logp_y  # [c] logsumexp, to rounding
        lost = logp_y < math.log(torch.finfo(p.dtype).tiny)  # p_y underflowed (a CE above ~87 in fp32): rare
        if lost.any():
            lse = torch.where(lost, torch.logsumexp(z.to(acc), dim=-1), lse)  # an extra pass, for such a block only
            logp_y = torch.where(lost, z_y - lse, logp_y)
        torch.neg(logp_y, out=ce_out).masked_fill_(~valid, 0.0)
        if mz_out is not None:
            torch.mean(z, dim=-1, dtype=acc, out=mz_out)
        if ent_out is None:
            return lse, p
        if entropy_clamp:  # -sum max(p, c) log max(p, c), a few rows at a time: small temporaries
            for i in range(0, len(p), 256):
                pc = p[i : i + 256].clamp_min(entropy_clamp)
                ent_out[i : i + 256] = -(pc * pc.log()).sum(-1)
        else:  # H = lse - sum_v p_v z_v, as a batched dot to avoid another [c, V] temporary
            torch.sub(lse, (p.unsqueeze(1) @ z.to(acc).unsqueeze(2)).view(-1), out=ent_out)
        return lse, p


class TritonRows:
    """The same with the Triton kernels of ``triton_rows.py``: two passes over the block, gradient in place."""

    @staticmethod
    def stats(
        z: Tensor,
        y: Tensor,
        valid: Tensor,
        ce_out: Tensor,
        ent_out: Tensor,
        mz_out: Tensor | None = None,
        entropy_clamp: float = 0.0,
    ) -> tuple[Tensor, None]:
        from losslab.losses.triton_rows import row_stats

        lse, _, _ = row_stats(z, y, ce=ce_out, ent=ent_out, mz=mz_out, entropy_clamp=entropy_clamp)
        return lse, None

    @staticmethod
    def grad(z: Tensor, y: Tensor, valid: Tensor, lse: Tensor, coefs: Coefs, _state: None) -> Tensor:
        from losslab.losses.triton_rows import row_grad_

        return row_grad_(z, y, lse, coefs.a, coefs.b, coefs.u)


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


class SoftmaxGrads:
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
    kernel's state is the softmax (``TorchRows.softmax_state``)."""

    def __init__(self, hidden: Tensor, weight: Tensor, labels: Tensor, valid: Tensor, grad_h: Tensor, grad_w: Tensor,
                 mm_dtype: torch.dtype):  # fmt: skip
        self.hidden, self.weight, self.labels, self.valid = hidden, weight, labels, valid
        self.grad_h, self.grad_w = grad_h, grad_w
        self.mm_dtype = mm_dtype
        self.weight_mm = weight.detach().to(mm_dtype)  # [V, d]; no copy unless autocast lowers an fp32 weight
        self.weight_sum: Tensor | None = None  # [d] sum_v W_v, for label smoothing's u
        self.u_h: Tensor | None = None  # [d] sum_i u_i h_i, subtracted from every row of grad_W at the end

    def p_w(self, p: Tensor) -> tuple[Tensor, Tensor]:
        """p [c, V] (accumulation dtype) -> (p in mm_dtype, p @ W [c, d] in the accumulation dtype)."""
        p_mm = p.to(self.mm_dtype)  # no copy in fp32 / fp64
        with torch.autocast(p.device.type, enabled=False):  # the dtypes are chosen here, not by autocast
            return p_mm, (p_mm @ self.weight_mm).to(p.dtype)

    def entropy(self, s: int, p_w: Tensor, lse: Tensor, out: Tensor) -> None:
        """H = lse - h . (p @ W) for rows s.. of the block (p_w [c, d]) into ``out`` [c]."""
        h = self.hidden[s : s + len(p_w)].to(self.mm_dtype).to(p_w.dtype)  # [c, d] as the logits' matmul saw it
        torch.sub(lse, (h.unsqueeze(1) @ p_w.unsqueeze(2)).view(-1), out=out)

    def block(self, s: int, p_mm: Tensor, p_w: Tensor, coefs: Coefs) -> None:
        """Add rows s..s+c's contribution (p_mm [c, V] in mm_dtype, p_w = p @ W [c, d], coefs [c] each)."""
        e = s + len(p_mm)
        acc = p_w.dtype
        h, y = self.hidden[s:e].to(acc), self.labels[s:e].clamp_min(0)  # [c, d], [c]
        a, b = coefs.a[:, None].to(acc), (coefs.b * self.valid[s:e])[:, None].to(acc)  # [c, 1] each
        gh = p_w * a - b * self.weight[y].to(acc)  # [c, d]
        if coefs.u is not None:
            u = coefs.u[:, None].to(acc)  # [c, 1]
            if self.weight_sum is None:
                self.weight_sum = self.weight.detach().sum(0, dtype=acc)  # [d]
                self.u_h = torch.zeros_like(self.weight_sum)
            gh.sub_(u * self.weight_sum)
            self.u_h.add_((u * h).sum(0))
        self.grad_h[s:e] = gh
        with torch.autocast(h.device.type, enabled=False):
            if self.mm_dtype == self.grad_w.dtype or p_mm.is_cuda:  # fp32 accumulation in the matmul itself
                _accumulate_grad_w(self.grad_w, p_mm, a * h, first=s == 0)  # [V, d]
            elif s == 0:  # a CPU has no mixed-dtype matmul: the block's product in bf16/fp16, summed in fp32
                self.grad_w.copy_(p_mm.T @ (a * h).to(self.mm_dtype))
            else:
                self.grad_w.add_(p_mm.T @ (a * h).to(self.mm_dtype))
        self.grad_w.index_add_(0, y, b * h, alpha=-1.0)

    def finish(self) -> None:
        if self.u_h is not None:
            self.grad_w.sub_(self.u_h)


class Fused(NamedTuple):
    numerator: Tensor  # sum of the row terms (z-loss included), accumulation dtype
    ce: Tensor  # [N] detached, as the rest
    entropy: Tensor
    w: Tensor
    lse: Tensor
    grad_h: Tensor | None  # [N, d] gradient of the numerator, inputs' dtype
    grad_w: Tensor | None  # [V, d]


@dataclass
class FusedOptions:
    mean_z: bool = False
    """Compute each row's mean logit (label smoothing needs it)."""
    z_lambda: float | Callable[[Tensor], Tensor] = 0.0
    """Add ``z_lambda * sum_valid lse^2`` to the numerator; a callable of the [N] weights (two-pass mode only)
    when the ratio of the z-loss's normaliser to the loss's is known only once every row's weight is."""
    inputs: dict[str, Tensor] = field(default_factory=dict)
    """Token inputs, [N] each, handed to ``block_fn`` sliced like the rows."""
    two_pass: bool = False
    """Statistics of every row first, then ``block_fn`` once over all rows, then the gradients."""
    entropy_clamp: float = 0.0
    """> 0: the entropy of the probabilities clamped below at it (the official MiLe code's)."""
    entropy: bool = True
    """Compute each row's entropy. False (nothing reads it): a kernel with ``optional_entropy`` skips that pass
    and the entropies are NaN, so a reader that should have asked cannot go unnoticed."""


def _with_z_loss(terms: Tensor, coefs: Coefs | None, lse: Tensor, valid: Tensor, lam) -> tuple[Tensor, Coefs | None]:
    """terms + lam * lse^2 on valid rows; d/dlse = 2 lam lse goes into the softmax coefficient."""
    if isinstance(lam, Tensor) or lam:
        lse_valid = lse * valid  # [c]
        terms = terms + lam * lse_valid * lse
        if coefs is not None:
            coefs = coefs._replace(a=coefs.a + 2 * lam * lse_valid)
    return terms, coefs


def forward_blocks(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    block_fn: BlockFn,
    chunk_rows: int,
    need_grad: bool,
    rows: RowKernel,
    opts: FusedOptions | None = None,
) -> Fused:
    """The fused computation, block by block; gradients (of the numerator) in the inputs' dtypes."""
    opts = opts or FusedOptions()
    N, d = hidden.shape
    V = weight.shape[0]
    acc = accumulation_dtype(hidden.dtype)
    valid_all = labels != IGNORE_INDEX  # [N]
    ce_all, ent_all, lse_all, terms_all, w_all = (hidden.new_empty(N, dtype=acc) for _ in range(5))
    mz_all = hidden.new_empty(N, dtype=acc) if opts.mean_z else None
    grad_h = torch.empty_like(hidden) if need_grad else None  # [N, d]
    grad_w = weight.new_empty(V, d, dtype=acc) if need_grad else None  # [V, d], written by the first block

    def block(s: int, e: int, lse: Tensor) -> Block:
        return Block(ce_all[s:e], ent_all[s:e], lse, None if mz_all is None else mz_all[s:e], labels[s:e],
                     valid_all[s:e], V, {k: v[s:e] for k, v in opts.inputs.items()})  # fmt: skip

    skip_entropy = not opts.entropy and getattr(rows, "optional_entropy", False)
    if skip_entropy:
        ent_all.fill_(torch.nan)
    softmax_grads = None
    if need_grad and getattr(rows, "softmax_state", False):
        softmax_grads = SoftmaxGrads(hidden, weight, labels, valid_all, grad_h, grad_w, logits_dtype(hidden, weight))
    # the entropy from the gradient's p @ W (one pass, gradients block by block, the entropy as defined)
    entropy_by_matmul = softmax_grads is not None and not (opts.two_pass or skip_entropy or opts.entropy_clamp)

    def stats(s: int, e: int) -> tuple[Tensor, Tensor, Any]:
        z = hidden[s:e] @ weight.T  # [c, V], in the inputs' dtype
        mz = None if mz_all is None else mz_all[s:e]
        ent = None if skip_entropy or entropy_by_matmul else ent_all[s:e]
        if opts.entropy_clamp:
            lse, state = rows.stats(z, labels[s:e], valid_all[s:e], ce_all[s:e], ent, mz, opts.entropy_clamp)
        else:  # a plug-in kernel need not know the option it is not asked for
            lse, state = rows.stats(z, labels[s:e], valid_all[s:e], ce_all[s:e], ent, mz)
        lse_all[s:e] = lse
        return z, lse, state

    def gradients(s: int, e: int, z: Tensor, lse: Tensor, coefs: Coefs, state: Any) -> None:
        # dl/dz = a * softmax - b * onehot - u; ignored rows have a = b = u = 0 through the masks in block_fn
        g = rows.grad(z, labels[s:e], valid_all[s:e], lse, coefs, state)  # [c, V]
        if grad_h.dtype == g.dtype == weight.dtype and not torch.is_autocast_enabled(g.device.type):
            torch.matmul(g, weight, out=grad_h[s:e])  # [c, d], no temporary
        else:  # mixed dtypes (autocast over fp32 weights): the matmul's own output dtype, then copied
            grad_h[s:e] = g @ weight
        _accumulate_grad_w(grad_w, g, hidden[s:e], first=s == 0)

    if not opts.two_pass:  # one pass: statistics, row terms and gradients block by block
        for s in range(0, N, chunk_rows):
            e = min(s + chunk_rows, N)
            z, lse, state = stats(s, e)
            p_w = None
            if softmax_grads is not None:
                z = None  # the softmax (state) is all the gradients need
                state, p_w = softmax_grads.p_w(state)  # [c, V] in the matmuls' dtype, [c, d]
                if entropy_by_matmul:
                    softmax_grads.entropy(s, p_w, lse, ent_all[s:e])
            terms, w, coefs = block_fn(block(s, e, lse), need_grad)
            terms, coefs = _with_z_loss(terms, coefs, lse, valid_all[s:e], opts.z_lambda)
            terms_all[s:e] = terms
            w_all[s:e] = w
            if softmax_grads is not None:
                softmax_grads.block(s, state, p_w, coefs)
            elif need_grad:
                gradients(s, e, z, lse, coefs, state)
            del z, state
    else:  # statistics of every row, the row terms over all rows, then the gradients (logits recomputed)
        for s in range(0, N, chunk_rows):
            stats(s, min(s + chunk_rows, N))
        terms, w, coefs = block_fn(block(0, N, lse_all), need_grad)
        lam = opts.z_lambda(w) if callable(opts.z_lambda) else opts.z_lambda
        terms, coefs = _with_z_loss(terms, coefs, lse_all, valid_all, lam)
        terms_all.copy_(terms)
        w_all.copy_(w)
        if need_grad:
            for s in range(0, N, chunk_rows):
                e = min(s + chunk_rows, N)
                z = hidden[s:e] @ weight.T  # [c, V]
                part = Coefs(*(None if c is None else c[s:e] for c in coefs))
                if softmax_grads is not None:
                    p = z.to(lse_all.dtype)  # [c, V]; z itself in fp32 / fp64, so the softmax is computed in place
                    del z
                    p.sub_(lse_all[s:e, None]).exp_()  # the softmax again, from the first pass's lse
                    softmax_grads.block(s, *softmax_grads.p_w(p), part)
                    del p
                else:
                    gradients(s, e, z, lse_all[s:e], part, None)
                    del z
    if softmax_grads is not None:
        softmax_grads.finish()
    if need_grad:
        # Converted now, not in backward: only the weight-dtype copy is held while the rest of the model's
        # backward runs, and backward scales in place with no [V, d] temporaries.
        grad_w = grad_w.to(weight.dtype)
    return Fused(terms_all.sum(), ce_all, ent_all, w_all, lse_all, grad_h, grad_w)


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


def logits_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype of ``hidden @ weight.T`` here: autocast's where it is on (it leaves float64 alone)."""
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev) and torch.float64 not in (hidden.dtype, weight.dtype):
        return torch.get_autocast_dtype(dev)
    return torch.promote_types(hidden.dtype, weight.dtype)


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
    from losslab.losses.kernels import select_rows  # kernels imports this module

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


def chunked(
    hidden: Tensor, weight: Tensor, labels: Tensor, row_fn: RowFn, chunk_rows: int = 0, kernel: str = "auto"
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``fused`` for a ``row_fn(ce, entropy, labels) -> (l, w, dl/dce or None)``: -> (numerator, ce, entropy,
    w)."""

    def block_fn(b: Block, need_coefs: bool) -> tuple[Tensor, Tensor, Coefs | None]:
        terms, w, coef = row_fn(b.ce, b.entropy, b.labels)
        if need_coefs and coef is None:  # not linear in ce: differentiate the row terms
            with torch.enable_grad():
                leaf = b.ce.detach().requires_grad_()
                coef = torch.autograd.grad(row_fn(leaf, b.entropy, b.labels)[0].sum(), leaf)[0]  # [c] dl/dce
        return terms, w, Coefs(coef, coef) if need_coefs else None

    return fused(hidden, weight, labels, block_fn, chunk_rows, kernel)[:4]


def _ce_rows(ce: Tensor, entropy: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    ones = torch.ones_like(ce)
    return ce, ones, ones


def token_ce(hidden: Tensor, weight: Tensor, labels: Tensor) -> Tensor:
    """[N] cross-entropy of each row's label (0 where ignored), chunked: the [N, V] logits never exist.
    For scoring (a reference model, held-out loss), not for training: no gradient is kept."""
    with torch.no_grad():
        return chunked(hidden, weight, labels, _ce_rows)[1]
