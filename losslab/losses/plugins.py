"""``package.module:Name`` plug-ins (losses, row kernels): one importer, one error form."""

from __future__ import annotations

import importlib


def import_plugin(spec: str, key: str) -> object:
    """The object ``spec`` (``package.module:Name``) names on the Python path; ValueError naming ``key``
    (e.g. ``loss.name``) when it cannot be imported. The caller checks what kind of object it is."""
    module, _, attr = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"{key}={spec!r} cannot be imported: {type(e).__name__}: {e}") from None
