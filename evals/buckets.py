"""Held-out loss split by token frequency — the MiLe paper's analysis.

Vocabulary buckets from training-data counts: sorted by frequency, ``high`` holds the most frequent tokens that
together cover the first 80% of occurrences, ``medium`` the next 15%, ``low`` the last 5% (tokens never seen
in the counts are ``low``). Each held-out target token falls in its bucket; per bucket we report the mean
loss, its perplexity and the token count. The token-weighted mean of the bucket losses is the overall loss.
``document_losses`` keeps the same numbers per held-out document (summed loss and token count, overall and per
bucket), the units over which ``evals/stats.py`` pairs two runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from data.sft import FineTuningRecords
from data.shards import ReadStats, iter_documents, resolve_files
from data.tokenizer import Tokenizer
from losslab.losses import paths
from models import GPT

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


@dataclass
class HeldOut:
    windows: Tensor
    """[n, seq_len + 1] int64 token windows of the held-out documents packed back to back (EOS after each); for
    fine-tuning records ([n, longest record]) one record a row."""
    document: Tensor
    """[n, seq_len + 1] int64: the index (in file order) of the document each token belongs to; a document's
    EOS is its own. A target token's document is ``document[:, 1:]``."""
    scored: Tensor | None = None
    """[n, seq_len + 1] bool: the tokens scored as targets (fine-tuning records: the responses); None: all."""


def held_out_records(files: list[str], tokenizer: Tokenizer, seq_len: int, max_tokens: int) -> HeldOut:
    """Held-out fine-tuning records (``data/sft.py``: prompt/response or chat), one per row as the trainer sees
    one packed segment (tokens, then EOS, which carries the response's mask), right-padded; only the tokens
    that carry loss in training (the response and its EOS) are scored — the response perplexity. Records are
    read in file order until their scored tokens reach ``max_tokens``; longer than ``seq_len + 1`` are cut. Rows
    are as wide as the longest record (padding is never scored, and a causal model never attends to it)."""
    fmt = FineTuningRecords()
    rows: list[tuple[list[int], list[bool]]] = []
    scored = 0
    for path in resolve_files(files):
        for record in fmt.read(path, ReadStats()):
            doc = fmt.encode([record], tokenizer)[0]
            tokens = (doc["tokens"] + [tokenizer.eos_id])[: seq_len + 1]
            mask = (doc["loss_mask"] + doc["loss_mask"][-1:])[: seq_len + 1]
            rows.append((tokens, mask))
            scored += sum(mask[1:])
            if scored >= max_tokens:
                break
        if scored >= max_tokens:
            break
    if not scored:
        raise ValueError(f"held-out records {files} hold no response tokens to score")
    n = len(rows)
    width = max(len(tokens) for tokens, _ in rows)  # the longest record, not the model's context (8192 for some)
    windows = torch.full((n, width), tokenizer.eos_id, dtype=torch.long)  # [n, width], right-padded
    mask = torch.zeros(n, width, dtype=torch.bool)
    for i, (tokens, m) in enumerate(rows):
        windows[i, : len(tokens)] = torch.tensor(tokens)
        mask[i, : len(m)] = torch.tensor(m)
    document = torch.arange(n)[:, None].expand(n, width).clone()
    return HeldOut(windows=windows, document=document, scored=mask)


def held_out_documents(files: list[str], tokenizer: Tokenizer, seq_len: int, max_tokens: int) -> HeldOut:
    """The held-out documents (EOS between them) cut into windows, up to ``max_tokens``, with each token's
    document, so losses can be summed per document for paired comparisons between runs."""
    stream: list[int] = []
    owner: list[int] = []
    need = max_tokens + seq_len + 1
    index = 0
    for path in resolve_files(files):
        for doc in iter_documents(path, ReadStats()):
            ids = tokenizer.encode(doc.text)
            stream.extend(ids)
            stream.append(tokenizer.eos_id)
            owner.extend([index] * (len(ids) + 1))
            index += 1
            if len(stream) >= need:
                break
        if len(stream) >= need:
            break
    n = min(len(stream), need) // (seq_len + 1)
    if n == 0:
        raise ValueError(f"held-out data {files} hold fewer than {seq_len + 1} tokens")
    cut = n * (seq_len + 1)
    return HeldOut(
        windows=torch.tensor(stream[:cut]).view(n, seq_len + 1),
        document=torch.tensor(owner[:cut]).view(n, seq_len + 1),
    )


def held_out_windows(files: list[str], tokenizer: Tokenizer, seq_len: int, max_tokens: int) -> Tensor:
    """[n, seq_len + 1] windows of the held-out documents (EOS between documents), up to ``max_tokens``."""
    return held_out_documents(files, tokenizer, seq_len, max_tokens).windows


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


def document_losses(loss: Tensor, targets: Tensor, document: Tensor, buckets: Tensor) -> dict[str, list[float]]:
    """Per held-out document (the tokens ``bucket_metrics`` scores, nothing else): its summed loss and token
    count overall and per frequency bucket, as parallel lists in document order. ``loss``, ``targets``,
    ``document``: [N] per target token (``document``: ``HeldOut.document[:, 1:]`` flattened). The sums over
    documents are the aggregate numbers times the token counts, so a paired comparison of two runs over these
    documents is a comparison of exactly the numbers reported."""
    docs, inverse = torch.unique(document, return_inverse=True)  # [D] sorted ids, [N] position of each token
    k = len(docs)
    token_bucket = buckets[targets]  # [N]
    loss64 = loss.double()
    out: dict[str, list[float]] = {"doc_id": docs.tolist()}

    def sums(mask: Tensor | None) -> tuple[list[float], list[float]]:
        w = torch.ones_like(loss64) if mask is None else mask.double()
        total = torch.zeros(k, dtype=torch.float64).index_add_(0, inverse, loss64 * w)
        count = torch.zeros(k, dtype=torch.float64).index_add_(0, inverse, w)
        return total.tolist(), count.tolist()

    out["loss"], out["tokens"] = sums(None)
    for i, (name, _) in enumerate(BUCKETS):
        out[f"{name}_loss"], out[f"{name}_tokens"] = sums(token_bucket == i)
    return out
