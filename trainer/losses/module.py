"""The loss module the trainer calls: ``loss_fn(hidden, head_weight, labels) -> LossOutput``."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from trainer.losses import paths
from trainer.losses.config import IGNORE_INDEX, LossConfig
from trainer.losses.weighting import TokenWeighting, build_weighting


class LossOutput(NamedTuple):
    """A named tuple rather than a dataclass: DeepSpeed's ZeRO-3 module hooks see through tuples and dicts
    (and warn that they cannot through anything else)."""

    loss: Tensor
    """Scalar to backpropagate."""
    metrics: dict[str, Tensor]
    """Detached per-step statistics (device tensors: the caller decides when to sync)."""


class TokenLoss(nn.Module):
    """Weighted next-token loss over a batch: ``L = (sum_i l_i / n) * a`` with ``a = mean_ranks(n / sum_i w_i)``.

    On one rank that is ``sum l / sum w``; across data-parallel ranks the normaliser is averaged the way the
    official MiLe code does (all-reduce of the per-rank scalar ``a``), so each rank's gradient stays local.
    ``n`` counts the non-ignored tokens (or all positions when ``count_ignored`` reproduces the official code).
    For unnormalised losses (ce, focal_lin) ``a`` is 1 and no communication happens.
    """

    def __init__(self, cfg: LossConfig, weighting: TokenWeighting) -> None:
        super().__init__()
        fused = str(cfg.fused).lower()
        if fused not in ("auto", "true", "false"):
            raise ValueError(f"loss.fused must be auto, true or false, got {cfg.fused!r}")
        if cfg.kernel not in ("auto", "torch", "triton"):
            raise ValueError(f"loss.kernel must be auto, torch or triton, got {cfg.kernel!r}")
        self.cfg = cfg
        self.weighting = weighting
        self.fused = fused != "false"

    def _row_fn(self, ce: Tensor, entropy: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """-> (masked loss terms, normaliser weights, dl/dce when the loss is w * ce with w detached)."""
        terms, w = self.weighting.row_terms(ce, entropy, labels)
        valid = labels != IGNORE_INDEX
        counted = torch.ones_like(valid) if self.weighting.counts_ignored else valid
        coef = (w * valid).detach() if self.weighting.linear_in_ce else None
        return terms * valid, (w * counted).detach(), coef

    def forward(
        self, hidden: Tensor, head_weight: Tensor, labels: Tensor, denominator: Tensor | None = None
    ) -> LossOutput:
        """``denominator`` (unnormalised losses only): divide the summed loss by it instead of this batch's token
        count — the trainer passes global valid tokens / (micro-steps x ranks), which makes gradient accumulation
        and data parallelism exact when batches hold different numbers of valid tokens."""
        h = hidden.reshape(-1, hidden.shape[-1])  # [N, d]
        y = labels.reshape(-1)  # [N]
        if h.shape[0] != y.shape[0]:
            raise ValueError(f"hidden has {h.shape[0]} rows but labels has {y.shape[0]}")
        if self.fused:
            numerator, ce, entropy, w = paths.chunked(
                h, head_weight, y, self._row_fn, self.cfg.chunk_size, self.cfg.kernel
            )
        else:
            numerator, ce, entropy, w = paths.reference(h, head_weight, y, self._row_fn)
        valid = y != IGNORE_INDEX
        num_valid = valid.sum().to(numerator.dtype)
        n = torch.full_like(num_valid, y.numel()) if self.weighting.counts_ignored else num_valid
        w_sum = w.sum()
        if self.weighting.normalised:  # the official rank-averaged normaliser
            scale = n / w_sum.clamp_min(torch.finfo(w_sum.dtype).tiny)  # a_r = 1 / mean_r(w)
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                dist.all_reduce(scale, op=dist.ReduceOp.SUM)
                scale = scale / dist.get_world_size()
            loss = numerator / n.clamp_min(1.0) * scale
        elif denominator is not None:
            loss = numerator / denominator.to(numerator.dtype).clamp_min(1.0)
        else:
            loss = numerator / n.clamp_min(1.0)
        safe_valid = num_valid.clamp_min(1.0)
        metrics = {
            "ce": (ce * valid).sum() / safe_valid,
            "entropy": (entropy * valid).sum() / safe_valid,
            "weight": w_sum / n.clamp_min(1.0),
            "tokens": num_valid,
        }
        return LossOutput(loss=loss, metrics=metrics)


def build_loss(cfg: LossConfig | dict, token_counts: Tensor | None = None) -> TokenLoss:
    """Build the loss named by ``cfg.name`` (a ``LossConfig`` or an equivalent dict)."""
    if isinstance(cfg, dict):
        unknown = set(cfg) - set(LossConfig.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown loss keys {sorted(unknown)}; valid: {sorted(LossConfig.__dataclass_fields__)}")
        cfg = LossConfig(**cfg)
    return TokenLoss(cfg, build_weighting(cfg, token_counts))
