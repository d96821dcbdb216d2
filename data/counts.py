"""Token frequency counts [V] over (a sample of) a corpus: PDL's weights and the rare-token buckets need them."""

from __future__ import annotations

import random

import torch

from data.shards import ReadStats
from data.stream import DocumentFormat, PretrainingText
from data.tokenizer import Tokenizer


def count_tokens(
    files: list[str],
    tokenizer: Tokenizer,
    byte_budget: int,
    seed: int = 0,
    *,
    document_format: DocumentFormat | None = None,
    targets_only: bool = True,
) -> torch.Tensor:
    """int64 [V] counts of token ids (one EOS per document, as packing appends it) over documents read in a
    seeded file order until ``byte_budget`` bytes have been used. ``targets_only``
    counts only tokens that carry loss where documents say so (fine-tuning responses). Texts count their
    UTF-8 bytes, records the bytes of their representation."""
    fmt = document_format or PretrainingText()
    counts = torch.zeros(tokenizer.vocab_size, dtype=torch.int64)
    batch: list = []

    def flush() -> None:
        for doc in fmt.encode(batch, tokenizer):
            ids = torch.tensor([*(doc if isinstance(doc, list) else doc["tokens"]), tokenizer.eos_id])
            if targets_only and isinstance(doc, dict) and "loss_mask" in doc:
                mask = list(doc["loss_mask"])
                ids = ids[torch.tensor([*mask, mask[-1] if mask else False], dtype=torch.bool)]
            counts.add_(torch.bincount(ids, minlength=len(counts)))
        batch.clear()

    files = list(files)
    random.Random(seed).shuffle(files)
    used = 0
    for path in files:
        for item in fmt.read(path, ReadStats()):
            batch.append(item)
            used += len((item if isinstance(item, str) else repr(item)).encode("utf-8"))
            if len(batch) == 256:
                flush()
            if used >= byte_budget:
                flush()
                return counts
    flush()
    return counts
