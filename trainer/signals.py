"""Pre-emption: SIGTERM or SIGINT asks the loop to finish its step, checkpoint and exit cleanly."""

from __future__ import annotations

import signal
import sys
from types import FrameType

import torch
import torch.distributed as dist


class Preemption:
    """Installs handlers for SIGTERM and SIGINT. The first signal sets a flag; a second one exits at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None:
            self.restore()
            sys.exit(128 + signum)
        self.received = signum
        print(
            f"received {signal.Signals(signum).name}: finishing the step, then checkpointing and exiting",
            file=sys.stderr,
            flush=True,
        )

    def requested(self) -> bool:
        """True on every rank if any rank got a signal (ranks must stop at the same step, or collectives hang)."""
        flag = torch.tensor([0 if self.received is None else 1], dtype=torch.int32)
        if dist.is_initialized() and dist.get_world_size() > 1:
            if dist.get_backend() == "nccl":
                flag = flag.cuda()
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
