"""The row-wise part of the fused loss on one [c, V] block of logits: the ``RowKernel`` protocol, which every
kernel satisfies, and the two built-in kernels (``TorchRows``, ``TritonRows``).

A kernel computes each row's statistics (``stats``). The gradient w.r.t. the block's logits,
dl/dz = a * softmax - b * onehot(y) - u with per-row coefficients ``Coefs``, then comes one of two ways, which
the kernel declares (``softmax_state``):

- the state that ``stats`` returns is the block's softmax, and the block loop takes the gradients from it
  (``grads.SoftmaxGrads``): such a kernel needs no ``grad`` (``TorchRows``);
- else the kernel forms dl/dz itself (``grad``: a ``GradKernel``) and the block loop multiplies it out
  (``grads.LogitGrads``; ``TritonRows``).

``missing(kernel)`` names what an object lacks to be used as a kernel; ``kernels.resolve`` refuses a plug-in
(``loss.kernel: "package.module:Class"``) that lacks anything, and ``kernels.py`` picks and checks kernels.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch
from torch import Tensor


class Coefs(NamedTuple):
    """Per-row gradient of a loss term w.r.t. its row of logits: ``a * softmax - b * onehot(y) - u`` ([c] each;
    u None when 0)."""

    a: Tensor
    b: Tensor
    u: Tensor | None = None

    def rows(self, s: int, e: int) -> Coefs:
        """The coefficients of rows s..e."""
        return Coefs(*(None if c is None else c[s:e] for c in self))


@runtime_checkable
class RowKernel(Protocol):
    """What every row kernel provides (``loss.kernel`` names one; a plug-in is any class or object with these
    members, or a subclass of this class, which gives both flags False)."""

    softmax_state: bool = False
    """True: the state ``stats`` returns is the block's softmax [c, V] in the dtype of ``ce_out``, from which the
    block loop takes the gradients itself (``grads.SoftmaxGrads``), and ``grad`` is never called. False: the
    kernel is a ``GradKernel``."""
    optional_entropy: bool = False
    """True: ``stats`` accepts ``ent_out=None`` and then skips the entropy; it is handed None when nothing reads
    the entropy, or when the softmax gradients' matmul gives it instead. False: ``ent_out`` is always a tensor."""

    def stats(
        self,
        z: Tensor,
        y: Tensor,
        valid: Tensor,
        ce_out: Tensor,
        ent_out: Tensor | None,
        mz_out: Tensor | None = None,
        entropy_clamp: float = 0.0,
    ) -> tuple[Tensor, Any]:
        """z [c, V] logits, y [c] labels, valid [c] bool. Write ce (0 where ignored), entropy (of the probabilities
        clamped below at ``entropy_clamp`` when it is > 0; ``entropy_clamp`` is passed only then) and, if given,
        the mean logit into the [c] outputs; -> (lse [c], state)."""
        ...


@runtime_checkable
class GradKernel(RowKernel, Protocol):
    """A row kernel whose state is not the softmax: it forms the gradient w.r.t. the logits itself."""

    def grad(self, z: Tensor, y: Tensor, valid: Tensor, lse: Tensor, coefs: Coefs, state: Any) -> Tensor:
        """-> dl/dz [c, V] = a * softmax(z) - b * onehot(y) - u in z's dtype; may overwrite z. ``state`` is None
        when the block's statistics came from an earlier pass (two-pass mode)."""
        ...


def missing(kernel: object) -> list[str]:
    """The members ``kernel`` lacks to be used as a row kernel (none: it can be)."""
    lacks = [name for name in ("softmax_state", "optional_entropy", "stats") if not hasattr(kernel, name)]
    if not lacks and not callable(kernel.stats):
        lacks = ["a callable stats"]
    if not lacks and not (kernel.softmax_state or isinstance(kernel, GradKernel)):
        lacks = ["grad (or softmax_state = True)"]
    return lacks


class TorchRows:
    """Row statistics of a [c, V] block with plain torch ops (any device, any dtype); the gradients come from
    their softmax (``softmax_state``).

    On a CPU every op here is a pass over the block, so there are as few as the statistics allow: ATen's
    softmax (one fused kernel, row by row in cache) gives the CE (-log p_y) and, with the target's logit, the
    logsumexp; the entropy costs one more (dot) pass, taken only when asked for (``ent_out``) — and the fused
    path asks only when it cannot get it from the gradient's matmul instead (``optional_entropy``)."""

    optional_entropy = True
    softmax_state = True

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
        (lse [c], the softmax [c, V])."""
        acc = ce_out.dtype
        p = torch.softmax(z, dim=-1, dtype=acc)  # [c, V]; bf16 logits are read as they are, no fp32 copy of them
        idx = y.clamp_min(0)[:, None]  # [c, 1]
        z_y = z.gather(1, idx).squeeze(1).to(acc)  # [c]
        logp_y = p.gather(1, idx).squeeze(1).log_()  # [c]; exact to rounding while p_y is a normal float
        lse = z_y - logp_y  # [c] logsumexp, to rounding
        lost = logp_y < math.log(torch.finfo(p.dtype).tiny)  # [c] p_y underflowed (a CE above ~87 in fp32): rare
        if lost.any():
            lse = torch.where(lost, torch.logsumexp(z.to(acc), dim=-1), lse)  # an extra pass, for such a block only
            logp_y = torch.where(lost, z_y - lse, logp_y)  # [c]
        torch.neg(logp_y, out=ce_out).masked_fill_(~valid, 0.0)
        if mz_out is not None:
            torch.mean(z, dim=-1, dtype=acc, out=mz_out)  # [c]
        if ent_out is None:
            return lse, p
        if entropy_clamp:  # -sum max(p, c) log max(p, c), a few rows at a time: small temporaries
            for i in range(0, len(p), 256):
                pc = p[i : i + 256].clamp_min(entropy_clamp)  # [256, V]
                ent_out[i : i + 256] = -(pc * pc.log()).sum(-1)
        else:  # H = lse - sum_v p_v z_v, as a batched dot to avoid another [c, V] temporary
            torch.sub(lse, (p.unsqueeze(1) @ z.to(acc).unsqueeze(2)).view(-1), out=ent_out)
        return lse, p


class TritonRows:
    """The same with the Triton kernels of ``triton_rows.py``: two passes over the block, gradient in place.
    Imported on first call: triton is an optional dependency."""

    optional_entropy = False
    softmax_state = False

    @staticmethod
    def stats(
        z: Tensor,
        y: Tensor,
        valid: Tensor,
        ce_out: Tensor,
        ent_out: Tensor | None,
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
