"""Small host-side collectives (over a CPU/gloo group, so no device synchronisation and no CUDA device needed):
agreeing on a decision that one rank made, or that any rank's failure must stop every rank together."""

from __future__ import annotations

import functools
from typing import Any, TypeVar

import torch.distributed as dist

T = TypeVar("T")


def host_group() -> dist.ProcessGroup | None:
    """A CPU process group over all ranks, or None alone. Collective the first time: every rank calls it at the
    same point (it is then kept)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return None
    return _cpu_group()


@functools.cache
def _cpu_group() -> dist.ProcessGroup:
    return dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")


def from_rank0(value: T) -> T:
    """Rank 0's ``value`` on every rank."""
    group = host_group()
    if group is None:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def gathered(value: T) -> list[T]:
    """Every rank's ``value``, in rank order, on every rank."""
    group = host_group()
    if group is None:
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value, group=group)
    return out


def first_failure(error: str | None) -> str | None:
    """Collective: the lowest rank's error (``None`` where a rank had none), the same on every rank, so that all
    stop together instead of some waiting at the next collective for a rank that raised."""
    return next((e for e in gathered(error) if e is not None), None)
