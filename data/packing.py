"""Pack tokenised documents into fixed windows of ``seq_len + 1`` tokens, EOS after each document.

No cross-document attention masking (as in the MiLe paper's setup). Packing is lossless: concatenating the
windows gives back the token stream (the tail shorter than a window is carried to the next call).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch


class Packer:
    def __init__(self, window: int, eos_id: int) -> None:
        self.window = window
        self.eos_id = eos_id
        self.buffer: list[int] = []

    def add(self, tokens: list[int]) -> Iterator[torch.Tensor]:
        """Append one document (+ EOS); yield every completed window as an int64 [window] tensor.

        The completed windows leave the buffer in one cut: cutting them one by one from the front of a list is
        quadratic in the document's length (a 50 MB document once took minutes)."""
        self.buffer.extend(tokens)
        self.buffer.append(self.eos_id)
        n = len(self.buffer) // self.window
        if n == 0:
            return
        full = torch.tensor(self.buffer[: n * self.window], dtype=torch.long).view(n, self.window)
        del self.buffer[: n * self.window]
        yield from full.unbind(0)  # [window] each


def pack(docs: Iterable[list[int]], window: int, eos_id: int) -> Iterator[torch.Tensor]:
    packer = Packer(window, eos_id)
    for tokens in docs:
        yield from packer.add(tokens)
