"""A single value where the config schema holds a list: ``data.train_files=x.jsonl.zst`` on the command line, or
``train_files: x.jsonl.zst`` in YAML, means the one-element list; an empty value (``data.val_files=``) means
none. OmegaConf alone refuses both ("AnyNode is not a ListConfig")."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf


def scalars_to_lists(base: DictConfig, layer: DictConfig | dict) -> DictConfig | dict:
    """``layer`` with each scalar (or empty) value at a list key of ``base``'s typed sections made a list.
    A free-form mapping (``data.mix``, ``loss.options``, ``distributed.raw``) is left as written."""
    plain = OmegaConf.to_container(layer, resolve=False) if isinstance(layer, DictConfig) else copy.deepcopy(layer)
    if not isinstance(plain, dict):
        return layer
    return OmegaConf.create(plain) if _walk(base, plain) else layer


def _walk(base: DictConfig, layer: dict[str, Any]) -> bool:
    changed = False
    for key, value in layer.items():
        if not isinstance(key, str) or key not in base:
            continue  # an unknown key: the merge names it
        node = base._get_node(key)
        if isinstance(node, DictConfig) and isinstance(value, dict):
            if dataclasses.is_dataclass(OmegaConf.get_type(node)):
                changed |= _walk(node, value)
        elif isinstance(node, ListConfig) and not isinstance(value, (list, dict)):
            if isinstance(value, str) and value.startswith("${"):
                continue  # an interpolation: resolved later, to whatever it names
            layer[key] = [] if value is None or value == "" else [value]
            changed = True
    return changed
