"""Typed config of the training loss (the ``loss`` node of a run config)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

IGNORE_INDEX = -100
"""Label value of positions that carry no loss (padding, masked prompts)."""


@dataclass
class LossConfig:
    name: str = "ce"
    """One of the registered losses: ce, dft, focal, focal_lin, mile, pdl, rho1, weighted (see
    ``losslab.losses.LOSSES``), or "package.module:Class", a ``TokenWeighting`` subclass (a plug-in)."""
    gamma: float = 1.0
    """Exponent of the weight: (1 + H)^gamma for mile, (1 - p)^gamma for focal / focal_lin."""
    focal_alpha: float = 1.0
    """focal_lin only: Lin et al.'s constant class-balance factor (0.25 in the paper; 1.0 = no scaling)."""
    alpha: float = 1.0
    """pdl only: W[t] = (count[t] + smoothing + eps)^-alpha."""
    eps: float = 1e-7
    """pdl only: the official code's additive epsilon."""
    smoothing: float = 1.0
    """pdl only: add-k smoothing of counts, so a token never seen gets weight (k + eps)^-alpha, not eps^-alpha
    (with the official k = 0 an unseen special token weighs 1e7 and swamps the batch)."""
    max_weight: float = 0.0
    """pdl only: if > 0, clip W at this multiple of its occurrence-weighted mean (W is rescaled to mean 1)."""
    keep_ratio: float = 0.6
    """rho1 only: the fraction of a call's valid tokens kept (those with the largest excess loss)."""
    reference: str = ""
    """rho1: a checkpoint (or run) directory of a frozen reference model scored online, each micro-batch, in
    place of a ``ref_ce`` stream carried with the data (one extra forward of the reference per micro-batch;
    ``scripts/score_reference.py`` pays it once, ahead of training)."""
    label_smoothing: float = 0.0
    """Any loss: the CE in the loss term becomes (1 - e) CE + e mean_v(-log p_v); weights are unchanged."""
    z_loss: float = 0.0
    """Any loss: adds z_loss * mean over valid tokens of logsumexp^2 (PaLM; OLMo-core uses 1e-4)."""
    options: dict[str, Any] = field(default_factory=dict)
    """Plug-in losses only: their own settings, read by the plug-in's ``__init__`` from ``cfg.options``."""
    entropy_clamp: float = 0.0
    """mile (and the logged entropy): 0 = the exact entropy; > 0 = the official MiLe code's, every probability
    clamped below at this value first (its code: 1e-8), which differs at peaked distributions (docs/losses.md)."""
    log_entropy: bool = False
    """Log the mean predictive entropy (``entropy``) for a loss that does not use it itself. Off by default: on a
    CPU it is one more pass over every block of logits; mile computes (and logs) it anyway."""
    count_ignored: bool = False
    """mile / focal: reproduce the official code's counting, where ignored positions still add their weight
    to the normaliser and count in the mean. False (default) masks them, which is what the formula means."""
    fused: str = "auto"
    """auto | true | false. Fused: logits are built chunk by chunk and never materialised as [N, V]."""
    kernel: str = "auto"
    """Row-wise part of the fused path: auto (Triton on CUDA when installed) | triton | torch |
    "package.module:Class" (a plug-in ``RowKernel``). Any but torch is checked against torch on first use per
    device and dtype and replaced by it, with one warning line, if it fails (``losslab/losses/kernels.py``)."""
    chunk_size: int = 0
    """Rows per chunk of the fused path; 0 picks a size that keeps a chunk's logits near 64 MiB."""
