"""Download Pile-format shards from a Hugging Face dataset repository:
``python scripts/fetch_data.py --shards 0-3 --val --out pile/raw`` (or ``losslab fetch-data ...``).

The default is the public Pile mirror that is still served, ``monology/pile-uncopyrighted``, pinned to one
commit: the Pile without Books3, BookCorpus2, OpenSubtitles, YoutubeSubtitles and (by its card) OpenWebText2
(``configs/data/pile_uncopyrighted.yaml`` is its mixture). Its 30 training shards are ``train/00.jsonl.zst`` ..
``train/29.jsonl.zst``; ``--shards`` picks some by their position in that list. Every file is checked against
the Hub's size and sha256, resumed where a stopped run left it, and retried; files already on disk and intact
are kept. ``HF_ENDPOINT`` points at another Hub. Exit 2, with one line naming it, when the Hub cannot be reached.
"""

from __future__ import annotations

import argparse
import fnmatch
import sys
import time
from pathlib import Path

import _bootstrap  # noqa: F401  (this checkout first on sys.path)

from data.hub import Fetcher, HubError, list_repo, parse_indices
from losslab.log import fail, get_logger

log = get_logger(__name__)

PILE_REPO = "monology/pile-uncopyrighted"
PILE_REVISION = "3be90335b66f24456a5d6659d9c8d208c0357119"  # its main branch when losslab pinned it


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", default=PILE_REPO, help=f"dataset repository (default {PILE_REPO})")
    parser.add_argument("--revision", default=PILE_REVISION, help="branch, tag or commit (default: a pinned commit)")
    parser.add_argument("--out", default="pile/raw", help="folder the files go to, in the repository's layout")
    parser.add_argument("--shards", default="all", help="training shards by position: all, none, or e.g. 0-3,7")
    parser.add_argument("--val", action="store_true", help="also the validation split (--val-file)")
    parser.add_argument("--train-glob", default="train/*.jsonl.zst", help="the training shards in the repository")
    parser.add_argument("--val-file", default="val.jsonl.zst", help="the validation split in the repository")
    parser.add_argument("--jobs", type=int, default=4, help="files downloaded at once")
    parser.add_argument("--attempts", type=int, default=5, help="tries per file before giving up")
    parser.add_argument("--list", action="store_true", help="list the shards and their sizes; download nothing")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        commit, files = list_repo(args.repo, "dataset", args.revision)
        train = sorted((f for f in files if fnmatch.fnmatch(f.path, args.train_glob)), key=lambda f: f.path)
        if args.list:
            for i, f in enumerate(train):
                print(f"{i:3d}  {f.path}  {f.size / 1e9:.2f} GB")
            print(f"{len(train)} shards, {sum(f.size for f in train) / 1e9:.1f} GB, {args.repo} at {commit}")
            return 0
        if not train and args.shards != "none":
            raise HubError(f"dataset {args.repo!r} at {commit[:12]} has no file matching --train-glob "
                           f"{args.train_glob!r}")  # fmt: skip
        chosen = [train[i] for i in parse_indices(args.shards, len(train))]
        if args.val:
            val = [f for f in files if f.path == args.val_file]
            if not val:
                raise HubError(f"dataset {args.repo!r} at {commit[:12]} has no {args.val_file!r} (--val-file)")
            chosen += val
        if not chosen:
            raise HubError("nothing to fetch: --shards none and no --val")
        out = Path(args.out)
        gb = sum(f.size for f in chosen) / 1e9
        log.info(f"{args.repo} at {commit}: {len(chosen)} files, {gb:.2f} GB -> {out}")
        done = Fetcher(args.repo, "dataset", commit, out, jobs=args.jobs, attempts=args.attempts).fetch(chosen)
    except HubError as e:
        return fail(e)
    except OSError as e:  # the output folder cannot be written, the disk is full
        return fail(f"{e.filename or args.out}: {e.strerror or e}")
    except KeyboardInterrupt:
        log.warning("interrupted: run the same command again to resume")
        return 130
    counts = {how: sum(d.how == how for d in done) for how in ("downloaded", "resumed", "replaced", "present")}
    summary = ", ".join(f"{n} {how}" for how, n in counts.items() if n)
    print(f"{len(done)} files verified in {out} ({summary}; {time.perf_counter() - start:.0f} s); commit {commit}")
    shards = [str(d.path) for d in done if d.file in train]
    if shards:
        print(f"next: python scripts/prepare_data.py --by-source --files '{out}/{args.train_glob}' "
              f"--tokenizer pile/tokenizer/tokenizer.model --out pile/prepared")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
