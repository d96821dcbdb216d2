"""Publish finished runs without their weights, or restore them (``evals/published_runs.py``):

    python scripts/publish_runs.py pack RUN_DIR ... --out docs/results/finetune/runs [--finished]
    python scripts/publish_runs.py restore RECORD_DIR ... --runs runs/finetune_study

``pack`` writes ``OUT/<run>`` for each run (replacing an older record of it) and the blobs they share, then deletes
blobs no record needs; ``--finished`` skips, with a line, runs that have not finished (a study's driver packs what
it has). ``restore`` rebuilds ``RUNS/<run>`` from each record, checked file by file, and leaves a run that is
already there as it is. Errors are one line, exit 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import _bootstrap  # noqa: F401  (this checkout first on sys.path)

from evals.published_runs import RecordError, finished, pack, prune_blobs, restore
from losslab.log import fail


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="publish finished runs without their weights")
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--finished", action="store_true", help="skip runs that have not finished, with a line each")
    r = sub.add_parser("restore", help="rebuild run directories from published records")
    r.add_argument("records", nargs="+", type=Path)
    r.add_argument("--runs", required=True, type=Path, help="the folder the run directories go into")
    args = ap.parse_args(argv)
    try:
        if args.command == "pack":
            for run in args.runs:
                if args.finished and not finished(run):
                    print(f"{run}: not finished, not published")
                    continue
                done = pack(run, args.out)
                print(f"{run} -> {args.out / done.name}: {done.kept} files, {_mb(done.kept_bytes)} "
                      f"({_mb(done.left_out_bytes)} of weights, training state and logs left out)")  # fmt: skip
            prune_blobs(args.out)
        else:
            for record in args.records:
                target = args.runs / record.name
                if target.exists():
                    print(f"{target}: there already, left as it is")
                    continue
                n = restore(record, target)
                print(f"{target}: restored from the published record {record} ({n} files, no weights)")
    except RecordError as e:
        return fail(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
