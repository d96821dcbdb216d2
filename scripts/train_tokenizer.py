"""Train a sentencepiece tokenizer from Pile-format shards:
``python scripts/train_tokenizer.py --files 'corpus/*.jsonl.zst' --vocab-size 32000 --out tok/name``."""

from __future__ import annotations

import argparse
import sys

import _bootstrap  # noqa: F401  (this checkout first on sys.path)

from data.shards import DataError, resolve_files
from data.tokenizer import Tokenizer, sample_texts, train_tokenizer
from losslab.log import fail


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--files", nargs="+", required=True, help="shards (paths or globs)")
    parser.add_argument("--vocab-size", type=int, required=True)
    parser.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    parser.add_argument("--byte-budget", type=int, default=200_000_000, help="bytes of text to sample")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="output prefix; writes PREFIX.model and PREFIX.vocab")
    args = parser.parse_args(argv)
    try:
        files = resolve_files(args.files)
    except DataError as e:
        return fail(e)
    path = train_tokenizer(
        sample_texts(files, args.byte_budget, args.seed),
        args.out,
        vocab_size=args.vocab_size,
        model_type=args.model_type,
    )
    print(f"wrote {path} ({Tokenizer(path).vocab_size} pieces)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
