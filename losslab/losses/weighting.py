"""Per-token loss terms of each registered loss, and the plug-in interface for a user's own.

Every loss here is ``L = sum_i l_i / D`` over the tokens of a call, where ``l_i`` is a function of the token's
cross-entropy (carrying gradient), of detached per-row statistics (entropy, p_y, logsumexp), of the token inputs
carried with the data (``weight``, ``ref_ce``) and of its label, and ``D`` is either the token count or the sum of
detached weights ``w_i`` (rank-averaged; see ``module.py``). Formulas and the official code's quirks: MiLe arXiv
2310.19531, PDL arXiv 2505.16900, focal arXiv 1708.02002, DFT arXiv 2508.05629, Rho-1 arXiv 2404.07965; data-carried
weights gpt-neox #865. ``docs/losses.md`` has them all, the modifiers and a worked plug-in.

A loss is one ``TokenWeighting`` subclass with ``row_terms`` and its declared ``params``; adding a loss is one
registry entry, or, outside this package, ``loss.name: "package.module:Class"``. The class docstring's
first paragraph is what ``docs/losses.md``'s table says the loss computes. Both the reference path (autograd
through materialised logits) and the fused path (``paths.fused``) call the same ``row_terms``, so the two paths
can only differ in how the per-row statistics and their gradients are computed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from losslab.losses.params import IGNORE_INDEX, NON_NEGATIVE, POSITIVE, Bound, LossSettings, Param, SettingError
from losslab.losses.plugins import import_plugin


@dataclass
class Rows:
    """What ``row_terms`` may use besides the loss's CE, for a block of rows (all rows for ``needs_all_rows``)."""

    ce: Tensor
    """[n] the plain (unsmoothed) CE, 0 where ignored. It carries the gradient like the ``ce`` argument (a
    focal_lin-style weight differentiates through it); detach it for a detached weight."""
    entropy: Tensor
    """[n] predictive entropy (natural log), detached."""
    lse: Tensor
    """[n] logsumexp of the logits, detached."""
    labels: Tensor
    """[n] target ids (IGNORE_INDEX where ignored)."""
    valid: Tensor
    """[n] bool, labels != IGNORE_INDEX."""
    inputs: dict[str, Tensor] = field(default_factory=dict)
    """[n] token inputs carried with the data (``"weight"``, ``"ref_ce"``), detached."""

    @property
    def p_y(self) -> Tensor:
        """[n] detached probability of the target (1 where ignored)."""
        return torch.exp(-self.ce.detach())


class TokenWeighting:
    """The base class of every loss: subclass it, declare ``params`` and write ``row_terms``."""

    params: tuple[Param, ...] = ()
    """The loss's own settings (``loss.<name>`` in a run config), each with its default, bound, documentation
    and run-name tag. ``TokenWeighting.__init__`` checks the values a config gives and sets each as an
    attribute (``self.gamma``), defaults filled in."""
    normalised: bool = False
    """True: divide by the (rank-averaged) sum of weights, keeping the loss on CE's scale.
    False: divide by the number of tokens."""
    official_counting: bool = False
    """True: ``loss.count_ignored`` applies (the official MiLe/focal code's counting of ignored positions)."""
    counts_ignored: bool = False
    """True: ignored positions count in the normaliser (set from ``loss.count_ignored`` where it applies)."""
    needs_token_counts: bool = False
    """True: ``build_loss`` must be given corpus token counts (the trainer supplies them)."""
    token_inputs: tuple[str, ...] = ()
    """Token inputs the loss reads (``rows.inputs``); a call without them is an error naming them."""
    needs_all_rows: bool = False
    """True: ``row_terms`` must see every row of the call at once (a top-k over the batch); the fused path then
    takes a second pass over the logits (4 matmuls instead of 3)."""
    needs_entropy: bool = True
    """True: ``row_terms`` reads ``rows.entropy``. False lets the fused path skip the entropy (a pass over every
    block of logits on a CPU) unless ``loss.log_entropy`` asks for it; a plug-in that does not read it says so."""
    linear_in_ce: bool = True
    """True: ``row_terms`` returns ``l = w * ce`` with ``w`` detached, so dl/dce = w in closed form (the fused
    path then needs no autograd per block). False: l is another function of ce (autograd finds the gradient)."""

    def row_terms(self, ce: Tensor, rows: Rows) -> tuple[Tensor, Tensor]:
        """ce [n]: the CE of the loss term — label-smoothed when ``loss.label_smoothing`` > 0 — carrying the
        gradient (0 where ignored unless smoothed); ``rows``: the rest -> (l [n] per-token loss terms,
        w [n] detached normaliser weights). Masking is done by the caller."""
        raise NotImplementedError

    def __init__(self, cfg: LossSettings, token_counts: Tensor | None = None) -> None:
        for name, value in check_params(type(self), cfg.params, cfg.name).items():
            setattr(self, name, value)
        self.counts_ignored = bool(cfg.count_ignored) and self.official_counting


