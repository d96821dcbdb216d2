"""The fused loss's block loop: per-token statistics, the loss numerator and its gradients from (hidden, head
weight, labels), never holding more than one [c, V] block of logits.

Every loss here depends on a row's logits only through lse, the target logit z_y and the mean logit m (CE = lse -
z_y, smoothed CE = lse - (1-e) z_y - e m, z-loss = lse^2; weights are detached or functions of these), so the
gradient w.r.t. the logits is ``a_i * softmax_i - b_i * onehot_i - u_i`` with three per-row coefficients
(``rows.Coefs``: a = dl/dlse, b = -dl/dz_y, u = -dl/dm / V), and the gradients w.r.t. hidden and head weight are
computed inside the forward, block by block (``grads.py``).

``forward_blocks`` is three named steps over blocks of rows (``_BlockLoop``): the **statistics** of a block
(logsumexp, the target's CE, the entropy, the mean logit: the row kernel, ``rows.py``), the **row terms** (the
loss and its masks, ``block_fn(rows: Block, need_coefs) -> (terms [c], w [c], Coefs | None)``, from
``module.py``; the z-loss is added here, with weight ``z_lambda`` relative to the numerator) and the **gradients**.
They run in one of two orders:

- one pass (``_one_pass``): statistics, row terms and gradients block by block: 3 matmuls in all;
- two passes (``_two_pass``), for row terms that need every row first (rho1's top-k over the call; a
  weight-normalised loss with a z-loss, whose two parts have different normalisers): the statistics of every
  block, the row terms of all rows at once, then the gradients of each block from its logits computed again:
  4 matmuls.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor

from losslab.losses.config import IGNORE_INDEX
from losslab.losses.grads import LogitGrads, SoftmaxGrads
from losslab.losses.rows import Coefs, RowKernel


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmax statistics are kept in fp32 (fp64 when the inputs are fp64, for reference tests)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def logits_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype of ``hidden @ weight.T`` here: autocast's where it is on (it leaves float64 alone)."""
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev) and torch.float64 not in (hidden.dtype, weight.dtype):
        return torch.get_autocast_dtype(dev)
    return torch.promote_types(hidden.dtype, weight.dtype)


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

    def __post_init__(self) -> None:
        if callable(self.z_lambda) and not self.two_pass:
            raise ValueError("FusedOptions: a callable z_lambda needs every row's weight first (two_pass=True)")


class Fused(NamedTuple):
    numerator: Tensor  # sum of the row terms (z-loss included), accumulation dtype
    ce: Tensor  # [N] detached, as the rest
    entropy: Tensor
    w: Tensor
    lse: Tensor
    grad_h: Tensor | None  # [N, d] gradient of the numerator, inputs' dtype
    grad_w: Tensor | None  # [V, d]


def _with_z_loss(terms: Tensor, coefs: Coefs | None, lse: Tensor, valid: Tensor, lam) -> tuple[Tensor, Coefs | None]:
    """terms + lam * lse^2 on valid rows; d/dlse = 2 lam lse goes into the softmax coefficient."""
    if isinstance(lam, Tensor) or lam:
        lse_valid = lse * valid  # [c]
        terms = terms + lam * lse_valid * lse  # [c]
        if coefs is not None:
            coefs = coefs._replace(a=coefs.a + 2 * lam * lse_valid)
    return terms, coefs


EntropySource = Literal["none", "gradient", "kernel"]


def _entropy_source(rows: RowKernel, opts: FusedOptions, grads: LogitGrads | SoftmaxGrads | None) -> EntropySource:
    """Where each row's entropy comes from:

    - "none": nothing reads it and the kernel can skip it (the entropies are NaN);
    - "gradient": the softmax gradients' p @ W gives it with no pass over the block — only in one pass (two
      passes need every entropy before any gradient) and for the exact entropy (the clamped one needs p itself);
    - "kernel": the kernel's statistics."""
    if not opts.entropy and rows.optional_entropy:
        return "none"
    if isinstance(grads, SoftmaxGrads) and rows.optional_entropy and not (opts.two_pass or opts.entropy_clamp):
        return "gradient"
    return "kernel"


