"""Pack tokenised documents into fixed windows of ``seq_len + 1`` tokens, EOS after each document.

Packing is lossless: concatenating the windows gives back the token stream (the tail shorter than a window is
carried to the next call). A document may carry per-token streams beside its tokens (``loss_mask``: which
tokens are training targets; ``weight``, ``ref_ce``: per-token inputs of the loss); they are packed with the
tokens, position for position. Pretraining packs plain token lists and, as in the MiLe paper's setup, lets
attention cross document boundaries; fine-tuning asks for ``segments`` (the index of each token's document
within its window), which the model uses to keep packed documents apart.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch

TokenDoc = list[int] | dict[str, Sequence]
"""A tokenised document: its token ids, or ``{"tokens": ids, <stream>: values, ...}``."""

STREAM_DTYPES = {"loss_mask": torch.bool, "weight": torch.float32, "ref_ce": torch.float32}
"""The per-token streams a document may carry, and their dtype in a batch."""
EOS_VALUES = {"weight": 1.0, "ref_ce": 0.0}
"""A stream's value at the EOS packing appends (``loss_mask``: the document's last token's: a response ends
with its EOS as a target, so the model learns to stop)."""

Window = torch.Tensor | dict[str, torch.Tensor]


class Packer:
    """Packs documents into windows. With no ``streams`` and no ``segments`` a window is an int64 [window]
    tensor (pretraining); otherwise ``{"tokens": [window] int64, <stream>: [window], "segments": [window]}``."""

    def __init__(self, window: int, eos_id: int, streams: Sequence[str] = (), segments: bool = False) -> None:
        unknown = sorted(set(streams) - set(STREAM_DTYPES))
        if unknown:
            raise ValueError(f"unknown per-token streams {unknown}; known: {sorted(STREAM_DTYPES)}")
        self.window = window
        self.eos_id = eos_id
        self.streams = tuple(streams)
        self.segments = segments
        self.buffer: list[int] = []
        self.values: dict[str, list] = {name: [] for name in self.streams}
        self.doc_starts: list[int] = []  # buffer offsets where a document begins (for segments)

    @property
    def plain(self) -> bool:
        return not self.streams and not self.segments

    def add(self, doc: TokenDoc) -> Iterator[Window]:
        """Append one document (+ EOS); yield every completed window.

        The completed windows leave the buffer in one cut: cutting them one by one from the front of a list is
        quadratic in the document's length (a 50 MB document once took minutes)."""
        tokens = doc if isinstance(doc, list) else list(doc["tokens"])
        self.doc_starts.append(len(self.buffer))
        self.buffer.extend(tokens)
        self.buffer.append(self.eos_id)
        for name in self.streams:
            given = None if isinstance(doc, list) else doc.get(name)
            if given is None:
                raise ValueError(f"a document lacks the per-token stream {name!r} this packer carries")
            if len(given) != len(tokens):
                raise ValueError(f"stream {name!r} has {len(given)} values for {len(tokens)} tokens")
            values = self.values[name]
            values.extend(given)
            values.append(given[-1] if name == "loss_mask" and len(given) else EOS_VALUES.get(name, 0))
        n = len(self.buffer) // self.window
        if n == 0:
            return
        cut = n * self.window
        tokens_out = torch.tensor(self.buffer[:cut], dtype=torch.long).view(n, self.window)  # [n, W]
        del self.buffer[:cut]
        if self.plain:
            self.doc_starts.clear()
            yield from tokens_out.unbind(0)  # [W] each
            return
        out = {"tokens": tokens_out}
        for name in self.streams:
            out[name] = torch.tensor(self.values[name][:cut], dtype=STREAM_DTYPES[name]).view(n, self.window)
            del self.values[name][:cut]
        if self.segments:
            out["segments"] = self._segments(n, cut)
        for i in range(n):
            yield {k: v[i] for k, v in out.items()}

    def _segments(self, n: int, cut: int) -> torch.Tensor:
        """[n, W] int32: each token's document index within its window, counted from 0 in every window."""
        starts = torch.zeros(cut, dtype=torch.int32)
        inside = [s for s in self.doc_starts if 0 < s < cut]
        starts[inside] = 1
        starts = starts.view(n, self.window)
        starts[:, 0] = 0
        # documents that began before the cut continue in the buffer: shift the rest of the starts
        self.doc_starts = [s - cut for s in self.doc_starts if s >= cut]
        return starts.cumsum(dim=1, dtype=torch.int32)


def pack(docs: Iterable[TokenDoc], window: int, eos_id: int, **kwargs) -> Iterator[Window]:
    packer = Packer(window, eos_id, **kwargs)
    for doc in docs:
        yield from packer.add(doc)


def collate(rows: list[Window]) -> Window:
    """Windows -> a batch: [B, W] tensors (a dict of them where windows carry streams)."""
    if isinstance(rows[0], torch.Tensor):
        return torch.stack(rows)
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