class CrossEntropy(TokenWeighting):
    """sum CE_i / n"""

    needs_entropy = False

    def row_terms(self, ce: Tensor, rows: Rows) -> tuple[Tensor, Tensor]:
        return ce, torch.ones_like(rows.entropy)


class MiLe(TokenWeighting):
    """sum w_i CE_i / sum w_i, w_i = (1 + H_i)^gamma, detached (MiLe, arXiv 2310.19531)"""

    params = (Param("gamma", 1.0, "exponent of the weight (1 + H)^gamma (1.0 in every official config)",
                    NON_NEGATIVE, tag="g", always=True),)  # fmt: skip
    normalised = True
    official_counting = True
    gamma: float

    def row_terms(self, ce: Tensor, rows: Rows) -> tuple[Tensor, Tensor]:
        w = (1.0 + rows.entropy).pow(self.gamma)
        return w * ce, w


class Focal(TokenWeighting):
    """sum w_i CE_i / sum w_i, w_i = (1 - sg(p_y))^gamma (the MiLe paper's focal baseline)"""

    params = (Param("gamma", 1.0, "exponent of the weight (1 - p_y)^gamma (1.0 in the MiLe paper's configs)",
                    NON_NEGATIVE, tag="g", always=True),)  # fmt: skip
    needs_entropy = False
    normalised = True
    official_counting = True
    gamma: float

    def row_terms(self, ce: Tensor, rows: Rows) -> tuple[Tensor, Tensor]:
        w = (-torch.expm1(-rows.ce.detach())).pow(self.gamma)  # 1 - p, accurate when p -> 1
        return w * ce, w


class FocalLin(TokenWeighting):
    """sum focal_alpha (1 - p_y)^gamma CE_i / n, gradient through the weight (Lin et al. 2017)"""

    params = (
        Param("gamma", 1.0, "exponent of (1 - p_y)^gamma (the paper: 2)", NON_NEGATIVE, tag="g", always=True),
        Param("focal_alpha", 1.0, "constant class-balance factor (the paper: 0.25; 1 = no scaling)", POSITIVE,
              tag="a", always=True),
    )  # fmt: skip
    needs_entropy = False
    linear_in_ce = False
    gamma: float
    focal_alpha: float

    def row_terms(self, ce: Tensor, rows: Rows) -> tuple[Tensor, Tensor]:
        # clamp: (1 - p)^gamma has an infinite slope at p = 1 for gamma < 1; the clamp keeps it finite.
        one_minus_p = (-torch.expm1(-rows.ce)).clamp_min(1e-30)
        return self.focal_alpha * one_minus_p.pow(self.gamma) * ce, torch.ones_like(rows.entropy)


