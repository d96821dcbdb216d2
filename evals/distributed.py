"""lm-eval shared by every rank of the process group: each rank scores its share of lm-eval's requests with its
own copy of the model (or, under ZeRO-3, its shard: the weights are gathered layer by layer as ZeRO-3 provides
them), and every rank receives all the results in request order. lm-eval then computes its metrics from the same
list on every rank, so the scores are those of one rank evaluating alone; rank 0 writes them.

Why requests and not lm-eval's own ``rank``/``world_size`` split: lm-eval shares out *documents* and gathers each
rank's per-document metrics rank by rank, so the aggregation (and a bootstrap's resampling) sees another order
than one rank would; sharing requests keeps lm-eval single-process, its order untouched, and lets the shares be
balanced by length (the longest requests are dealt out in turn)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from evals.buckets import per_token_loss
from evals.lm import LosslabLM


def world() -> tuple[int, int]:
    """(rank, world size) of the process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def deal(sizes: Sequence[int], rank: int, world_size: int) -> list[int]:
    """This rank's share of items of the given sizes: the largest first, dealt out to the ranks in turn, so each
    rank gets nearly the same count (within one) and nearly the same work. Indices in the caller's order."""
    order = sorted(range(len(sizes)), key=lambda i: (-sizes[i], i))
    return sorted(order[rank::world_size])


def _size(request: Any) -> int:
    """A request's work, in characters of its strings (context + continuation, the text to score, a prompt)."""
    return sum(len(a) for a in request.args if isinstance(a, str))


class SharedLM(LosslabLM):
    """``LosslabLM`` whose every request type is shared out among the ranks (``deal``) and gathered back in
    request order on every rank. Every rank must make the same calls (lm-eval does, given the same tasks and
    seeds). ``lockstep``: the model's forward passes are collectives (ZeRO-3 gathers each layer's weights from
    every rank), so a rank whose share is done runs one-token passes, paired with the others' real ones, until
    every rank is done — each pass is preceded by a one-integer all-reduce saying whether any rank still has work.
    ``requests``: per request type, how many requests each rank scored; ``seconds``: how long each rank took
    over its shares (until it had scored them, before waiting for the others), ``cpu_seconds``: the CPU time its
    process spent meanwhile (the work itself, where the ranks compete for a machine's cores)."""

    def __init__(self, *args: Any, lockstep: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, move=False, **kwargs)  # the training model, on the device it trains on
        self.share_rank, self.share_world = world()
        self.lockstep = lockstep
        self.requests: dict[str, list[int]] = {}
        self.seconds = [0.0] * self.share_world
        self.cpu_seconds = [0.0] * self.share_world

    def _any(self, mine: bool) -> bool:
        flag = torch.tensor([int(mine)], device=self._device)  # on the device: NCCL reduces device tensors only
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _before_forward(self) -> None:
        if self.lockstep:
            self._any(True)

    @torch.no_grad()
    def _drain(self) -> None:
        """Idle passes (the trunk and the head on one token, the modules a real pass runs) until every rank's
        share is done."""
        if not self.lockstep:
            return
        ids = torch.full((1, 1), self.tok.eos_id, dtype=torch.long, device=self._device)  # [1, 1]
        while self._any(False):
            with self._autocast():
                self.model.head(self.model(ids)[:, -1])

    def _shared(self, kind: str, requests: list[Any], score: Callable[[list[Any], list[int]], list[Any]]) -> list:
        mine = deal([_size(r) for r in requests], self.share_rank, self.share_world)
        started, cpu = time.perf_counter(), time.process_time()
        local = score([requests[i] for i in mine], mine)
        busy = (time.perf_counter() - started, time.process_time() - cpu)
        self._drain()
        parts: list[Any] = [None] * self.share_world
        dist.all_gather_object(parts, (mine, local, busy))
        out: list[Any] = [None] * len(requests)
        for r, (indices, results, (seconds, cpu_seconds)) in enumerate(parts):
            self.seconds[r] += seconds
            self.cpu_seconds[r] += cpu_seconds
            for i, result in zip(indices, results, strict=True):
                out[i] = result
        counts = self.requests.setdefault(kind, [0] * self.share_world)
        for r, (indices, *_) in enumerate(parts):
            counts[r] += len(indices)
        return out

    def _quiet(self, disable_tqdm: bool) -> bool:
        return disable_tqdm or self.share_rank != 0

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        quiet = self._quiet(disable_tqdm)
        return self._shared("loglikelihood", requests, lambda s, _: LosslabLM.loglikelihood(self, s, quiet))

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        quiet = self._quiet(disable_tqdm)
        return self._shared("loglikelihood_rolling", requests,
                            lambda s, _: LosslabLM.loglikelihood_rolling(self, s, quiet))  # fmt: skip

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        # each request keeps its index in the whole call: a sampled output is seeded by it (LosslabLM._generate)
        quiet = self._quiet(disable_tqdm)
        return self._shared("generate_until", requests, lambda s, idx: self._generate(s, idx, quiet))


def shared_per_token_loss(
    model: Any, windows: Tensor, batch_size: int, lengths: Tensor | None = None, progress: str = ""
) -> tuple[Tensor, Tensor, list[int]]:
    """``per_token_loss`` over ``windows`` [n, T + 1] shared among the ranks in contiguous blocks of equal size
    (the last padded with copies of the first window, dropped again), so every rank runs the same number of
    batches — under ZeRO-3 each is a collective (a batch cut to its longest row, ``lengths``, is still one pass
    per batch on every rank). ``progress``: rank 0's label for its progress lines (its block's).
    -> (loss [n * T], targets [n * T], windows each rank scored)."""
    rank, size = world()
    n = len(windows)
    per = math.ceil(n / size)
    mine = windows[rank * per : (rank + 1) * per]
    real = len(mine)
    my_lengths = None if lengths is None else lengths[rank * per : (rank + 1) * per]
    if real < per:
        mine = torch.cat([mine, windows[:1].expand(per - real, -1)])  # [per, T + 1]
        if my_lengths is not None:
            my_lengths = torch.cat([my_lengths, lengths[:1].expand(per - real)])  # [per]
    loss, targets = per_token_loss(model, mine, batch_size=batch_size, lengths=my_lengths,
                                   progress=progress if rank == 0 else "")  # fmt: skip  # [per * T] each
    T = windows.shape[1] - 1
    parts: list[Any] = [None] * size
    dist.all_gather_object(parts, (loss[: real * T], targets[: real * T]))
    counts = [len(p[0]) // T if T else 0 for p in parts]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), counts
