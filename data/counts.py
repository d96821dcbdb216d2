"""Token frequency counts [V] over (a sample of) a corpus: PDL's weights and the rare-token buckets need them."""

from __future__ import annotations

import torch

from data.tokenizer import Tokenizer, sample_texts


def count_tokens(files: list[str], tokenizer: Tokenizer, byte_budget: int, seed: int = 0) -> torch.Tensor:
    """int64 [V] counts of token ids (one EOS per document, as packing appends it) over up to ``byte_budget``
    bytes of documents."""
    counts = torch.zeros(tokenizer.vocab_size, dtype=torch.int64)
    batch: list[str] = []

    def flush() -> None:
        for ids in tokenizer.encode_batch(batch):
            counts.add_(torch.bincount(torch.tensor([*ids, tokenizer.eos_id]), minlength=len(counts)))
        batch.clear()

    for text in sample_texts(files, byte_budget, seed):
        batch.append(text)
        if len(batch) == 256:
            flush()
    flush()
    return counts
