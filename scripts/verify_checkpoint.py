"""Check checkpoints against the sizes and checksums their ``meta.json`` recorded when they were written, without
loading anything into a model: ``losslab verify RUN_OR_CKPT`` (a run directory: each of its complete
checkpoints). One line per checkpoint; a missing, torn or corrupted file is one ``error:`` line naming it.

Exit 0: every file is as it was written (or the checkpoint predates checksums and is reported ``unverified``,
its files' sizes checked); 2: a file is damaged, or there is no checkpoint at the path."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import _bootstrap  # noqa: F401  (this checkout first on sys.path)

from losslab.log import fail, get_logger
from models.checkpoint import CHECKPOINTS, META, complete_checkpoints, file_problems, read_meta, verified
from models.checkpoint_files import CheckpointError

log = get_logger(__name__)


def checkpoints(path: Path) -> list[Path]:
    if (path / META).is_file():
        return [path]
    return complete_checkpoints(path / CHECKPOINTS) if (path / CHECKPOINTS).is_dir() else []


def verify(ckpt: Path) -> bool:
    """Print what is wrong with ``ckpt`` (or that it is fine); True when nothing is."""
    try:
        meta = read_meta(ckpt)
    except CheckpointError as e:
        log.error(f"error: {e}")
        return False
    problems = file_problems(ckpt, meta)
    for problem in problems:
        log.error(f"error: {problem}")
    files = meta.get("files") or {}
    size = f"{len(files)} files, {sum(files.values()) / 1e6:.1f} MB"
    if problems:
        return False
    if not files:
        print(f"unverified: {ckpt} (written before checkpoints listed their files)")
    elif not verified(meta):
        print(f"unverified: {ckpt} ({size}; written before checksums: only the sizes were checked)")
    else:
        print(f"ok: {ckpt} ({size})")
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", help="a checkpoint directory, or a run directory (each of its checkpoints)")
    args = parser.parse_args(argv)
    found = checkpoints(Path(args.path))
    if not found:
        return fail(f"no complete checkpoint at {args.path!r} ({META} in a step_* directory)")
    intact = [verify(ckpt) for ckpt in found]
    return 0 if all(intact) else 2


if __name__ == "__main__":
    sys.exit(main())
