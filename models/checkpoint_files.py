"""One loader for every file of a checkpoint, which may be torn (a crash mid-copy), foreign or hostile.

Each reader returns plain data or raises ``CheckpointError`` naming the file and what is wrong with it, so the
scripts report one line (exit 2) instead of a library's traceback. Nothing here unpickles code: safetensors for
weights, JSON for metadata, and ``torch.load(weights_only=True)`` with an explicit allow-list for DeepSpeed's own
state files.
"""

from __future__ import annotations

import json
import pickle
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


class CheckpointError(RuntimeError):
    """A checkpoint that cannot (or must not) be loaded; the message names the file."""


def load_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file (on the CPU)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(
            f"{path}: not a readable safetensors file (truncated or corrupt?): {_first_line(e)}"
        ) from None


def load_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON (truncated or corrupt?): {e}") from None


_UNSUPPORTED = re.compile(r"Unsupported global: GLOBAL (\S+)")


def load_torch(path: str | Path, safe_globals: list[Any], map_location: Any = None) -> Any:
    """A ``torch.save`` file holding only tensors, plain containers and the allow-listed classes."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        with torch.serialization.safe_globals(safe_globals):
            return torch.load(str(path), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = _UNSUPPORTED.search(str(e))
        what = f"the global {found.group(1)!r}" if found else _first_line(e)
        # torch's own message goes on to suggest weights_only=False: never do that for a file you did not write
        raise CheckpointError(
            f"refusing to load {path}: it references {what}, which is not plain data (tensors, containers or "
            "DeepSpeed's state classes); a file written by losslab never does"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable torch file (truncated or corrupt?): {_first_line(e)}") from None


def reading(path: str | Path, action: Callable[[], Any]) -> Any:
    """Run a library's loader of ``path`` (a checkpoint directory) and turn its failures into one line."""
    try:
        return action()
    except CheckpointError:
        raise
    except (AssertionError, RuntimeError, OSError, KeyError, ValueError, EOFError) as e:
        raise CheckpointError(f"{path}: cannot be loaded: {type(e).__name__}: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__
