"""Token-level training losses: CE, DFT, focal (paper variant and Lin et al.), MiLe, PDL, Rho-1 and data-weighted
CE, with label smoothing and z-loss on any of them, and plug-ins (``docs/losses.md``).

Public API: ``build_loss(cfg, token_counts=None)`` -> a module called as ``loss_fn(hidden, head_weight, labels,
token_inputs=None)`` returning a ``LossOutput`` with ``.loss`` and ``.metrics``. A plug-in loss subclasses
``TokenWeighting`` (its ``row_terms`` receive ``Rows``) and is named ``loss.name: "package.module:Class"``.
"""

from losslab.losses.config import IGNORE_INDEX, LossConfig
from losslab.losses.module import LossOutput, TokenLoss, build_loss
from losslab.losses.weighting import LOSSES, Rows, TokenWeighting, pdl_weights, resolve_loss

__all__ = [
    "IGNORE_INDEX",
    "LOSSES",
    "LossConfig",
    "LossOutput",
    "Rows",
    "TokenLoss",
    "TokenWeighting",
    "build_loss",
    "pdl_weights",
    "resolve_loss",
]
