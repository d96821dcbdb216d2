"""Shards -> pre-tokenised memory-mapped token files, written atomically, idempotently and resumably.

Output directory layout (one pass over the files in order would write the same bytes; ``data/tokenise.py``)::

    OUT/manifest.json            inputs (paths, sizes, mtimes), tokenizer hash, dtype, sources, read stats
    OUT/token_counts.npy         int64 [V] token frequencies (EOS once per document), for PDL and rare-token eval
    OUT/<source>/tokens.bin      the source's documents, each followed by EOS (uint16, or uint32 if V > 65535)
    OUT/<source>/doc_offsets.npy int64 [D + 1] token offset of each document
    OUT/<source>/loss_mask.bin   fine-tuning records only: uint8 per token, 1 where it carries loss
    OUT/target_counts.npy        fine-tuning records only: frequencies of the tokens that carry loss

One source ``all`` by default; ``by_source`` splits by ``meta.pile_set_name`` so that domains can be mixed by
weight. ``sft`` reads fine-tuning records (``data/sft.py``) instead of Pile documents.

Every shard is prepared on its own into ``OUT.parts/`` (``data/parts.py``): a stopped run continues with the
shards not done, ``part=(i, n)`` splits the shards across nodes, and ``merge_parts`` joins the parts into OUT
(``prepare`` does both when given no part). The parts folder is removed after the merge unless ``keep_parts``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from data import parts as shard_parts
from data.sft import FineTuningRecords
from data.shards import DataError, resolve_files
from data.tokenise import FORMAT_VERSION, MANIFEST, fingerprint, source_dirname, token_dtype
from data.tokenizer import Tokenizer

__all__ = ["FORMAT_VERSION", "MANIFEST", "fingerprint", "merge_parts", "prepare", "prepare_shards",
           "source_dirname", "token_dtype"]  # fmt: skip


def _inputs(patterns: list[str], tokenizer_path: str, by_source: bool, records: FineTuningRecords | None):
    files = resolve_files(patterns)
    tok = Tokenizer(tokenizer_path)
    if records is not None and by_source:
        raise DataError("fine-tuning records have no sources to split by (by_source)")
    return files, tok, fingerprint(files, tok.sha256, by_source, records)


def _reusable(out: Path, fp: dict) -> dict | None:
    if (out / MANIFEST).is_file():
        manifest = json.loads((out / MANIFEST).read_text())
        if manifest.get("fingerprint") == fp:
            return manifest
    return None


def prepare(
    patterns: list[str],
    tokenizer_path: str,
    out_dir: str | Path,
    *,
    by_source: bool = False,
    workers: int = os.cpu_count() or 1,
    batch_bytes: int = 1 << 20,
    show_progress: bool = True,
    records: FineTuningRecords | None = None,
    keep_parts: bool = False,
) -> dict:
    """Tokenise the shards (or, given ``records``, fine-tuning record files) into ``out_dir``; returns the
    manifest. Reuses an existing output for the same inputs and tokenizer, and the shards already prepared by a
    run that stopped. ``workers=0`` does everything in this process."""
    out = Path(out_dir)
    files, tok, fp = _inputs(patterns, tokenizer_path, by_source, records)
    manifest = _reusable(out, fp)
    if manifest is not None:
        return manifest
    parts = shard_parts.plan(files, out, tok.sha256, by_source, records)
    shard_parts.run_parts(parts, tokenizer_path, workers=workers, batch_bytes=batch_bytes, by_source=by_source,
                          records=records, show_progress=show_progress)  # fmt: skip
    return _merge(parts, out, fp, records, show_progress, keep_parts)


def prepare_shards(
    patterns: list[str],
    tokenizer_path: str,
    out_dir: str | Path,
    *,
    part: tuple[int, int],
    by_source: bool = False,
    workers: int = os.cpu_count() or 1,
    batch_bytes: int = 1 << 20,
    show_progress: bool = True,
    records: FineTuningRecords | None = None,
) -> list[shard_parts.ShardPart]:
    """Prepare the shards of node ``part = (i, n)`` into ``OUT.parts/`` (no merge); returns them."""
    out = Path(out_dir)
    files, tok, _ = _inputs(patterns, tokenizer_path, by_source, records)
    mine = shard_parts.select(shard_parts.plan(files, out, tok.sha256, by_source, records), part)
    shard_parts.run_parts(mine, tokenizer_path, workers=workers, batch_bytes=batch_bytes, by_source=by_source,
                          records=records, show_progress=show_progress)  # fmt: skip
    return mine


def merge_parts(
    patterns: list[str],
    tokenizer_path: str,
    out_dir: str | Path,
    *,
    by_source: bool = False,
    show_progress: bool = True,
    records: FineTuningRecords | None = None,
    keep_parts: bool = False,
) -> dict:
    """Merge the parts that ``prepare_shards`` wrote on every node into ``out_dir``; every shard must be done."""
    out = Path(out_dir)
    files, tok, fp = _inputs(patterns, tokenizer_path, by_source, records)
    manifest = _reusable(out, fp)
    if manifest is not None:
        return manifest
    parts = shard_parts.plan(files, out, tok.sha256, by_source, records)
    missing = [p.file for p in parts if not p.done()]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise DataError(f"cannot merge into {out}: {len(missing)} of {len(parts)} shards are not prepared "
                        f"({shown}); run the missing --part(s) first")  # fmt: skip
    return _merge(parts, out, fp, records, show_progress, keep_parts)


def _merge(parts, out: Path, fp: dict, records, show_progress: bool, keep_parts: bool) -> dict:
    _remove_stale_outputs(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        manifest = shard_parts.merge(parts, tmp, fp, records, show_progress)
    except BaseException:  # an error or Ctrl-C: leave no half-written output behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # atomic publish: the old output (if any) is moved aside before the new one takes its name
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
    if not keep_parts:
        shutil.rmtree(shard_parts.parts_dir(out), ignore_errors=True)
    return manifest


def _remove_stale_outputs(out: Path) -> None:
    """Half-written outputs of earlier runs that were killed (SIGKILL leaves no chance to clean up)."""
    for stale in out.parent.glob(f".{out.name}.*-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not shard_parts.alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
