"""One interface over the two training-data paths: streaming shards and prepared memmaps.

A batch source is an iterable of ``[micro_batch, seq_len + 1]`` int64 tensors for this data-parallel rank with
``state_dict()`` / ``load_state_dict()`` (exact resume), ``stats`` (bad input skipped and counted) and
``files``.
"""

from __future__ import annotations

from typing import Protocol

import torch

from data.config import DataConfig
from data.counts import count_tokens
from data.memmap import MemmapBatches, MemmapSource, PreparedCorpus
from data.mixture import effective_mix
from data.sft import FineTuningRecords
from data.shards import DataError, ReadStats
from data.stream import PackedStream
from data.tokenizer import Tokenizer


class BatchSource(Protocol):
    stats: ReadStats
    files: list[str]
    streams: tuple[str, ...]

    def __iter__(self): ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def build_source(
    cfg: DataConfig, tokenizer: Tokenizer, *, batch_size: int, seed: int, rank: int, world_size: int
) -> BatchSource:
    if cfg.prepared:
        if cfg.sft_files:
            raise DataError("set data.sft_files (streamed) or data.prepared (prepare_data.py --sft), not both")
        corpus = PreparedCorpus(cfg.prepared)
        expected = corpus.manifest["fingerprint"]["tokenizer_sha256"]
        if tokenizer.sha256 != expected:
            raise DataError(
                f"data.tokenizer {tokenizer.path!r} is not the tokenizer {cfg.prepared!r} was prepared with"
            )
        available = {name: int(s["tokens"]) for name, s in corpus.sources.items()}
        mix = effective_mix(cfg.mix, available, cfg.mix_missing, f"prepared data {cfg.prepared!r}")
        batches = MemmapBatches(
            corpus, mix, seq_len=cfg.seq_len, batch_size=batch_size, seed=seed, rank=rank, world_size=world_size
        )
        return MemmapSource(batches, corpus, num_workers=cfg.num_workers)
    if cfg.mix:
        raise DataError("data.mix needs data.prepared (prepared data split by source)")
    if not cfg.train_files and not cfg.sft_files:
        raise DataError(
            "no training data: set data.train_files (shards), data.sft_files (fine-tuning records) or "
            "data.prepared (prepared data)"
        )
    # fine-tuning records stream through the same packing, sharding and resume as pretraining text
    records = FineTuningRecords(cfg.train_on_prompt) if cfg.sft_files else None
    return PackedStream(
        cfg.sft_files or cfg.train_files,
        tokenizer,
        seq_len=cfg.seq_len,
        batch_size=batch_size,
        seed=seed,
        rank=rank,
        world_size=world_size,
        shuffle_buffer=cfg.shuffle_buffer,
        document_format=records,
    )


def token_counts(cfg: DataConfig, source: BatchSource, tokenizer: Tokenizer, seed: int) -> torch.Tensor:
    """[V] token frequencies: exact from prepared data, else counted over ``cfg.count_bytes`` of the shards."""
    if cfg.prepared:
        return PreparedCorpus(cfg.prepared).token_counts(targets_only=cfg.count_over == "targets")
    document_format = FineTuningRecords(cfg.train_on_prompt) if cfg.sft_files else None
    return count_tokens(
        source.files, tokenizer, cfg.count_bytes, seed=seed, document_format=document_format,
        targets_only=cfg.count_over == "targets",
    )  # fmt: skip
