"""Pre-tokenise Pile-format shards into memory-mapped token files (the fast training path):
``python scripts/prepare_data.py --files 'pile/*.jsonl.zst' --tokenizer tok.model --out data/pile [--by-source]``.

Every shard is prepared once, by one of ``--workers`` processes (all cores by default), into ``OUT.parts/``;
the parts are then merged into OUT. Re-running the same command reuses the output, or continues a stopped run
with the shards not done. Across nodes (one file system): ``--part i/N`` on node i prepares its shards only,
then ``--merge`` (same --files, --tokenizer, --out) on one node builds OUT — the same files as a single run."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import _bootstrap  # noqa: F401  (this checkout first on sys.path)

from data.parts import parse_part
from data.prepare import merge_parts, prepare, prepare_shards
from data.sft import FineTuningRecords
from data.shards import DataError
from losslab.log import fail, get_logger

log = get_logger(__name__)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", nargs="+", required=True, help="shards (paths or globs)")
    parser.add_argument("--tokenizer", required=True, help="sentencepiece .model, tokenizer.json, or a folder")
    parser.add_argument("--out", required=True)
    parser.add_argument("--by-source", action="store_true", help="one token file per meta.pile_set_name")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="processes (default: all cores); 0: everything in this process")  # fmt: skip
    parser.add_argument("--part", metavar="I/N", help="prepare only the shards of node I of N (no merge)")
    parser.add_argument("--merge", action="store_true", help="merge the parts every --part run prepared")
    parser.add_argument("--keep-parts", action="store_true", help="keep OUT.parts/ after the merge")
    parser.add_argument("--sft", action="store_true", help="the files hold fine-tuning records (data/sft.py)")
    parser.add_argument("--train-on-prompt", action="store_true", help="--sft: the prompts carry loss too")
    args = parser.parse_args(argv)
    if args.part and args.merge:
        parser.error("--part prepares one node's shards, --merge joins them afterwards: give one of them")
    start = time.perf_counter()
    common = {"by_source": args.by_source}
    try:
        records = FineTuningRecords(args.train_on_prompt) if args.sft else None
        if args.part:
            part = parse_part(args.part)
            done = prepare_shards(args.files, args.tokenizer, args.out, part=part, workers=args.workers,
                                  records=records, **common)  # fmt: skip
            print(f"part {args.part}: {len(done)} shards prepared in {Path(args.out).name}.parts "
                  f"({time.perf_counter() - start:.1f} s); when every part is done, run the same command with "
                  "--merge instead of --part")  # fmt: skip
            return 0
        if args.merge:
            manifest = merge_parts(args.files, args.tokenizer, args.out, records=records, keep_parts=args.keep_parts,
                                   **common)  # fmt: skip
        else:
            manifest = prepare(args.files, args.tokenizer, args.out, workers=args.workers, records=records,
                               keep_parts=args.keep_parts, **common)  # fmt: skip
    except (DataError, ValueError) as e:
        return fail(e)
    except OSError as e:  # e.g. --out in a folder that cannot be created or written
        return fail(f"{e.filename or args.out}: {e.strerror or e}")
    except KeyboardInterrupt:
        log.warning(f"interrupted: the shards done are kept in {args.out}.parts; run the same command to continue")
        return 130
    tokens = sum(s["tokens"] for s in manifest["sources"].values())
    print(json.dumps({"sources": manifest["sources"], "read_stats": manifest["read_stats"]}, indent=2))
    print(f"{tokens} tokens in {args.out} ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
