"""Optimizer and learning-rate schedule."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from trainer.config import TrainSection

FINAL_NORM = "ln_f.weight"


def param_groups(model: nn.Module, train: TrainSection) -> list[dict[str, Any]]:
    """Matrices decay; norms and biases (1-D parameters) do not — except the final norm's weight with
    ``train.decay_final_norm`` (the MiLe official code's filter)."""

    def decays(name: str, p: nn.Parameter) -> bool:
        return p.ndim >= 2 or (train.decay_final_norm and name == FINAL_NORM)

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in named if decays(n, p)]
    no_decay = [p for n, p in named if not decays(n, p)]
    return [{"params": decay, "weight_decay": train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(step: int, *, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup over ``warmup`` steps, then cosine from 1 to ``min_ratio`` at ``total``.
    ``step`` counts optimizer steps already taken (0 for the first)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, train: TrainSection) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_factor(step, warmup=train.warmup_steps, total=train.max_steps, min_ratio=train.min_lr_ratio),
    )


def schedule_warning(train: TrainSection) -> str | None:
    """A warning (not an error: a smoke test of a few steps checks the pipeline, not the schedule) when the
    warmup takes the whole run, so the LR never decays — or never even reaches ``train.lr``."""
    total = max(train.max_steps, train.extend_to)
    if train.warmup_steps < total:
        return None
    peak = "reaches train.lr only at the last step" if train.warmup_steps == total else "never reaches train.lr"
    return (
        f"warning: train.warmup_steps={train.warmup_steps} >= the run's {total} steps: the LR only warms up, "
        f"never decays, and {peak}; set train.warmup_steps below {total} for a schedule that decays"
    )
