"""SentencePiece tokenizer: load a ``.model`` or train one from shards."""

from __future__ import annotations

import os
import random
from collections.abc import Iterable, Iterator

import sentencepiece as spm

from data.shards import DataError, ReadStats, iter_documents


class Tokenizer:
    def __init__(self, model_path: str) -> None:
        if not os.path.isfile(model_path):
            raise DataError(f"tokenizer model not found: {model_path!r}")
        self.path = model_path
        try:
            self.sp = spm.SentencePieceProcessor(model_file=model_path)
        except (RuntimeError, OSError) as e:
            reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise DataError(f"tokenizer {model_path!r} is not a sentencepiece model ({reason})") from None
        if self.sp.eos_id() < 0:
            raise DataError(f"tokenizer {model_path!r} has no EOS piece; documents could not be separated")

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str], num_threads: int = -1) -> list[list[int]]:
        return self.sp.encode(texts, num_threads=num_threads)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)


def sample_texts(files: Iterable[str], byte_budget: int, seed: int = 0) -> Iterator[str]:
    """Documents from the shards until ``byte_budget`` bytes of text, visiting the files in a seeded order."""
    files = list(files)
    random.Random(seed).shuffle(files)
    used = 0
    for path in files:
        for doc in iter_documents(path, ReadStats()):
            yield doc.text
            used += len(doc.text.encode("utf-8"))
            if used >= byte_budget:
                return


def train_tokenizer(
    texts: Iterable[str],
    out_prefix: str,
    *,
    vocab_size: int,
    model_type: str = "bpe",
    num_threads: int = os.cpu_count() or 1,
) -> str:
    """Train a byte-fallback sentencepiece model with pad/bos/eos/unk ids 0..3; returns the ``.model`` path.

    Whitespace and newlines are kept (no NFKC, no collapsing) so code and verse survive a round trip.
    """
    os.makedirs(os.path.dirname(os.path.abspath(out_prefix)), exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_prefix=out_prefix,
        vocab_size=vocab_size,
        model_type=model_type,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        max_sentence_length=1 << 16,
        pad_id=0,
        unk_id=1,
        bos_id=2,
        eos_id=3,
        num_threads=num_threads,
        minloglevel=2,
    )
    return out_prefix + ".model"
