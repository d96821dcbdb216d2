"""Pre-emption: SIGTERM or SIGINT asks the loop to finish its step, checkpoint and exit cleanly.

A checkpoint's evaluation is another matter: it can take longer than any pre-emption notice (Slurm's
``--signal=TERM@60``, a spot instance's two minutes, the launcher's 30 s before SIGKILL), and nothing is lost by
dropping it, since the checkpoint is on disk and a relaunch makes the evaluation it owes before anything else
(``trainer/loop.py``). So work run inside ``Preemption.interruptible()`` is stopped by the signal at once
(``Preempted`` raised in the main thread), and a signal received before it starts stops it before it starts.

What the launchers do with a signal (see README, "Pre-emption"):
- ``deepspeed`` (its per-node ``launch.py``) forwards SIGTERM/SIGINT to every rank, waits up to 30 s, then
  SIGKILLs the ranks still alive. The top ``deepspeed`` process forwards nothing on a single node: signal the
  process group (what Slurm and Kubernetes do) or ``launch.py``.
- ``torchrun`` forwards SIGTERM/SIGINT to every rank and waits for them (``--signals_to_handle``).
- Slurm ``srun``/``scancel`` signal every task of the step directly; with ``--signal=TERM@60`` ahead of the limit.
Signalling a whole process group reaches each rank twice (directly and forwarded), a few milliseconds apart:
signals within ``GRACE_S`` of the first are the same request. A signal after that exits at once.
"""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

import torch
import torch.distributed as dist

from losslab.log import get_logger
from trainer.collectives import host_group

log = get_logger(__name__)

GRACE_S = 10.0
"""Signals this soon after the first are duplicates of it (a launcher forwarding what the group also got)."""


class Preempted(BaseException):
    """A pre-emption signal stopped work run in ``Preemption.interruptible()``. A BaseException, like
    KeyboardInterrupt, so that no ``except Exception`` in the work it stops (lm-eval's) mistakes it for a failure
    of that work and carries on."""


class Preemption:
    """Installs handlers for SIGTERM and SIGINT. The first signal sets a flag (and stops interruptible work); one
    after ``GRACE_S`` exits."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: int | None = None
        self._first_at = 0.0
        self._interrupting: str | None = None  # what interruptible() runs now
        self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        self._group = host_group()

    @contextmanager
    def interruptible(self, what: str) -> Iterator[None]:
        """Runs the body unless a signal was received; a signal received while it runs raises ``Preempted`` in it.

        Use it only for work a relaunch redoes whole (its partial output is never read as finished)."""
        if self.received is not None:
            raise Preempted(f"{signal.Signals(self.received).name} received before {what}")
        self._interrupting = what
        try:
            yield
        finally:
            self._interrupting = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        now = time.monotonic()
        if self.received is not None:
            if now - self._first_at < GRACE_S:
                return  # the same request, delivered twice
            self._put_back()
            log.warning(f"received {signal.Signals(signum).name} again: exiting now")
            sys.exit(128 + signum)
        self.received, self._first_at = signum, now
        name = signal.Signals(signum).name
        if (what := self._interrupting) is not None:
            self._interrupting = None  # raised once: the duplicate a launcher forwards must not raise again
            log.warning(f"received {name}: stopping {what} (a relaunch with train.resume=auto makes it), then exiting")
            raise Preempted(f"{name} received during {what}")
        log.warning(f"received {name}: finishing the step, then checkpointing and exiting")

    def requested(self) -> bool:
        """True on every rank if any rank got a signal (ranks must stop at the same step, or collectives hang).

        The flag is reduced over a host (gloo) group: checking every step costs no device synchronisation."""
        flag = torch.tensor([0 if self.received is None else 1], dtype=torch.int32)
        if self._group is not None:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        return bool(flag.item())

    def restore(self) -> None:
        """Puts back the handlers found at start, once the run is over — unless a signal was received: that process
        is on its way out, and the duplicate a launcher sends within ``GRACE_S`` (deepspeed's launch.py terminating
        its ranks the moment it is signalled itself) must still be ignored, not kill it before it has written
        ``result.json`` (a pre-empted evaluation stops in milliseconds, well inside that window)."""
        if self.received is None:
            self._put_back()

    def _put_back(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