class _BlockLoop:
    """The [N] outputs of the fused computation, and the steps that fill them for rows s..e."""

    def __init__(self, hidden: Tensor, weight: Tensor, labels: Tensor, block_fn: BlockFn, rows: RowKernel,
                 opts: FusedOptions, need_grad: bool) -> None:  # fmt: skip
        N = hidden.shape[0]
        acc = accumulation_dtype(hidden.dtype)
        self.hidden, self.weight, self.labels = hidden, weight, labels  # [N, d], [V, d], [N]
        self.block_fn, self.rows, self.opts = block_fn, rows, opts
        self.valid = labels != IGNORE_INDEX  # [N]
        # [N] each, in the accumulation dtype: every block writes its rows
        self.ce, self.entropy, self.lse, self.terms, self.w = (hidden.new_empty(N, dtype=acc) for _ in range(5))
        self.mean_z = hidden.new_empty(N, dtype=acc) if opts.mean_z else None  # [N]
        self.grads: LogitGrads | SoftmaxGrads | None = None
        if need_grad and rows.softmax_state:
            self.grads = SoftmaxGrads(hidden, weight, labels, self.valid, acc, logits_dtype(hidden, weight))
        elif need_grad:
            self.grads = LogitGrads(rows, hidden, weight, labels, self.valid, acc)
        self.entropy_from = _entropy_source(rows, opts, self.grads)
        if self.entropy_from == "none":
            self.entropy.fill_(torch.nan)  # a reader that should have asked for it gets NaN, not stale memory
        # a plug-in kernel need not know the option it is not asked for
        self.clamp_arg = (opts.entropy_clamp,) if opts.entropy_clamp else ()

    def logits(self, s: int, e: int) -> Tensor:
        return self.hidden[s:e] @ self.weight.T  # [c, V], in the inputs' dtype (autocast's where it is on)

    def statistics(self, s: int, e: int, z: Tensor) -> tuple[Tensor, Any]:
        """The kernel's statistics of rows s..e (z [c, V]) into the [N] outputs; -> (lse [c], its state)."""
        ent = self.entropy[s:e] if self.entropy_from == "kernel" else None  # [c] or None: not from the kernel
        mz = None if self.mean_z is None else self.mean_z[s:e]  # [c]
        lse, state = self.rows.stats(z, self.labels[s:e], self.valid[s:e], self.ce[s:e], ent, mz, *self.clamp_arg)
        self.lse[s:e] = lse
        return lse, state

    def row_terms(self, s: int, e: int, lse: Tensor) -> Coefs | None:
        """The loss's terms and weights of rows s..e (``block_fn``; lse [c]), the z-loss added, into the [N]
        outputs; -> the coefficients of their gradient (None when there are no gradients)."""
        mz = None if self.mean_z is None else self.mean_z[s:e]  # [c]
        inputs = {k: v[s:e] for k, v in self.opts.inputs.items()}  # [c] each
        block = Block(self.ce[s:e], self.entropy[s:e], lse, mz, self.labels[s:e], self.valid[s:e],
                      self.weight.shape[0], inputs)  # fmt: skip
        terms, w, coefs = self.block_fn(block, self.grads is not None)  # [c], [c], Coefs of [c] (or None)
        lam = self.opts.z_lambda
        if callable(lam):  # the two-pass mode, all rows at once: the weights are all known now
            lam = lam(w)
        terms, coefs = _with_z_loss(terms, coefs, lse, self.valid[s:e], lam)
        self.terms[s:e] = terms
        self.w[s:e] = w
        return coefs

    def result(self) -> Fused:
        grad_h, grad_w = (None, None) if self.grads is None else self.grads.finish()
        return Fused(self.terms.sum(), self.ce, self.entropy, self.w, self.lse, grad_h, grad_w)


def _one_pass(loop: _BlockLoop, spans: list[tuple[int, int]]) -> None:
    """Per block: its statistics, its row terms, its gradients (3 matmuls per block)."""
    grads = loop.grads
    for s, e in spans:
        z = loop.logits(s, e)  # [c, V]
        lse, state = loop.statistics(s, e, z)  # [c], the kernel's state
        held = None if grads is None else grads.hold(z, lse, state)  # what the gradients need of the block
        del z, state  # only `held` keeps the block: with the softmax gradients, p and not the logits next to it
        if loop.entropy_from == "gradient":
            grads.entropy(s, held, lse, loop.entropy[s:e])  # [c], before the row terms read it
        coefs = loop.row_terms(s, e, lse)
        if grads is not None:
            grads.add(s, held, coefs)
        del held  # freed before the next block's logits


def _two_pass(loop: _BlockLoop, spans: list[tuple[int, int]]) -> None:
    """The statistics of every block, the row terms of all rows at once, then each block's gradients from its
    logits computed again (4 matmuls per block)."""
    for s, e in spans:
        loop.statistics(s, e, loop.logits(s, e))
    coefs = loop.row_terms(0, len(loop.lse), loop.lse)  # every row's statistics are known now
    if loop.grads is None:
        return
    for s, e in spans:
        held = loop.grads.recompute(loop.logits(s, e), loop.lse[s:e])  # from z [c, V] and lse [c]
        loop.grads.add(s, held, coefs.rows(s, e))  # coefs [c] each
        del held  # freed before the next block's logits


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
    """The fused computation over blocks of ``chunk_rows`` rows (hidden [N, d], weight [V, d], labels [N]);
    gradients (of the numerator) in the inputs' dtypes."""
    opts = opts or FusedOptions()
    N = hidden.shape[0]
    spans = [(s, min(s + chunk_rows, N)) for s in range(0, N, chunk_rows)]  # the last block may be ragged
    loop = _BlockLoop(hidden, weight, labels, block_fn, rows, opts, need_grad)
    (_two_pass if opts.two_pass else _one_pass)(loop, spans)
    return loop.result()
