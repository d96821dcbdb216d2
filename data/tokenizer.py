"""One tokenizer interface, two backends: a sentencepiece ``.model`` and a Hugging Face ``tokenizer.json``
(the ``tokenizers`` library: byte-level BPE of Pythia, SmolLM2, Llama 3). ``Tokenizer(path)`` picks the backend
from ``path``: a ``.model`` file, a ``tokenizer.json`` file, or a folder holding either (``tokenizer.model``
first, as a losslab checkpoint holds it). Special tokens (EOS, BOS, pad) and a chat template come from the
tokenizer's own files, never from constants. Training a sentencepiece model from shards lives here too.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import sentencepiece as spm

from data.files import file_sha256
from data.shards import DataError, ReadStats, iter_documents

# Names a tokenizer.json without a tokenizer_config.json may give its end-of-text token, most likely first.
_EOS_NAMES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|im_end|>", "<|eot_id|>")


class Tokenizer:
    """The interface; ``Tokenizer(path)`` returns the backend that reads ``path``."""

    path: str
    """The file the vocabulary comes from (``.model`` or ``tokenizer.json``)."""
    files: dict[str, str]
    """Files a checkpoint carries to rebuild this tokenizer: name in the checkpoint -> source path."""
    chat_template: str | None = None

    def __new__(cls, path: str | os.PathLike) -> Tokenizer:
        if cls is not Tokenizer:
            return super().__new__(cls)
        return super().__new__(_backend(Path(path)))

    @property
    def sha256(self) -> str:
        """Identity of the vocabulary (the hash of ``path``): data prepared and models trained with it record it."""
        return file_sha256(self.path)

    vocab_size: int
    eos_id: int
    bos_id: int
    """-1 where the tokenizer has none."""
    pad_id: int

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: list[str], num_threads: int = -1) -> list[list[int]]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def render_chat(self, messages: list[dict[str, str]], *, add_generation_prompt: bool = False) -> str:
        """``messages`` as text with the tokenizer's chat template (as transformers renders it)."""
        if not self.chat_template:
            raise DataError(f"tokenizer {self.path!r} has no chat template")
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise jinja2.exceptions.TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        piece = self.decode  # special tokens by id, as the template writes them
        return env.from_string(self.chat_template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=piece([self.bos_id]) if self.bos_id >= 0 else "",
            eos_token=piece([self.eos_id]),
        )


def _backend(path: Path) -> type[Tokenizer]:
    if path.is_dir():
        for name, backend in (("tokenizer.model", SentencePieceTokenizer), ("tokenizer.json", HFTokenizer)):
            if (path / name).is_file():
                return backend
        raise DataError(f"tokenizer folder {str(path)!r} holds neither tokenizer.model nor tokenizer.json")
    if not path.is_file():
        raise DataError(f"tokenizer model not found: {str(path)!r}")
    return HFTokenizer if path.suffix == ".json" else SentencePieceTokenizer


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, path: str | os.PathLike) -> None:
        p = Path(path)
        model = p / "tokenizer.model" if p.is_dir() else p
        self.path = str(model)
        self.files = {"tokenizer.model": self.path}
        try:
            self.sp = spm.SentencePieceProcessor(model_file=self.path)
        except (RuntimeError, OSError) as e:
            reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise DataError(f"tokenizer {self.path!r} is not a sentencepiece model ({reason})") from None
        if self.sp.eos_id() < 0:
            raise DataError(f"tokenizer {self.path!r} has no EOS piece; documents could not be separated")
        self.vocab_size = self.sp.get_piece_size()
        self.eos_id, self.bos_id = self.sp.eos_id(), self.sp.bos_id()
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_id

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str], num_threads: int = -1) -> list[list[int]]:
        return self.sp.encode(texts, num_threads=num_threads)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)


class HFTokenizer(Tokenizer):
    """A ``tokenizer.json``; special tokens and the chat template from the ``tokenizer_config.json`` beside it
    (transformers 5 writes the template to ``chat_template.jinja`` instead: read from there when present)."""

    CONFIG = "tokenizer_config.json"
    TEMPLATE = "chat_template.jinja"

    def __init__(self, path: str | os.PathLike) -> None:
        from tokenizers import Tokenizer as Backend

        p = Path(path)
        file = p / "tokenizer.json" if p.is_dir() else p
        self.path = str(file)
        try:
            self.tok = Backend.from_file(self.path)
        except Exception as e:  # the Rust library raises its own Exception type
            raise DataError(f"tokenizer {self.path!r} is not a tokenizers JSON file ({str(e)[:200]})") from None
        self.files = {"tokenizer.json": self.path}
        config = _read_config(file.parent / self.CONFIG)
        if config:
            self.files[self.CONFIG] = str(file.parent / self.CONFIG)
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        eos = self._special(config.get("eos_token")) if config else None
        if eos is None:
            eos = next((i for i in map(self.tok.token_to_id, _EOS_NAMES) if i is not None), None)
        if eos is None:
            raise DataError(
                f"tokenizer {self.path!r} names no EOS token (no {self.CONFIG} beside it, and none of {_EOS_NAMES})"
            )
        self.eos_id = eos
        bos = self._special(config.get("bos_token"))
        self.bos_id = -1 if bos is None else bos
        pad = self._special(config.get("pad_token"))
        self.pad_id = self.eos_id if pad is None else pad
        template = config.get("chat_template")
        if isinstance(template, list):  # several named templates: the default one
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        template_file = file.parent / self.TEMPLATE
        if template_file.is_file():
            template = template_file.read_text()
            self.files[self.TEMPLATE] = str(template_file)
        self.chat_template = template if isinstance(template, str) else None

    def _special(self, token: Any) -> int | None:
        content = token.get("content") if isinstance(token, dict) else token
        return self.tok.token_to_id(content) if isinstance(content, str) else None

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str], num_threads: int = -1) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    return config if isinstance(config, dict) else {}


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
