"""Held-out loss split by token frequency — the MiLe paper's analysis.

Vocabulary buckets from training-data counts: sorted by frequency, ``high`` holds the most frequent tokens that
together cover the first 80% of occurrences, ``medium`` the next 15%, ``low`` the last 5% (tokens never seen
in the counts are ``low``). Each held-out target token falls in its bucket; per bucket we report the mean
loss, its perplexity and the token count. The token-weighted mean of the bucket losses is the overall loss.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from data.shards import ReadStats, iter_documents, resolve_files
from data.tokenizer import Tokenizer
from models import GPT
from trainer.losses import paths

BUCKETS = (("high", 0.80), ("medium", 0.95), ("low", 1.0))


def frequency_buckets(counts: Tensor) -> Tensor:
    """[V] counts -> [V] bucket index (0 high, 1 medium, 2 low)."""
    counts = counts.to(torch.float64)
    order = torch.argsort(counts, descending=True, stable=True)
    sorted_counts = counts[order]
    total = sorted_counts.sum().clamp_min(1.0)
    before = (torch.cumsum(sorted_counts, 0) - sorted_counts) / total  # share of occurrences ahead of each token
    sorted_bucket = torch.full_like(order, len(BUCKETS) - 1)
    for i, (_, upper) in reversed(list(enumerate(BUCKETS[:-1]))):
        sorted_bucket[before < upper] = i
    sorted_bucket[sorted_counts == 0] = len(BUCKETS) - 1
    bucket = torch.empty_like(order)
    bucket[order] = sorted_bucket
    return bucket


def held_out_windows(files: list[str], tokenizer: Tokenizer, seq_len: int, max_tokens: int) -> Tensor:
    """[n, seq_len + 1] windows of the held-out documents (EOS between documents), up to ``max_tokens``."""
    stream: list[int] = []
    need = max_tokens + seq_len + 1
    for path in resolve_files(files):
        for doc in iter_documents(path, ReadStats()):
            stream.extend(tokenizer.encode(doc.text))
            stream.append(tokenizer.eos_id)
            if len(stream) >= need:
                break
        if len(stream) >= need:
            break
    n = min(len(stream), need) // (seq_len + 1)
    if n == 0:
        raise ValueError(f"held-out data {files} hold fewer than {seq_len + 1} tokens")
    return torch.tensor(stream[: n * (seq_len + 1)]).view(n, seq_len + 1)


@torch.no_grad()
def per_token_loss(model: GPT, windows: Tensor, batch_size: int = 8) -> tuple[Tensor, Tensor]:
    """-> (loss [n * seq_len] fp32, target token ids [n * seq_len]), without materialising the logits."""
    device = next(model.parameters()).device
    losses, targets = [], []
    for s in range(0, len(windows), batch_size):
        batch = windows[s : s + batch_size].to(device)
        hidden = model(batch[:, :-1])
        weight = model.head.weight[: model.cfg.vocab_size]
        y = batch[:, 1:].reshape(-1)
        ce = paths.token_ce(hidden.reshape(-1, hidden.shape[-1]), weight, y)
        losses.append(ce.float().cpu())
        targets.append(y.cpu())
    return torch.cat(losses), torch.cat(targets)


def bucket_metrics(loss: Tensor, targets: Tensor, buckets: Tensor) -> dict[str, float]:
    token_bucket = buckets[targets]
    out = {"loss": loss.mean().item(), "ppl": math.exp(loss.mean().item()), "tokens": float(len(loss))}
    for i, (name, _) in enumerate(BUCKETS):
        mask = token_bucket == i
        n = int(mask.sum())
        out[f"{name}_tokens"] = float(n)
        if n:
            mean = loss[mask].mean().item()
            out[f"{name}_loss"] = mean
            out[f"{name}_ppl"] = math.exp(mean)
    return out
