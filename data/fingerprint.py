"""What the training data were, so that a resumed run can tell whether they changed under it.

A run records each input file's path, size, modification time and a content hash (``data.files.DIGEST``):
of the whole file for prepared data (every file training reads: the manifest, the token counts, each source's
tokens, document offsets and per-token streams), and for streamed shards (``.jsonl.zst``, fine-tuning records,
held-out files) of their first and last MiB and 16 blocks of 64 KiB spread between them, read in one pass of a
few MiB whatever the file's size. On resume the two records are compared by size and hash; a file that moved
but holds the same bytes (data copied to another file system) is no change, and a modification time alone
(``rsync`` without ``-t``) is none either.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path
from typing import Any

import xxhash

from data.config import DataConfig
from data.files import DIGEST, file_digest
from data.memmap import STREAM_FILES, PreparedCorpus
from data.prepare import MANIFEST
from data.shards import resolve_files
from losslab.log import get_logger

log = get_logger(__name__)

EDGE = 1 << 20
"""Bytes hashed at each end of a streamed file."""
BLOCKS, BLOCK = 16, 1 << 16
"""Blocks hashed between the ends of a streamed file, and their size."""
_REPORT_ABOVE = 1 << 30
"""Prepared data larger than this say that they are being hashed (it takes a while)."""


def sampled_digest(path: str | os.PathLike, size: int) -> str:
    """``DIGEST`` of the file's size, its head and tail (``EDGE`` bytes each) and ``BLOCKS`` blocks between."""
    h = xxhash.xxh3_128(size.to_bytes(8, "little"))
    with open(path, "rb") as fh:
        if size <= 2 * EDGE + BLOCKS * BLOCK:
            h.update(fh.read())
            return h.hexdigest()
        h.update(fh.read(EDGE))
        step = (size - 2 * EDGE) // (BLOCKS + 1)
        for i in range(1, BLOCKS + 1):
            fh.seek(EDGE + i * step - BLOCK // 2)
            h.update(fh.read(BLOCK))
        fh.seek(size - EDGE)
        h.update(fh.read(EDGE))
    return h.hexdigest()


def file_record(path: str | os.PathLike, whole: bool) -> dict[str, Any]:
    st = os.stat(path)
    digest = file_digest(path) if whole else sampled_digest(path, st.st_size)
    return {
        "path": str(path),
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "hashed": "whole" if whole else "sampled",
        "digest": digest,
    }


def prepared_files(prepared: str | os.PathLike) -> list[Path]:
    """Every file training reads from a ``prepare_data.py`` output."""
    corpus = PreparedCorpus(prepared)
    files = [corpus.path / MANIFEST]
    files += [corpus.path / n for n in ("token_counts.npy", "target_counts.npy") if (corpus.path / n).is_file()]
    for source in sorted(corpus.sources):
        names = ["tokens.bin", "doc_offsets.npy", *(f for f, _, _ in STREAM_FILES.values())]
        files += [p for p in (corpus.source_file(source, n) for n in names) if p.is_file()]
    return files


def fingerprint(cfg: DataConfig, stream_files: list[str]) -> dict[str, Any]:
    """The record of the data ``cfg`` names: prepared data hashed whole, ``stream_files`` (the resolved shards
    or records) and the held-out files sampled."""
    if cfg.prepared:
        whole = prepared_files(cfg.prepared)
        total = sum(p.stat().st_size for p in whole)
        if total > _REPORT_ABOVE:
            log.info(f"hashing the prepared data ({total / 1e9:.1f} GB) to detect a change on resume")
        records = [file_record(p, whole=True) for p in whole]
    else:
        records = [file_record(p, whole=False) for p in stream_files]
    records += [file_record(p, whole=False) for p in resolve_files(cfg.val_files)]
    return {"digest": DIGEST, "files": records}


def differences(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """One line for each file whose content is not what ``before`` recorded (none when only paths or
    modification times differ but every file holds the same bytes, in the same order)."""
    old, new = before.get("files", []), now.get("files", [])
    if before.get("digest") != now.get("digest"):
        return [f"the data were recorded with another hash ({before.get('digest')}), so they cannot be compared"]
    if [(r["size"], r["digest"]) for r in old] == [(r["size"], r["digest"]) for r in new]:
        return []
    by_path = {r["path"]: r for r in new}
    out = []
    for r in old:
        n = by_path.get(r["path"])
        if n is None:
            out.append(f"{r['path']}: no longer among the data files")
        elif n["size"] != r["size"]:
            out.append(f"{r['path']}: {n['size']} bytes, {r['size']} when recorded (modified {_when(n)})")
        elif n["digest"] != r["digest"]:
            out.append(f"{r['path']}: its content changed, same size (modified {_when(n)})")
    recorded = {r["path"] for r in old}
    out += [f"{r['path']}: added to the data files" for r in new if r["path"] not in recorded]
    return out or ["the same data files, read in another order"]


def _when(record: dict[str, Any]) -> str:
    return datetime.datetime.fromtimestamp(record["mtime_ns"] / 1e9).astimezone().isoformat(timespec="seconds")
