"""Token-level training losses: CE, DFT, focal (paper variant and Lin et al.), MiLe, PDL, Rho-1 and data-weighted
CE, with label smoothing and z-loss on any of them, and plug-ins (``docs/losses.md``). Needs torch only.

Public API: ``build_loss("mile", gamma=1.0)`` (or a ``LossConfig``, or a flat mapping) -> a module called as
``loss_fn(hidden, head_weight, labels, token_inputs=None)`` returning a ``LossOutput`` with ``.loss`` and
``.metrics``. A loss declares its parameters (``TokenWeighting.params``); a plug-in loss subclasses
``TokenWeighting`` the same way and is named ``loss.name: "package.module:Class"``. ``token_counts(...)``: PDL's
corpus counts from a tokenized dataset or texts.
"""

from losslab.losses.config import IGNORE_INDEX, MODIFIERS, Bound, LossConfig, Param
from losslab.losses.counts import token_counts
from losslab.losses.module import LossOutput, TokenLoss, build_loss
from losslab.losses.settings import loss_columns, loss_tag, resolve
from losslab.losses.weighting import LOSSES, Rows, TokenWeighting, pdl_weights, resolve_loss

__all__ = [
    "IGNORE_INDEX",
    "LOSSES",
    "MODIFIERS",
    "Bound",
    "LossConfig",
    "LossOutput",
    "Param",
    "Rows",
    "TokenLoss",
    "TokenWeighting",
    "build_loss",
    "loss_columns",
    "loss_tag",
    "pdl_weights",
    "resolve",
    "resolve_loss",
    "token_counts",
]
