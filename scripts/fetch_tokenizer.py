"""Download the tokenizer of the MiLe paper's runs, LLaMA's 32,000-piece SentencePiece model:
``python scripts/fetch_tokenizer.py --out pile/tokenizer`` (or ``losslab fetch-tokenizer ...``).

The default repository, ``hf-internal-testing/llama-tokenizer``, is public (Meta's own repositories are gated)
and serves LLaMA's ``tokenizer.model`` byte for byte: the file must have LLaMA's sha256 (``--expect-sha256``),
so a repository serving anything else is refused. The file is checked against the Hub's size and hash,
resumed and retried as ``fetch_data.py`` does; ``HF_ENDPOINT`` points at another Hub. Exit 2, with one line
naming it, when the Hub cannot be reached.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import _bootstrap  # noqa: F401  (this checkout first on sys.path)

from data.files import file_sha256
from data.hub import Fetcher, HubError, list_repo
from data.shards import DataError
from data.tokenizer import Tokenizer
from losslab.log import fail

LLAMA_REPO = "hf-internal-testing/llama-tokenizer"
LLAMA_SHA256 = "9e556afd44213b6bd1be2b850ebbbd98f5481437a8021afaf58ee7fb1818d347"  # LLaMA 1/2 tokenizer.model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", default=LLAMA_REPO, help=f"model repository (default {LLAMA_REPO})")
    parser.add_argument("--revision", default="main")
    parser.add_argument("--file", default="tokenizer.model", help="the sentencepiece model in the repository")
    parser.add_argument("--out", default="pile/tokenizer")
    parser.add_argument("--expect-sha256", help="the model's sha256 (default: LLaMA's for the default repository)")
    args = parser.parse_args(argv)
    expect = args.expect_sha256 if args.expect_sha256 is not None else (LLAMA_SHA256 if args.repo == LLAMA_REPO else "")
    try:
        commit, files = list_repo(args.repo, "model", args.revision)
        wanted = [f for f in files if f.path == args.file]
        if not wanted:
            raise HubError(f"model {args.repo!r} at {commit[:12]} has no {args.file!r}")
        done = Fetcher(args.repo, "model", commit, Path(args.out), jobs=1).fetch(wanted)[0]
        sha = file_sha256(done.path)
        if expect and sha != expect:
            raise HubError(f"{done.path} has sha256 {sha}, not {expect} (--expect-sha256): not the tokenizer asked for")
        tok = Tokenizer(done.path)
    except (HubError, DataError) as e:
        return fail(e)
    except OSError as e:
        return fail(f"{e.filename or args.out}: {e.strerror or e}")
    print(f"{done.how}: {done.path} ({tok.vocab_size} pieces, EOS {tok.eos_id}, sha256 {sha}; {args.repo} at {commit})")
    print(f"use it with data.tokenizer={done.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