class PowerLawDecay(TokenWeighting):
    """sum W[y_i] CE_i / sum W[y_i], W[t] = (count[t] + smoothing + eps)^-alpha (PDL, arXiv 2505.16900)"""

    params = (
        Param("alpha", 1.0, "exponent of the weight: W[t] = (count[t] + smoothing + eps)^-alpha", NON_NEGATIVE,
              tag="a", always=True),
        Param("eps", 1e-7, "the official code's additive epsilon", NON_NEGATIVE, tag="eps"),
        Param("smoothing", 1.0, "add-k smoothing of the counts, so an unseen token weighs (k + eps)^-alpha, not "
              "eps^-alpha (with the official k = 0 an unseen special token weighs 1e7 and swamps the batch)",
              NON_NEGATIVE, tag="k"),
        Param("max_weight", 0.0, "if > 0, clip W at this multiple of its occurrence-weighted mean (W is rescaled "
              "to mean 1)", NON_NEGATIVE, tag="w"),
    )  # fmt: skip
    needs_entropy = False
    normalised = True
    needs_token_counts = True

    def __init__(self, cfg: LossSettings, token_counts: Tensor | None = None) -> None:
        super().__init__(cfg, token_counts)
        if token_counts is None:
            raise ValueError("loss.name=pdl needs token_counts (a [V] tensor of corpus token counts)")
        self.table = pdl_weights(token_counts, cfg)  # [V] float64, on CPU until first use

    def row_terms(self, ce: Tensor, rows: Rows) -> tuple[Tensor, Tensor]:
        if self.table.device != rows.labels.device:
            self.table = self.table.to(rows.labels.device)
        w = self.table[rows.labels.clamp_min(0)].to(ce.dtype)
        return w * ce, w


class DFT(TokenWeighting):
    """sum sg(p_y) CE_i / n (DFT, arXiv 2508.05629)"""

    needs_entropy = False

    def row_terms(self, ce: Tensor, rows: Rows) -> tuple[Tensor, Tensor]:
        p = rows.p_y.to(ce.dtype)
        return p * ce, p


class Weighted(TokenWeighting):
    """sum w_i CE_i / sum w_i, w_i = ``token_inputs["weight"]``, carried with the data (gpt-neox #865)"""

    needs_entropy = False
    normalised = True
    token_inputs = ("weight",)

    def row_terms(self, ce: Tensor, rows: Rows) -> tuple[Tensor, Tensor]:
        w = rows.inputs["weight"].to(ce.dtype)
        return w * ce, w


class Rho1(TokenWeighting):
    """sum over kept CE_i / n_kept: the ceil(keep_ratio n) valid tokens with the largest excess sg(CE_i) -
    ref_ce_i (Rho-1, arXiv 2404.07965; ties go to the earlier token)

    Selective language modelling: ``ref_ce`` is a reference model's per-token CE, carried with the data or
    scored online (``loss.reference``)."""

    params = (Param("keep_ratio", 0.6, "the fraction of a call's valid tokens kept (those with the largest excess "
                    "loss)", Bound(0.0, 1.0, lo_open=True), tag="keep", always=True),)  # fmt: skip
    needs_entropy = False
    normalised = True
    token_inputs = ("ref_ce",)
    needs_all_rows = True
    keep_ratio: float

    def row_terms(self, ce: Tensor, rows: Rows) -> tuple[Tensor, Tensor]:
        excess = rows.ce.detach() - rows.inputs["ref_ce"].to(ce.dtype)  # [n]
        excess = excess.masked_fill(~rows.valid, -math.inf)  # ignored tokens are never kept
        k = math.ceil(self.keep_ratio * int(rows.valid.sum()))
        # stable sort: among equal excesses the earlier token wins, the same on every device
        order = torch.sort(excess, descending=True, stable=True).indices[:k]
        kept = torch.zeros_like(ce, dtype=ce.dtype).index_fill_(0, order, 1.0).detach()
        return kept * ce, kept


