"""Streaming source: Pile shards -> documents -> tokens -> packed windows -> per-rank batches.

Deterministic given (files, tokenizer, seq_len, seed): every rank walks the same global window sequence and
keeps windows ``g`` with ``g % world_size == rank`` — disjoint slices whose union is the whole stream.
``state_dict()`` records how many global windows were consumed; ``load_state_dict`` fast-forwards to there,
so a resumed run sees exactly the batches an uninterrupted one would have seen.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

from data.packing import Packer, TokenDoc, Window, collate
from data.shards import DataError, ReadStats, iter_documents, resolve_files
from data.tokenizer import Tokenizer


class DocumentFormat(Protocol):
    """What the records of a file are and how they become tokens (pretraining text, fine-tuning records)."""

    streams: Sequence[str]
    """Per-token streams the documents carry (see ``data.packing``)."""
    segments: bool
    """Whether windows say which document each token belongs to (the model then keeps them apart)."""

    def read(self, path: str, stats: ReadStats) -> Iterator[Any]: ...

    def encode(self, items: list[Any], tokenizer: Tokenizer) -> list[TokenDoc]: ...


class PretrainingText:
    """Pile-format documents: their text, tokenised; packed with attention across documents (the MiLe setup)."""

    streams: Sequence[str] = ()
    segments = False

    def read(self, path: str, stats: ReadStats) -> Iterator[str]:
        return (doc.text for doc in iter_documents(path, stats))

    def encode(self, items: list[str], tokenizer: Tokenizer) -> list[TokenDoc]:
        return tokenizer.encode_batch(items)


def _shuffled(items: Iterator, buffer_size: int, rng: random.Random) -> Iterator:
    """Approximate shuffle with a bounded buffer (exact order when buffer_size <= 1)."""
    if buffer_size <= 1:
        yield from items
        return
    buf: list = []
    for item in items:
        buf.append(item)
        if len(buf) >= buffer_size:
            yield buf.pop(rng.randrange(len(buf)))
    rng.shuffle(buf)
    yield from buf


class PackedStream:
    """Infinite iterator of ``[batch_size, seq_len + 1]`` int64 batches for one data-parallel rank."""

    def __init__(
        self,
        files: list[str],
        tokenizer: Tokenizer,
        *,
        seq_len: int,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle_buffer: int = 0,
        encode_batch: int = 64,
        document_format: DocumentFormat | None = None,
    ) -> None:
        self.files = resolve_files(files)
        self.tokenizer = tokenizer
        self.window = seq_len + 1
        self.batch_size = batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.shuffle_buffer = shuffle_buffer
        self.encode_batch = encode_batch
        self.format = document_format or PretrainingText()
        self.stats = ReadStats()
        self.windows_consumed = 0  # global windows (all ranks) handed out so far
        self._skip = 0

    @property
    def streams(self) -> tuple[str, ...]:
        """The per-token streams the batches carry beside the tokens."""
        return tuple(self.format.streams)

    def state_dict(self) -> dict[str, int]:
        return {"windows_consumed": self.windows_consumed, "seed": self.seed, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._skip = self.windows_consumed = int(state["windows_consumed"])

    def _documents(self, epoch: int) -> Iterator[TokenDoc]:
        rng = random.Random(self.seed * 1_000_003 + epoch)
        files = list(self.files)
        rng.shuffle(files)
        items = (item for path in files for item in self.format.read(path, self.stats))
        batch: list[Any] = []
        for item in _shuffled(items, self.shuffle_buffer, rng):
            batch.append(item)
            if len(batch) == self.encode_batch:
                yield from self.format.encode(batch, self.tokenizer)
                batch = []
        if batch:
            yield from self.format.encode(batch, self.tokenizer)

    def _global_windows(self) -> Iterator[Window]:
        packer = Packer(self.window, self.tokenizer.eos_id, self.format.streams, self.format.segments)
        epoch = 0
        while True:
            produced = 0
            for tokens in self._documents(epoch):
                for window in packer.add(tokens):
                    produced += 1
                    yield window
            if produced == 0:
                raise DataError(
                    f"the corpus yields no window of {self.window} tokens "
                    f"(files: {self.files}; read stats: {self.stats.as_dict()})"
                )
            epoch += 1

    def __iter__(self) -> Iterator[Window]:
        # Each pass reads the stream from its start (a resumed one replays up to its position), so it counts
        # bad input from zero: the counters then equal an uninterrupted run's, however often it was resumed.
        self.stats = ReadStats()
        rows: list[Window] = []
        for g, window in enumerate(self._global_windows()):
            if g < self._skip:
                continue
            if g % self.world_size == self.rank:
                rows.append(window)
            if (g + 1) % self.world_size == 0 and len(rows) == self.batch_size:
                self.windows_consumed = g + 1
                yield collate(rows)  # [B, T+1] (each stream too)
                rows = []
