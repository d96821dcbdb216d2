"""Diagnostics through ``logging``, in one format, on stderr.

``print`` is for what a command outputs (its results; the training progress lines on stdout). Everything else —
warnings, errors, notes on what a command is doing — goes through ``get_logger(__name__)``, into the
``losslab`` logger tree, whose one handler writes each record to stderr:

- the message as written (``warning: ...``, ``error: ...``: tests and users match on these words), prefixed
  ``[rank R] `` when the job has more than one rank;
- rank-aware: only rank 0 writes notes and warnings (every rank would say the same thing); errors are written
  by every rank (a failure on one rank must not be lost), and so is a record logged with
  ``extra={"all_ranks": True}``.

The rank is that of the initialised process group, else the launcher's ``RANK`` (``WORLD_SIZE``); it is read
when a record is written, so a logger made at import time is right after ``init_distributed``. The handler
writes to whatever ``sys.stderr`` is at that moment (a redirection, pytest's capture). It lives at the lowest
floor (``losslab``) so that every package can use it; ``logging.getLogger("losslab")`` reconfigures it.

Scripts end on an error with ``return fail(message)``: one line on stderr, and the exit code (2).
"""

from __future__ import annotations

import logging
import os
import sys

ROOT = "losslab"


def rank_and_world() -> tuple[int, int]:
    dist = sys.modules.get("torch.distributed")  # never imports torch: a command that has not needs no rank
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


class _Ranks(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        rank, world = rank_and_world()
        if rank != 0 and record.levelno < logging.ERROR and not getattr(record, "all_ranks", False):
            return False
        record.rank = f"[rank {rank}] " if world > 1 else ""
        return True


class _Stderr(logging.StreamHandler):
    """A stream handler on the ``sys.stderr`` of the moment, not the one there was at import."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _install() -> logging.Logger:
    root = logging.getLogger(ROOT)
    if not any(isinstance(h, _Stderr) for h in root.handlers):
        handler = _Stderr()
        handler.addFilter(_Ranks())
        handler.setFormatter(logging.Formatter("%(rank)s%(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = False  # one line per record, whatever the root logger holds (pytest's, a library's)
    return root


_install()


def get_logger(name: str) -> logging.Logger:
    """The logger of module ``name`` (``__name__``) in the ``losslab`` tree."""
    if name == ROOT or name.startswith(ROOT + "."):
        return logging.getLogger(name)
    return logging.getLogger(f"{ROOT}.{name}")


def fail(message: object, code: int = 2, prefix: str = "error: ") -> int:
    """A script's error and exit in one: ``message`` as one line on stderr (after ``prefix``), and the exit
    code for ``main`` to return (``return fail(e)``)."""
    get_logger("scripts").error(f"{prefix}{message}")
    return code
