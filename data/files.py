"""File helpers every floor of losslab may use: content hashes and atomic writes."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import xxhash

DIGEST = "xxh3_128"
"""The checksum of checkpoint and data files: xxHash's XXH3, 128 bits. Not cryptographic (it finds damage, not
tampering) but ~10x faster than sha256 here, so hashing a multi-GB checkpoint adds little to its save
(``docs/benchmarks.md``)."""
_BLOCK = 16 << 20


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_digest(path: str | os.PathLike) -> str:
    """``DIGEST`` of a whole file, read in blocks into one reused buffer (no copy per block)."""
    h = xxhash.xxh3_128()
    buf = bytearray(_BLOCK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def text_digest(text: str) -> str:
    return xxhash.xxh3_128(text.encode()).hexdigest()


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` so that a reader (or a crash) never sees half of it. A write that fails
    (a full disk) leaves ``path`` as it was and no temporary file behind."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
