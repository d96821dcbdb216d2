"""Typed config of the training loss, and the declarations every setting is derived from.

A loss class declares its own parameters (``TokenWeighting.params``: a tuple of ``Param``); the modifiers that
apply to every loss (label smoothing, z-loss, ...) are declared here, on ``LossConfig``'s fields. Everything else
— the run config's ``loss`` section, its bounds check, run names and W&B columns, ``scripts/train.py --list`` and
the tables of ``docs/losses.md`` — is derived from those declarations (``losslab/losses/settings.py``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from losslab.losses.params import (  # noqa: F401  (re-exported: the config's names)
    AT_LEAST_ONE,
    FRACTION,
    IGNORE_INDEX,
    NON_NEGATIVE,
    OPEN_FRACTION,
    POSITIVE,
    Bound,
    Param,
    SettingError,
)
from losslab.losses.weighting import declared


def setting(default: Any, doc: str, bound: Bound | None = None, tag: str = "", choices: tuple[str, ...] = ()) -> Any:
    """A ``LossConfig`` field declared as a ``Param`` (its name is the field's); in run names only with a tag."""
    param = Param("", default, doc, bound, tag, in_name=bool(tag), choices=choices)
    return field(default=default, metadata={"param": param})


@dataclass(init=False)
class LossConfig:
    """The loss of a run: ``name``, the loss's own parameters (``params``, declared by its class) and the
    modifiers that apply to every loss. ``LossConfig("mile", gamma=2.0)`` and ``LossConfig(name="mile",
    params={"gamma": 2.0})`` are the same; ``cfg.gamma`` reads a parameter (its declared default when unset)."""

    name: str = "ce"
    """One of the registered losses (``losslab.losses.LOSSES``: ce, dft, focal, focal_lin, mile, pdl, rho1,
    weighted), or "package.module:Class", a ``TokenWeighting`` subclass (a plug-in)."""
    params: dict[str, Any] = field(default_factory=dict)
    """The selected loss's own parameters (``TokenWeighting.params``); those left out take their defaults. In a
    run config they are written flat, ``loss.gamma``, next to the modifiers."""
    label_smoothing: float = setting(
        0.0, "the CE in the loss term becomes (1 - e) CE + e mean_v(-log p_v); weights are unchanged", OPEN_FRACTION,
        tag="ls")  # fmt: skip
    z_loss: float = setting(
        0.0, "adds z_loss * mean over valid tokens of logsumexp^2 (PaLM; OLMo-core uses 1e-4)", NON_NEGATIVE, tag="z"
    )
    entropy_clamp: float = setting(
        0.0, "0 = the exact entropy; > 0 = the official MiLe code's, every probability clamped below at this value "
        "first (its code: 1e-8); for a loss that reads the entropy (mile) or with log_entropy", OPEN_FRACTION,
        tag="clamp")  # fmt: skip
    count_ignored: bool = setting(
        False, "the official MiLe code's counting: ignored positions add their weight to the normaliser and count "
        "in the mean (mile, focal); false masks them, as the formula means",
        tag="official")  # fmt: skip
    normalise: str = setting(
        "weights", "weight-normalised losses (mile, focal, pdl, weighted, rho1): weights = each call (a micro-batch on "
        "one rank) divided by the sum of its detached weights, rank-averaged, as the official code does; tokens = "
        "the weighted sum divided by the step's count of target tokens, as CE is: gradient accumulation and data "
        "parallelism then give the large batch's loss exactly, on another scale (the mean weight's)",
        tag="norm", choices=("weights", "tokens"))  # fmt: skip
    log_entropy: bool = setting(
        False, "log the mean predictive entropy (entropy) for a loss that does not read it (on a CPU one more "
        "pass over every block of logits)")  # fmt: skip
    fused: str = setting(
        "auto", "fused: the [N, V] logits are built block by block, never materialised; false: the materialised "
        "reference", choices=("auto", "true", "false"))  # fmt: skip
    kernel: str = setting(
        "auto",
        "the row-wise part of the fused path: auto (Triton on CUDA when installed), triton, torch or "
        "package.module:Class (a plug-in RowKernel); any but torch is checked against torch on first use",
    )
    chunk_size: int = setting(
        0, "rows per block of the fused path; 0 picks a size that keeps a block's logits near 64 MiB (8 MiB on a "
        "CPU)", NON_NEGATIVE)  # fmt: skip
    reference: str = setting(
        "", "rho1: a checkpoint (or run) directory of a frozen reference model scored online, each micro-batch, in "
        "place of a ref_ce stream carried with the data (one extra forward per micro-batch)")  # fmt: skip

    def __init__(self, name: str = "ce", params: Mapping[str, Any] | None = None, **settings: Any) -> None:
        self.params = dict(params or {})
        self.name = name
        for f in dataclasses.fields(self):
            if f.name not in ("name", "params"):
                setattr(self, f.name, settings.pop(f.name, f.default))
        overlap = sorted(set(settings) & set(self.params))
        if overlap:
            raise ValueError(f"loss parameters {overlap} given twice (flat and in params)")
        self.params.update(settings)  # everything else is the loss's own: checked against its declaration

    def __getattr__(self, key: str) -> Any:
        # only reached for names that are not fields: the selected loss's parameters
        params = self.__dict__.get("params")
        if params is None or key.startswith("__"):
            raise AttributeError(key)
        if key in params:
            return params[key]
        for p in declared(self.name):
            if p.name == key:
                return p.default
        raise AttributeError(f"loss {self.name!r} has no parameter {key!r}")

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> LossConfig:
        """From a flat mapping (``{"name": "mile", "gamma": 1.0, "z_loss": 1e-4}``), as a config file writes the
        ``loss`` section. A section saved before losses declared their parameters (every loss's keys, and
        ``options`` for a plug-in's) is read as that version ran it: the keys the selected loss does not declare
        were ignored then, and are dropped."""
        flat = dict(mapping)
        if "options" in flat:  # the old flat union of every loss's keys
            options = flat.pop("options") or {}
            own = {p.name for p in declared(flat.get("name", "ce"), missing_ok=True)}
            flat = {k: v for k, v in flat.items() if k in MODIFIER_NAMES or k in ("name", "params") or k in own}
            flat.update(options)
        return cls(**flat)

    def to_mapping(self) -> dict[str, Any]:
        """The flat mapping ``from_mapping`` reads: name, the loss's parameters, then the modifiers."""
        out: dict[str, Any] = {"name": self.name, **self.params}
        out.update({p.name: getattr(self, p.name) for p in MODIFIERS})
        return out


MODIFIERS: tuple[Param, ...] = tuple(
    dataclasses.replace(f.metadata["param"], name=f.name) for f in dataclasses.fields(LossConfig) if f.metadata
)
"""The settings of every loss (``LossConfig``'s fields but ``name`` and ``params``), as declarations."""
MODIFIER_NAMES = frozenset(p.name for p in MODIFIERS)
