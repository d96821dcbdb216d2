"""Token-level training losses: CE, focal (paper variant and Lin et al.), MiLe and PDL.

Public API: ``build_loss(cfg, token_counts=None)`` -> a module called as ``loss_fn(hidden, head_weight, labels)``
returning a ``LossOutput`` with ``.loss`` and ``.metrics``.
"""

from trainer.losses.config import IGNORE_INDEX, LossConfig
from trainer.losses.module import LossOutput, TokenLoss, build_loss
from trainer.losses.weighting import LOSSES, pdl_weights

__all__ = ["IGNORE_INDEX", "LOSSES", "LossConfig", "LossOutput", "TokenLoss", "build_loss", "pdl_weights"]