def pdl_weights(token_counts: Tensor, cfg: LossSettings | None = None, **params: float) -> Tensor:
    """[V] counts -> [V] weights, rescaled so the mean weight per corpus occurrence is 1, optionally clipped.
    The parameters (alpha, eps, smoothing, max_weight) come from ``cfg`` or as keywords, PDL's defaults else.

    The rescale leaves the loss unchanged (it is a ratio) but makes ``max_weight`` and the logged mean weight
    comparable across corpora and alphas. Kept as a plain tensor, not a buffer: a bf16 engine casts buffers,
    and the weights span many orders of magnitude.
    """
    p = check_params(PowerLawDecay, {**(cfg.params if cfg is not None else {}), **params}, "pdl")
    counts = token_counts.detach().to(torch.float64).cpu()
    if counts.ndim != 1 or bool((counts < 0).any()):
        raise ValueError("token_counts must be a 1-D tensor of non-negative counts")
    w = (counts + p["smoothing"] + p["eps"]).pow(-p["alpha"])
    total = counts.sum()
    if total > 0:
        w = w / ((w * counts).sum() / total)
    if p["max_weight"] > 0:
        w = w.clamp_max(p["max_weight"])
    return w


def resolve_loss(name: str) -> type[TokenWeighting]:
    """A registered loss name, or "package.module:Class" naming a ``TokenWeighting`` subclass on the Python path;
    ValueError naming ``loss.name`` otherwise."""
    if name in LOSSES:
        return LOSSES[name]
    module, sep, attr = name.partition(":")
    if not sep or not module or not attr:
        raise ValueError(f"unknown loss {name!r}; valid losses: {sorted(LOSSES)} or 'package.module:Class'")
    cls = import_plugin(name, "loss.name")
    if not (isinstance(cls, type) and issubclass(cls, TokenWeighting)):
        raise ValueError(f"loss.name={name!r} is not a TokenWeighting subclass (losslab.losses.TokenWeighting)")
    return cls


def build_weighting(cfg: LossSettings, token_counts: Tensor | None) -> TokenWeighting:
    weighting = resolve_loss(cfg.name)(cfg, token_counts)
    # a plug-in with its own __init__ (not calling super's) still gets the official counting where it applies
    weighting.counts_ignored = bool(cfg.count_ignored) and weighting.official_counting
    return weighting


LOSSES: dict[str, type[TokenWeighting]] = {
    "ce": CrossEntropy,
    "dft": DFT,
    "focal": Focal,
    "focal_lin": FocalLin,
    "mile": MiLe,
    "pdl": PowerLawDecay,
    "rho1": Rho1,
    "weighted": Weighted,
}


def declared(name: str, missing_ok: bool = False) -> tuple[Param, ...]:
    """The parameters the loss ``name`` declares (a plug-in that cannot be imported: () with ``missing_ok``)."""
    try:
        return resolve_loss(name).params
    except ValueError:
        if missing_ok:
            return ()
        raise


def owners(key: str) -> list[str]:
    """The registered losses that declare a parameter named ``key``."""
    return sorted(n for n, cls in LOSSES.items() if any(p.name == key for p in cls.params))


def check_params(
    cls: type[TokenWeighting], given: Mapping[str, Any], name: str, modifiers: Iterable[str] = ()
) -> dict[str, Any]:
    """The loss's parameters: ``given`` checked against ``cls.params`` (type, bound), defaults filled in.
    A key the loss does not declare is a ValueError that says whose parameter it is (``modifiers``: the settings
    of every loss, named in that message)."""
    own = {p.name: p for p in cls.params}
    for key in sorted(given):
        if key not in own:
            raise SettingError(key, not_a_parameter(name, key, given[key], list(own), modifiers))
    return {p.name: p.check(given[p.name]) if p.name in given else p.default for p in cls.params}


def not_a_parameter(name: str, key: str, value: Any, own: list[str], modifiers: Iterable[str] = ()) -> str:
    has = f"its parameters: {', '.join(own)}" if own else "it has no parameters"
    whose = owners(key)
    if whose:
        return (f"loss.{key}={value} is a parameter of {', '.join(whose)}, not of loss.name={name} ({has}): "
                "remove it or choose one of those losses")  # fmt: skip
    mods = f"; modifiers: {', '.join(sorted(modifiers))}" if modifiers else ""
    return f"loss.{key} is not a setting of loss.name={name} ({has}{mods})"


__all__ = [
    "IGNORE_INDEX",
    "LOSSES",
    "Rows",
    "TokenWeighting",
    "build_weighting",
    "check_params",
    "declared",
    "owners",
    "pdl_weights",
    "resolve_loss",
]
