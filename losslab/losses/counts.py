"""Corpus token counts for PDL (``build_loss("pdl", token_counts=...)``), in one call from what a user has at
hand: a tokenized dataset, a list of texts with a tokenizer, or ids. Torch only."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from losslab.losses.config import IGNORE_INDEX

MASK_COLUMNS = ("completion_mask", "assistant_masks")
"""Columns that mark the trained tokens of a row (TRL's prompt-completion and assistant-only datasets)."""


def token_counts(
    data: Iterable[Any] | Tensor,
    vocab_size: int | None = None,
    *,
    tokenizer: Any = None,
    targets_only: bool = True,
) -> Tensor:
    """[V] int64 counts of token ids, for PDL's weights.

    ``data`` is one of:
    - a tokenized dataset — any iterable of rows (a ``datasets.Dataset`` is one) with ``input_ids`` and, to say
      which tokens are trained, ``labels`` (-100 where not) or a ``completion_mask`` / ``assistant_masks`` column
      (and ``attention_mask`` for padding);
    - texts (strings), encoded with ``tokenizer`` as training would (``tokenizer(text)["input_ids"]`` for a
      Hugging Face tokenizer; a ``tokenizers.Tokenizer`` or sentencepiece processor by its ``encode``; or any
      callable text -> ids);
    - a tensor (or rows) of ids.

    ``targets_only`` (default): count the tokens the loss is computed on — each row's positions 1.. (position 0
    is never predicted) whose label is not -100 or whose mask is 1 — so a prompt's tokens do not count, as the PDL
    authors suggest. False: every input id. ``vocab_size``: the length of the result, the model head's rows
    (default: the tokenizer's length, else the largest id + 1); an id outside it is a ValueError.
    """
    encode = _encoder(tokenizer)
    chunks: list[Tensor] = []
    for row in _rows(data):
        if isinstance(row, str):
            if encode is None:
                raise ValueError("token_counts: texts need a tokenizer= (a Hugging Face tokenizer or text -> ids)")
            ids = torch.as_tensor(encode(row), dtype=torch.long)
            chunks.append(ids[1:] if targets_only else ids)
        else:
            chunks.append(_targets(row, targets_only))
    ids = torch.cat(chunks) if chunks else torch.zeros(0, dtype=torch.long)
    if vocab_size is None:
        vocab_size = len(tokenizer) if tokenizer is not None and hasattr(tokenizer, "__len__") else None
    if vocab_size is None:
        vocab_size = int(ids.max()) + 1 if ids.numel() else 0
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ValueError(f"token_counts: id {int(ids.max()) if int(ids.min()) >= 0 else int(ids.min())} is outside "
                         f"a vocabulary of {vocab_size}")  # fmt: skip
    return torch.bincount(ids, minlength=vocab_size)


def _rows(data: Iterable[Any] | Tensor) -> Iterable[Any]:
    if isinstance(data, Tensor):
        return [data] if data.dim() == 1 else list(data)
    if isinstance(data, str):
        return [data]
    return data


def _encoder(tokenizer: Any) -> Callable[[str], list[int]] | None:
    """text -> ids: a Hugging Face tokenizer as training calls it, a ``tokenizers.Tokenizer`` or a sentencepiece
    processor through its ``encode``, or a plain callable."""
    if tokenizer is None:
        return None
    if callable(tokenizer) and hasattr(tokenizer, "encode"):  # transformers: with its special tokens, as training
        return lambda text: tokenizer(text)["input_ids"]
    if hasattr(tokenizer, "encode"):
        return lambda text: getattr(tokenizer.encode(text), "ids", tokenizer.encode(text))
    return tokenizer


def _targets(row: Any, targets_only: bool) -> Tensor:
    """The ids of one row that count."""
    if not isinstance(row, Mapping):
        ids = torch.as_tensor(row, dtype=torch.long).reshape(-1)
        return ids[1:] if targets_only else ids
    if "input_ids" not in row and "labels" not in row:
        raise ValueError(f"token_counts: a row has neither input_ids nor labels (columns: {sorted(row)})")
    if not targets_only:
        return torch.as_tensor(row["input_ids"], dtype=torch.long).reshape(-1)
    if "labels" in row:
        labels = torch.as_tensor(row["labels"], dtype=torch.long).reshape(-1)[1:]
        return labels[labels != IGNORE_INDEX]
    ids = torch.as_tensor(row["input_ids"], dtype=torch.long).reshape(-1)
    keep = torch.ones_like(ids, dtype=torch.bool)
    for column in MASK_COLUMNS:
        if column in row:
            keep &= torch.as_tensor(row[column]).reshape(-1).bool()
    if "attention_mask" in row:
        keep &= torch.as_tensor(row["attention_mask"]).reshape(-1).bool()
    return ids[1:][keep[1:]]
