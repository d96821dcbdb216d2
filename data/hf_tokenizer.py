"""A sentencepiece BPE model as a Hugging Face fast tokenizer that encodes exactly as sentencepiece does.

Built with the ``tokenizers`` library directly (transformers' own converters change between releases):
the vocabulary in id order, merges ordered by the score of the piece they form (sentencepiece BPE applies
the best-scored merge first), byte fallback, and sentencepiece's dummy-prefix / space handling. The result is
checked against sentencepiece on a sample before it is returned.
"""

from __future__ import annotations

from typing import Any

import sentencepiece as spm

CHECK_TEXTS = [
    "Fair is foul, and foul is fair: hover through the fog and filthy air.",
    "  leading spaces, tabs\tand\nnewlines; digits 1234567890; café, naïve, 日本語, ☃ and 🙂.",
    "def f(x):\n    return {'a': [x, x ** 2]}  # code",
    "x",
]


def to_hf_tokenizer(model_path: str) -> Any:
    from tokenizers import Tokenizer, decoders, normalizers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    sp = spm.SentencePieceProcessor(model_file=model_path)
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    merges = []
    for piece, pid in vocab.items():
        if sp.is_control(pid) or sp.is_unknown(pid) or sp.is_byte(pid) or len(piece) < 2:
            continue
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in vocab and right in vocab:
                merges.append((-sp.get_score(pid), vocab[left], vocab[right], left, right))
    merges.sort()
    unk = sp.id_to_piece(sp.unk_id())
    tok = Tokenizer(
        BPE(vocab=vocab, merges=[(a, b) for *_, a, b in merges], unk_token=unk, fuse_unk=True, byte_fallback=True)
    )
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(content=" ", left=1)]
    )
    for text in CHECK_TEXTS:
        if tok.encode(text, add_special_tokens=False).ids != sp.encode(text):
            raise ValueError(
                f"{model_path}: the converted tokenizer does not reproduce sentencepiece on {text!r} "
                "(only BPE models with identity normalisation are supported)"
            )

    def piece(i: int) -> str | None:
        return sp.id_to_piece(i) if i >= 0 else None

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=piece(sp.bos_id()),
        eos_token=piece(sp.eos_id()),
        unk_token=unk,
        pad_token=piece(sp.pad_id()) or piece(sp.eos_id()),
        add_bos_token=False,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
    )
