"""Read Pile-format shards: zstd-compressed JSON lines ``{"text": ..., "meta": {"pile_set_name": ...}}``.

Bad input never crashes a run and is never dropped silently: every skipped line or file is counted in
``ReadStats``, which the trainer logs.
"""

from __future__ import annotations

import glob
import io
import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

import zstandard

T = TypeVar("T")


@dataclass
class Document:
    text: str
    source: str


@dataclass
class ReadStats:
    documents: int = 0
    bad_json: int = 0
    missing_text: int = 0
    bad_utf8: int = 0
    empty: int = 0
    corrupt_files: int = 0
    bad_records: int = 0
    """Fine-tuning lines that are JSON but not a usable record (see ``data/sft.py``)."""

    @property
    def skipped(self) -> int:
        return self.bad_json + self.missing_text + self.bad_utf8 + self.empty + self.bad_records

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class DataError(ValueError):
    """The corpus cannot be used at all (missing files, nothing readable)."""


def resolve_files(patterns: Iterable[str]) -> list[str]:
    """Expand paths and globs, in order; a pattern that matches nothing is an error."""
    files: list[str] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        matches = [m for m in matches if os.path.isfile(m)]
        if not matches:
            raise DataError(f"data file not found: {pattern!r} (working directory {os.getcwd()})")
        files.extend(matches)
    return files


def _parse_json(raw: bytes, stats: ReadStats) -> tuple[str, Any] | None:
    """One line -> (its text, its JSON value), or None (a blank line; or bad input, counted)."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        stats.bad_utf8 += 1
        return None
    if not line.strip():
        return None  # blank separator line, not a document
    try:
        return line, json.loads(line)
    except json.JSONDecodeError:
        stats.bad_json += 1
        return None


def _as_document(line: str, obj: Any, stats: ReadStats) -> Document | None:
    text = obj.get("text") if isinstance(obj, dict) else None
    if not isinstance(text, str):
        stats.missing_text += 1
        return None
    if "\\u" in line and not _encodable(text):  # a lone surrogate (valid JSON "\ud800") is no text
        stats.bad_utf8 += 1
        return None
    if not text.strip():
        stats.empty += 1
        return None
    meta = obj.get("meta")
    source = meta.get("pile_set_name", "") if isinstance(meta, dict) else ""
    stats.documents += 1
    return Document(text=text, source=str(source))


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class _Truncated(Exception):
    pass


def _decompressed_chunks(fh: io.BufferedIOBase, chunk_bytes: int = 1 << 20) -> Iterator[bytes]:
    """Decompress every frame of a zstd file; raise ``_Truncated`` if the file ends inside a frame.

    (``stream_reader`` returns a cut-off stream's partial output without an error, which would let a
    truncated shard pass unnoticed.)
    """
    dctx = zstandard.ZstdDecompressor(max_window_size=2**31)
    pending = b""
    while True:
        data = pending or fh.read(chunk_bytes)
        if not data:
            return  # clean end, at a frame boundary
        dobj = dctx.decompressobj()
        while True:
            out = dobj.decompress(data)
            if out:
                yield out
            if dobj.eof:
                pending = dobj.unused_data
                break
            data = fh.read(chunk_bytes)
            if not data:
                raise _Truncated


def _lines(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Split a byte stream on newlines; a final line without a newline is yielded too."""
    rest = b""
    for chunk in chunks:
        parts = (rest + chunk).split(b"\n")
        rest = parts.pop()
        yield from parts
    if rest:
        yield rest


def iter_documents(path: str, stats: ReadStats) -> Iterator[Document]:
    """Yield the good documents of one shard. A truncated, empty or corrupt file is counted in
    ``stats.corrupt_files``; its documents before the damage are used, the partial line at the damage is not."""
    return iter_records(path, stats, _as_document)


def iter_records(path: str, stats: ReadStats, convert: Callable[[str, Any, ReadStats], T | None]) -> Iterator[T]:
    """The JSON lines of a ``.jsonl.zst`` (or plain ``.jsonl``) file that ``convert`` accepts; bad lines and
    damaged files are counted in ``stats`` as ``iter_documents`` says."""
    if os.path.getsize(path) == 0:  # not even a zstd header: a file whose write never happened
        stats.corrupt_files += 1
        return
    with open(path, "rb") as fh:
        compressed = path.endswith(".zst")
        lines = _lines(_decompressed_chunks(fh) if compressed else iter(lambda: fh.read(1 << 20), b""))
        try:
            prev = next(lines, None)
            # one line of look-ahead, so the partial line before a truncation is never parsed
            for raw in lines:
                item = _convert(prev, stats, convert)
                if item is not None:
                    yield item
                prev = raw
        except (zstandard.ZstdError, _Truncated):
            stats.corrupt_files += 1
            return
        if prev is not None:
            item = _convert(prev, stats, convert)
            if item is not None:
                yield item


def _convert(raw: bytes, stats: ReadStats, convert: Callable[[str, Any, ReadStats], T | None]) -> T | None:
    parsed = _parse_json(raw, stats)
    return None if parsed is None else convert(parsed[0], parsed[1], stats)


def write_shard(path: str, docs: Iterable[dict], level: int = 10) -> int:
    """Write documents as a Pile-format shard, atomically (a reader never sees a half-written file)."""
    tmp = f"{path}.tmp{os.getpid()}"
    n = 0
    with open(tmp, "wb") as fh, zstandard.ZstdCompressor(level=level).stream_writer(fh) as out:
        for doc in docs:
            out.write((json.dumps(doc, ensure_ascii=False) + "\n").encode("utf-8"))
            n += 1
    os.replace(tmp, path)
    return n
