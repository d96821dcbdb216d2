"""Per-token loss terms of each registered loss.

Every loss here is ``L = sum_i l_i / D`` over the tokens of a batch, where ``l_i`` is a function of the
token's cross-entropy ``ce_i`` (carrying gradient), its predictive entropy ``H_i`` (detached) and its label,
and ``D`` is either the token count or the sum of detached weights ``w_i`` (rank-averaged; see ``module.py``).
Formulas and the official code's quirks: MiLe arXiv 2310.19531, PDL arXiv 2505.16900, focal arXiv 1708.02002.

A loss is one class with ``row_terms``; adding a loss is one registry entry. Both the reference path
(autograd through materialised logits) and the fused path (``paths.chunked``, which needs dl_i/dce_i) call the
same ``row_terms``, so the two paths can only differ in how the CE and its gradient are computed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from trainer.losses.config import IGNORE_INDEX, LossConfig


class TokenWeighting:
    normalised: bool = False
    """True: divide by the (rank-averaged) sum of weights, keeping the loss on CE's scale.
    False: divide by the number of tokens."""
    counts_ignored: bool = False
    """True: ignored positions count in the normaliser (the official MiLe/focal code's behaviour)."""
    needs_token_counts: bool = False
    """True: ``build_loss`` must be given corpus token counts (the trainer supplies them)."""
    linear_in_ce: bool = True
    """True: ``row_terms`` returns ``l = w * ce`` with ``w`` detached, so dl/dce = w in closed form (the fused
    path then needs no autograd per block). False: l is another function of ce (autograd finds dl/dce)."""

    def row_terms(self, ce: Tensor, entropy: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """ce [n] (0 where ignored, may require grad), entropy [n] detached, labels [n] ->
        (l [n] per-token loss terms, w [n] detached normaliser weights). Masking is done by the caller."""
        raise NotImplementedError

    def __init__(self, cfg: LossConfig, token_counts: Tensor | None = None) -> None:
        pass


class CrossEntropy(TokenWeighting):
    def row_terms(self, ce: Tensor, entropy: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        return ce, torch.ones_like(entropy)


class MiLe(TokenWeighting):
    """w = (1 + H)^gamma from detached logits; L = sum(w * ce) / sum(w)."""

    normalised = True

    def __init__(self, cfg: LossConfig, token_counts: Tensor | None = None) -> None:
        self.gamma = cfg.gamma
        self.counts_ignored = cfg.count_ignored

    def row_terms(self, ce: Tensor, entropy: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        w = (1.0 + entropy).pow(self.gamma)
        return w * ce, w


class Focal(TokenWeighting):
    """The MiLe paper's focal baseline: w = (1 - sg(p_target))^gamma, rescaled like MiLe."""

    normalised = True

    def __init__(self, cfg: LossConfig, token_counts: Tensor | None = None) -> None:
        self.gamma = cfg.gamma
        self.counts_ignored = cfg.count_ignored

    def row_terms(self, ce: Tensor, entropy: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        w = (-torch.expm1(-ce.detach())).pow(self.gamma)  # 1 - p, accurate when p -> 1
        return w * ce, w


class FocalLin(TokenWeighting):
    """Lin et al. 2017: l = -alpha (1 - p)^gamma log p, gradient through the weight, mean over tokens."""

    linear_in_ce = False

    def __init__(self, cfg: LossConfig, token_counts: Tensor | None = None) -> None:
        self.gamma, self.alpha = cfg.gamma, cfg.focal_alpha

    def row_terms(self, ce: Tensor, entropy: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        # clamp: (1 - p)^gamma has an infinite slope at p = 1 for gamma < 1; the clamp keeps it finite.
        one_minus_p = (-torch.expm1(-ce)).clamp_min(1e-30)
        return self.alpha * one_minus_p.pow(self.gamma) * ce, torch.ones_like(entropy)


class PowerLawDecay(TokenWeighting):
    """PDL: static W[t] = (count[t] + k + eps)^-alpha; L = sum(W[y] ce) / sum(W[y])."""

    normalised = True
    needs_token_counts = True

    def __init__(self, cfg: LossConfig, token_counts: Tensor | None = None) -> None:
        if token_counts is None:
            raise ValueError("loss.name=pdl needs token_counts (a [V] tensor of corpus token counts)")
        self.table = pdl_weights(token_counts, cfg)  # [V] float64, on CPU until first use

    def row_terms(self, ce: Tensor, entropy: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        if self.table.device != labels.device:
            self.table = self.table.to(labels.device)
        w = self.table[labels.clamp_min(0)].to(ce.dtype)
        return w * ce, w


def pdl_weights(token_counts: Tensor, cfg: LossConfig) -> Tensor:
    """[V] counts -> [V] weights, rescaled so the mean weight per corpus occurrence is 1, optionally clipped.

    The rescale leaves the loss unchanged (it is a ratio) but makes ``max_weight`` and the logged mean weight
    comparable across corpora and alphas. Kept as a plain tensor, not a buffer: a bf16 engine casts buffers,
    and the weights span many orders of magnitude.
    """
    counts = token_counts.detach().to(torch.float64).cpu()
    if counts.ndim != 1 or bool((counts < 0).any()):
        raise ValueError("token_counts must be a 1-D tensor of non-negative counts")
    w = (counts + cfg.smoothing + cfg.eps).pow(-cfg.alpha)
    total = counts.sum()
    if total > 0:
        w = w / ((w * counts).sum() / total)
    if cfg.max_weight > 0:
        w = w.clamp_max(cfg.max_weight)
    return w


def build_weighting(cfg: LossConfig, token_counts: Tensor | None) -> TokenWeighting:
    if cfg.name not in LOSSES:
        raise ValueError(f"unknown loss {cfg.name!r}; valid losses: {sorted(LOSSES)}")
    return LOSSES[cfg.name](cfg, token_counts)


LOSSES: dict[str, type[TokenWeighting]] = {
    "ce": CrossEntropy,
    "focal": Focal,
    "focal_lin": FocalLin,
    "mile": MiLe,
    "pdl": PowerLawDecay,
}

__all__ = ["IGNORE_INDEX", "LOSSES", "TokenWeighting", "build_weighting", "pdl_weights"]
