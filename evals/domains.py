"""Held-out loss per domain (``meta.pile_set_name``) during training, as the MiLe code logs it on the Pile.

The held-out set is fixed and built once per run: for each domain of ``data.val_files``, its documents in file
order (EOS between them) cut into windows of ``seq_len + 1`` tokens, up to ``eval.val_tokens_per_domain``
tokens. The same windows are scored at every validation, so curves compare across steps and runs. With several
ranks the windows are split between them and the sums all-reduced (every rank takes part, as ZeRO-3 needs).

Reported (``eval_domain/...``): ``<domain>/loss`` and ``<domain>/tokens`` per domain, ``overall`` (the mean over
every held-out token, i.e. the domains' losses weighted by their token counts), ``average`` (the plain mean over
domains) and ``worst`` (the largest domain loss).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from data.shards import ReadStats, iter_documents, resolve_files
from data.tokenizer import Tokenizer
from evals.buckets import per_token_loss


@dataclass
class DomainSet:
    names: list[str]
    windows: Tensor
    """[n, seq_len + 1] int64, grouped by domain."""
    domain: Tensor
    """[n] index into ``names`` of each window."""


def build_domain_set(files: list[str], tokenizer: Tokenizer, seq_len: int, tokens_per_domain: int) -> DomainSet:
    streams: dict[str, list[int]] = defaultdict(list)
    need = tokens_per_domain + seq_len + 1
    for path in resolve_files(files):
        for doc in iter_documents(path, ReadStats()):
            name = doc.source or "unknown"
            if len(streams[name]) < need:
                streams[name].extend(tokenizer.encode(doc.text))
                streams[name].append(tokenizer.eos_id)
    window = seq_len + 1
    names = sorted(n for n, s in streams.items() if len(s) >= window)
    if not names:
        raise ValueError(f"held-out data {files} hold no domain with {window} tokens")
    rows, domain = [], []
    for i, name in enumerate(names):
        n = min(len(streams[name]), need) // window
        rows.append(torch.tensor(streams[name][: n * window]).view(n, window))
        domain.extend([i] * n)
    return DomainSet(names=names, windows=torch.cat(rows), domain=torch.tensor(domain))


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
            per_window = loss.double().view(len(idx), -1)  # [b, seq_len]
            sums.index_add_(0, held_out.domain[idx], per_window.sum(1))
            sums.index_add_(0, held_out.domain[idx] + k, torch.full((len(idx),), float(per_window.shape[1]),
                                                                     dtype=torch.float64))  # fmt: skip
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
