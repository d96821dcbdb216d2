"""Held-out loss split by token frequency — the MiLe paper's analysis.

Vocabulary buckets from training-data counts: sorted by frequency, ``high`` holds the most frequent tokens that
together cover the first 80% of occurrences, ``medium`` the next 15%, ``low`` the last 5% (tokens never seen
in the counts are ``low``). Each held-out target token falls in its bucket; per bucket we report the mean
loss, its perplexity and the token count. The token-weighted mean of the bucket losses is the overall loss.
``document_losses`` keeps the same numbers per held-out document (summed loss and token count, overall and per
bucket), the units over which ``evals/compare/stats.py`` pairs two runs. The held-out documents are the run's
held-out set (``evals/heldout.py``), the one the per-domain losses during training are computed on.
"""

from __future__ import annotations

import math
import time

import torch
from torch import Tensor

from losslab.log import get_logger
from losslab.losses import paths
from models import GPT

log = get_logger(__name__)

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


PROGRESS_SECONDS = 10.0
"""A progress line on long held-out scoring at most this often."""


def per_token_loss(
    model: GPT, windows: Tensor, batch_size: int = 8, lengths: Tensor | None = None, progress: str = ""
) -> tuple[Tensor, Tensor]:
    """-> (loss [n * (width - 1)] fp32, target token ids [n * (width - 1)]), forward only (``inference_mode``),
    without materialising the logits. ``lengths`` [n]: each row's real tokens (right padding after them): rows are
    then scored longest first, each batch cut to its longest row, so one long row does not make every row pay for
    its width; the padded targets' losses are 0 (the caller drops them). With a ``progress`` label, a line (rows,
    tokens/s) at most every ``PROGRESS_SECONDS`` and one at the end."""
    device = next(model.parameters()).device
    n, width = windows.shape
    lengths = lengths if lengths is not None else torch.full((n,), width, dtype=torch.long)
    order = torch.argsort(lengths, descending=True, stable=True)  # [n]
    loss = torch.zeros(n, width - 1, dtype=torch.float32)  # [n, width - 1]
    start = last = time.perf_counter()
    done_tokens = 0
    with torch.inference_mode():
        for s in range(0, n, batch_size):
            rows = order[s : s + batch_size]  # [b]
            w = max(int(lengths[rows].max()), 2)
            batch = windows[rows, :w].to(device)  # [b, w]
            hidden = model(batch[:, :-1])  # [b, w - 1, d]
            y = batch[:, 1:].reshape(-1)  # [b * (w - 1)]
            # inside the head's forward (its weight's real-vocabulary rows): ZeRO-3 gathers the weight there
            ce = model.head(hidden.reshape(-1, hidden.shape[-1]), lambda h, wt, y=y: paths.token_ce(h, wt, y))
            loss[rows, : w - 1] = ce.float().view(len(rows), w - 1).cpu()
            done_tokens += len(rows) * (w - 1)
            now = time.perf_counter()
            if progress and now - last >= PROGRESS_SECONDS and s + batch_size < n:
                last = now
                log.info(f"{progress}: {s + len(rows)}/{n} rows, {done_tokens} tokens, "
                         f"{done_tokens / (now - start):.0f} tokens/s")  # fmt: skip
    if progress:
        elapsed = time.perf_counter() - start
        log.info(f"{progress}: {n} rows, {done_tokens} tokens in {elapsed:.1f} s "
                 f"({done_tokens / max(elapsed, 1e-9):.0f} tokens/s)")  # fmt: skip
    return loss.reshape(-1), windows[:, 1:].reshape(-1).clone()


def bucket_metrics(loss: Tensor, targets: Tensor, buckets: Tensor | None) -> dict[str, float]:
    """Mean loss, perplexity and tokens overall and (given ``buckets``) per frequency bucket."""
    out = {"loss": loss.mean().item(), "ppl": math.exp(loss.mean().item()), "tokens": float(len(loss))}
    if buckets is None:
        return out
    token_bucket = buckets[targets]
    for i, (name, _) in enumerate(BUCKETS):
        mask = token_bucket == i
        n = int(mask.sum())
        out[f"{name}_tokens"] = float(n)
        if n:
            mean = loss[mask].mean().item()
            out[f"{name}_loss"] = mean
            out[f"{name}_ppl"] = math.exp(mean)
    return out


def document_losses(loss: Tensor, targets: Tensor, document: Tensor, buckets: Tensor | None) -> dict[str, list[float]]:
    """Per held-out document (the tokens ``bucket_metrics`` scores, nothing else): its summed loss and token
    count overall and per frequency bucket, as parallel lists in document order. ``loss``, ``targets``,
    ``document``: [N] per target token (``document``: ``HeldOut.document[:, 1:]`` flattened). The sums over
    documents are the aggregate numbers times the token counts, so a paired comparison of two runs over these
    documents is a comparison of exactly the numbers reported."""
    docs, inverse = torch.unique(document, return_inverse=True)  # [D] sorted ids, [N] position of each token
    k = len(docs)
    loss64 = loss.double()
    out: dict[str, list[float]] = {"doc_id": docs.tolist()}

    def sums(mask: Tensor | None) -> tuple[list[float], list[float]]:
        w = torch.ones_like(loss64) if mask is None else mask.double()
        total = torch.zeros(k, dtype=torch.float64).index_add_(0, inverse, loss64 * w)
        count = torch.zeros(k, dtype=torch.float64).index_add_(0, inverse, w)
        return total.tolist(), count.tolist()

    out["loss"], out["tokens"] = sums(None)
    if buckets is None:  # held-out loss alone (a checkpoint without training counts)
        return out
    token_bucket = buckets[targets]  # [N]
    for i, (name, _) in enumerate(BUCKETS):
        out[f"{name}_loss"], out[f"{name}_tokens"] = sums(token_bucket == i)
    return out
