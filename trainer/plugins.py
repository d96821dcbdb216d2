"""Plug-in callbacks: ``run.callbacks``, a mapping name -> ``{target: "package.module:Class", **kwargs}``.

Each names a ``trainer.callbacks.Callback`` subclass on the Python path, built with the other keys as keyword
arguments on every rank, after the built-in callbacks. They are how a user adds a side concern to the loop
without editing it, and how the tests inject faults (``tests/faults.py``: a NaN loss, SIGTERM, SIGKILL while a
checkpoint is written). Every entry is checked — importable, a ``Callback``, its keyword arguments accepted —
before anything heavy is built, each mistake one line naming ``run.callbacks.NAME``.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Mapping
from typing import Any

from losslab.losses.plugins import import_plugin
from trainer.callbacks import Callback
from trainer.config import ConfigError


def _split(name: str, spec: Any) -> tuple[str, dict[str, Any]]:
    key = f"run.callbacks.{name}"
    if not isinstance(spec, Mapping) or not isinstance(spec.get("target"), str) or ":" not in spec["target"]:
        raise ConfigError(f"{key} must be a mapping with target: package.module:Class (and its keyword arguments)")
    return spec["target"], {k: v for k, v in spec.items() if k != "target"}


def callback_class(name: str, spec: Any) -> tuple[type[Callback], dict[str, Any]]:
    """The class ``run.callbacks.NAME`` names and the keyword arguments it is built with (checked, not built)."""
    key = f"run.callbacks.{name}"
    target, kwargs = _split(name, spec)
    try:
        cls = import_plugin(target, f"{key}.target")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if not (isinstance(cls, type) and issubclass(cls, Callback)):
        raise ConfigError(f"{key}.target={target!r} is not a trainer.callbacks.Callback subclass")
    try:
        inspect.signature(cls).bind(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{key}: {target} does not take these arguments ({e}); given {sorted(kwargs)}") from None
    return cls, kwargs


def load_callbacks(specs: Mapping[str, Any]) -> list[Callback]:
    """The plug-in callbacks of a run, built in the order the config lists them."""
    out = []
    for name, spec in specs.items():
        cls, kwargs = callback_class(name, spec)
        try:
            out.append(cls(**kwargs))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"run.callbacks.{name}: {e}") from None
    return out


def training_callbacks(specs: Mapping[str, Any]) -> list[str]:
    """The plug-ins that change what a step computes (``Callback.changes_training``), each as its spec in JSON,
    sorted: what a resume compares (their names are labels). One that cannot be imported counts as changing
    training: nothing can say it does not."""
    out = []
    for name, spec in specs.items():
        try:
            changes = callback_class(name, spec)[0].changes_training
        except ConfigError:
            changes = True
        if changes:
            out.append(json.dumps(spec, sort_keys=True, default=str))
    return sorted(out)
