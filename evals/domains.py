"""Held-out loss per domain (``meta.pile_set_name``) during training, as the MiLe code logs it on the Pile.

The documents are the run's held-out set (``evals/heldout.py``: a fixed, seeded sample stratified by domain, the
same set the frequency-bucket evaluation scores), built once per run; every validation scores the same windows,
so curves compare across steps and runs. A domain's loss is the mean over every scored token of all its sampled
documents. With several ranks the windows are split between them and the sums all-reduced (every rank takes part,
as ZeRO-3 needs).

Reported (``eval_domain/...``): ``<domain>/loss`` and ``<domain>/tokens`` per domain, ``overall`` (the mean over
every held-out token, i.e. the domains' losses weighted by their token counts), ``average`` (the plain mean over
domains) and ``worst`` (the largest domain loss).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from evals.buckets import per_token_loss
from evals.heldout import HeldOut, HeldOutSet


@dataclass
class DomainSet:
    names: list[str]
    windows: Tensor
    """[n, seq_len + 1] int64: the held-out set's windows."""
    domain: Tensor
    """[n, seq_len] int64: index into ``names`` of each target token's domain; -1 where nothing is scored."""


def build_domain_set(held: HeldOutSet, inputs: HeldOut) -> DomainSet:
    """The held-out set's windows with each target token's domain."""
    names = sorted(held.domains)
    index = {name: i for i, name in enumerate(names)}
    of_document = torch.tensor([index[d.domain] for d in held.documents] + [-1])  # [D + 1]; -1: padding (doc -1)
    target_doc = inputs.document[:, 1:]  # [n, seq_len]
    domain = of_document[target_doc]  # document -1 picks the trailing -1
    if inputs.scored is not None:
        domain = torch.where(inputs.scored[:, 1:], domain, torch.full_like(domain, -1))
    return DomainSet(names=names, windows=inputs.windows, domain=domain)


@torch.no_grad()
def domain_losses(model: torch.nn.Module, held_out: DomainSet, batch_size: int = 16) -> dict[str, float]:
    """The metrics above for ``model`` (a ``models.GPT``), collective over the process group when there is one."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    k = len(held_out.names)
    device = next(model.parameters()).device
    sums = torch.zeros(2 * k, dtype=torch.float64)  # loss sums, then token counts, per domain
    mine = torch.arange(rank, len(held_out.windows), world)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(mine), batch_size):
            idx = mine[start : start + batch_size]
            loss, _ = per_token_loss(model, held_out.windows[idx], batch_size=batch_size)  # [b * seq_len]
            domain = held_out.domain[idx].reshape(-1)  # [b * seq_len]
            keep = domain >= 0
            sums.index_add_(0, domain[keep], loss[keep].double())
            sums.index_add_(0, domain[keep] + k, torch.ones(int(keep.sum()), dtype=torch.float64))
    finally:
        model.train(was_training)
    if world > 1:
        on_device = sums.to(device)
        dist.all_reduce(on_device)
        sums = on_device.cpu()
    loss, tokens = sums[:k], sums[k:]
    per_domain = loss / tokens.clamp_min(1)
    out = {f"{name}/loss": float(per_domain[i]) for i, name in enumerate(held_out.names)}
    out.update({f"{name}/tokens": float(tokens[i]) for i, name in enumerate(held_out.names)})
    out["overall"] = float(loss.sum() / tokens.sum())
    out["average"] = float(per_domain.mean())
    out["worst"] = float(per_domain.max())
    return out
