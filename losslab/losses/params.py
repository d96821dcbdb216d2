"""The declaration of a loss setting (``Param``) and its bounds: the leaf every loss module builds on (no import of
the losses themselves), so that the loss classes, their config and what is derived from both import one way."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

IGNORE_INDEX = -100
"""Label value of positions that carry no loss (padding, masked prompts)."""


@dataclass(frozen=True)
class Bound:
    """The values a numeric setting may take: ``lo`` < (or <=) value < (or <=) ``hi``; finite unless ``inf_ok``."""

    lo: float = -math.inf
    hi: float = math.inf
    lo_open: bool = False
    hi_open: bool = False
    inf_ok: bool = False

    def holds(self, v: float) -> bool:
        if math.isnan(v) or (math.isinf(v) and not self.inf_ok):
            return False
        above = v > self.lo if self.lo_open else v >= self.lo
        below = v < self.hi if self.hi_open else v <= self.hi
        return above and below

    def __str__(self) -> str:
        lo = f"{'(' if self.lo_open else '['}{self.lo:g}"
        hi = f"{self.hi:g}{')' if self.hi_open else ']'}"
        return f"in {lo}, {hi}" + ("" if self.inf_ok else ", finite")


NON_NEGATIVE = Bound(0.0)
POSITIVE = Bound(0.0, lo_open=True)
AT_LEAST_ONE = Bound(1.0)
FRACTION = Bound(0.0, 1.0)
OPEN_FRACTION = Bound(0.0, 1.0, hi_open=True)

_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


class SettingError(ValueError):
    """A loss setting that cannot be used; ``key`` names it (``gamma``), the message says why."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


@dataclass(frozen=True)
class Param:
    """One setting of a loss: declared once, with the loss class (or on ``LossConfig`` for a modifier).

    ``tag``: its short name in run names, W&B job types and comparison labels (``mile-g1``; "" = the name
    itself). A number is shown as ``tag + value``, a bool as ``tag`` when true; ``always``: shown even at its
    default (a loss's primary parameter), else only when changed. ``in_name=False``: never shown, for a
    setting that changes no number (a kernel choice, a block size). Every parameter of a loss changes its math
    and is named, so two runs that differ in one never share a name.
    """

    name: str
    default: float | int | bool | str
    doc: str
    bound: Bound | None = None
    tag: str = ""
    always: bool = False
    in_name: bool = True
    choices: tuple[str, ...] = ()
    """For a string setting: the values it may take (empty: any string)."""

    @property
    def kind(self) -> type:
        return type(self.default)

    def check(self, value: Any) -> float | int | bool | str:
        """``value`` as this setting's type, within its bound; ValueError naming ``loss.<name>`` otherwise.
        Strings that spell a number or a bool are read as one (a command line gives strings)."""
        key = f"loss.{self.name}"
        try:
            return self._check(value, key)
        except ValueError as e:
            raise SettingError(self.name, str(e)) from None

    def _check(self, value: Any, key: str) -> float | int | bool | str:
        kind = self.kind
        if kind is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
                return value.lower() in _TRUE
            raise ValueError(f"{key}={value!r} is not a bool (true or false)")
        if kind is str:
            if isinstance(value, bool) and self.choices:  # YAML reads `fused: true` as a bool
                value = str(value).lower()
            if isinstance(value, bool) or not isinstance(value, str | int | float):
                raise ValueError(f"{key}={value!r} is not a string")
            value = str(value)
            if self.choices and value.lower() not in self.choices:
                raise ValueError(f"{key}={value!r} is not valid; choose one of {list(self.choices)}")
            return value.lower() if self.choices else value
        if isinstance(value, bool):
            raise ValueError(f"{key}={value!r} is not a number")
        try:
            number = kind(float(value)) if kind is float else _as_int(value)
        except (TypeError, ValueError):
            raise ValueError(f"{key}={value!r} is not {'a number' if kind is float else 'an integer'}") from None
        if self.bound is not None and not self.bound.holds(float(number)):
            raise ValueError(f"{key}={value} is out of range: it must be {self.bound}")
        return number

    def label(self, value: Any) -> str:
        """This setting's part of a run name at ``value`` ("" when it is not shown)."""
        if not self.in_name or (value == self.default and not self.always):
            return ""
        tag = self.tag or self.name
        if isinstance(value, bool):
            return tag if value else ""
        return f"{tag}{value:g}" if isinstance(value, float) else f"{tag}{value}"


def _as_int(value: Any) -> int:
    if isinstance(value, int):
        return value
    number = float(value)
    if not number.is_integer():
        raise ValueError(value)
    return int(number)


class LossSettings(Protocol):
    """What a loss class reads of its config (``config.LossConfig`` is one)."""

    name: str
    params: dict[str, Any]
    count_ignored: bool
