"""Loss tags: a loss with the parameters that change its math (``mile-g1``, ``ce-ls0.1``), as run names, W&B
columns and the groups of a comparison (``evals/compare/runs.py``) show it. Here, below ``trainer``, so that the
comparison reads run directories without importing the trainer."""

from __future__ import annotations

from typing import Any

# The parameters of each loss that change its math, as (config key, short tag, always shown): the primary one is
# always in the name (so "mile-g1" says which gamma), the others only when they differ from their default.
LOSS_NAME_PARAMS: dict[str, list[tuple[str, str, bool]]] = {
    "ce": [],
    "focal": [("gamma", "g", True), ("count_ignored", "official", False)],
    "focal_lin": [("gamma", "g", True), ("focal_alpha", "a", True)],
    "mile": [("gamma", "g", True), ("count_ignored", "official", False)],
    "pdl": [("alpha", "a", True), ("smoothing", "k", False), ("max_weight", "w", False)],
}


# Settings of every loss that change its math, in the name only when they differ from their default.
MODIFIER_NAME_PARAMS: list[tuple[str, str]] = [("label_smoothing", "ls"), ("z_loss", "z"), ("entropy_clamp", "clamp")]


def _short(value: float | bool) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value).lower()


def loss_tag(loss: Any) -> str:
    """``mile-g1``, ``focal_lin-g2-a0.25``, ``pdl-a0.5-k0``, ``ce-ls0.1``, ``ce-z0.0001``: the loss and the
    parameters that matter, modifiers included. ``loss``: a run's loss section (a ``LossConfig`` or the ``loss``
    mapping of a saved config.yaml)."""
    from losslab.losses.config import LossConfig

    default = LossConfig()
    parts = [loss.name]
    params = LOSS_NAME_PARAMS.get(loss.name, []) + [(key, tag, False) for key, tag in MODIFIER_NAME_PARAMS]
    for key, tag, always in params:
        value = getattr(loss, key, getattr(default, key))
        if isinstance(value, bool):
            if value != getattr(default, key):
                parts.append(tag)
        elif always or value != getattr(default, key):
            parts.append(f"{tag}{_short(value)}")
    return "-".join(parts)
