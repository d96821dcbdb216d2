"""Pre-tokenise Pile-format shards into memory-mapped token files (the fast training path):
``python scripts/prepare_data.py --files 'pile/*.jsonl.zst' --tokenizer tok.model --out data/pile [--by-source]``.
Re-running on the same inputs reuses the output."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run this checkout's code, never an installed copy

import argparse
import json
import os
import sys
import time

from data.prepare import prepare
from data.sft import FineTuningRecords
from data.shards import DataError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--files", nargs="+", required=True, help="shards (paths or globs)")
    parser.add_argument("--tokenizer", required=True, help="sentencepiece .model, tokenizer.json, or a folder")
    parser.add_argument("--out", required=True)
    parser.add_argument("--by-source", action="store_true", help="one token file per meta.pile_set_name")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="tokeniser processes (0: inline)")
    parser.add_argument("--sft", action="store_true", help="the files hold fine-tuning records (data/sft.py)")
    parser.add_argument("--train-on-prompt", action="store_true", help="--sft: the prompts carry loss too")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        records = FineTuningRecords(args.train_on_prompt) if args.sft else None
        manifest = prepare(
            args.files, args.tokenizer, args.out, by_source=args.by_source, workers=args.workers, records=records
        )
    except (DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. --out in a folder that cannot be created or written
        print(f"error: {e.filename or args.out}: {e.strerror or e}", file=sys.stderr)
        return 2
    tokens = sum(s["tokens"] for s in manifest["sources"].values())
    print(json.dumps({"sources": manifest["sources"], "read_stats": manifest["read_stats"]}, indent=2))
    print(f"{tokens} tokens in {args.out} ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
