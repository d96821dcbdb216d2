"""Faults the tests inject into a training run, as plug-in callbacks (``run.callbacks``, ``trainer/plugins.py``):
the loop and the checkpoint writer carry no test hooks of their own. Each fault meets the run where a real one
would — a loss that is not finite, a pre-emption signal, a process killed while a checkpoint is written — and
the run handles it by its ordinary paths.

    train(debug_overrides(corpus, run_dir, **nan_at(3, 5)))             # key=value overrides
    grid_run(*as_args(sigterm_at(3)))
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import torch

from trainer.callbacks import Callback


class NanAt(Callback):
    """Multiplies the loss of every micro-batch of the given steps by NaN, before its backward pass (so its
    gradients and logged loss are NaN, and the loop's own non-finite path skips the step)."""

    changes_training = True  # a skipped step: another run

    def __init__(self, steps: list[int]) -> None:
        self.steps = set(steps)

    def micro_loss(self, step: int, micro: int, loss: torch.Tensor) -> torch.Tensor:
        return loss * float("nan") if step in self.steps else loss


class SigtermAt(Callback):
    """Sends this process SIGTERM at the start of a step (a pre-emption notice arriving during the step)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def pre_step(self, step: int) -> None:
        if step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


class KillInCheckpointAt(Callback):
    """SIGKILLs this process halfway through writing a step's checkpoint: every file written, nothing
    committed (no checksums gathered, no ``meta.json``, not renamed into place)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def pre_checkpoint_commit(self, step: int, tmp: Path) -> None:
        if step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def _fault(name: str, cls: type[Callback], **kwargs: Any) -> dict[str, Any]:
    """``run.callbacks.NAME.*`` overrides that install ``cls`` with ``kwargs``."""
    return {f"run.callbacks.{name}.target": f"tests.faults:{cls.__name__}",
            **{f"run.callbacks.{name}.{k}": v for k, v in kwargs.items()}}  # fmt: skip


def nan_at(*steps: int) -> dict[str, Any]:
    return _fault("nan_at", NanAt, steps=list(steps))


def sigterm_at(step: int) -> dict[str, Any]:
    return _fault("sigterm_at", SigtermAt, step=step)


def kill_in_checkpoint_at(step: int) -> dict[str, Any]:
    return _fault("kill_in_checkpoint_at", KillInCheckpointAt, step=step)


def as_args(overrides: dict[str, Any]) -> list[str]:
    return [f"{k}={v}" for k, v in overrides.items()]
