"""Tokenise a list of shards into one prepared directory: the work of one shard job of ``data/prepare.py``.

The calling process reads and parses; worker processes tokenise (the expensive part) and count; results come
back in order, so the output is the same for any number of workers. Layout of the directory written::

    DIR/manifest.json            fingerprint of the inputs, tokenizer hash, dtype, sources, read stats
    DIR/token_counts.npy         int64 [V] token frequencies (EOS once per document), for PDL and rare-token eval
    DIR/<source>/tokens.bin      the source's documents, each followed by EOS (uint16, or uint32 if V > 65535)
    DIR/<source>/doc_offsets.npy int64 [D + 1] token offset of each document
    DIR/<source>/loss_mask.bin   fine-tuning records only: uint8 per token, 1 where it carries loss
    DIR/target_counts.npy        fine-tuning records only: frequencies of the tokens that carry loss
"""

from __future__ import annotations

import collections
import ctypes
import itertools
import json
import multiprocessing as mp
import os
import re
import signal
import threading
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from data.sft import FineTuningRecords
from data.shards import ReadStats, iter_documents
from data.tokenizer import Tokenizer

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
_worker_tok: Tokenizer | None = None
_worker_records: FineTuningRecords | None = None


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def source_dirname(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_.") or "unknown"


def die_with_parent(parent: int) -> None:
    """Linux: this process gets SIGKILL when its parent dies, however the parent died (SIGKILL included), so a
    killed run leaves no worker behind it. Elsewhere a no-op."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the request was made
        os._exit(1)


def _init_worker(path: str, records: FineTuningRecords | None, parent: int | None = None) -> None:
    global _worker_tok, _worker_records
    if parent is not None:
        die_with_parent(parent)
    _worker_tok, _worker_records = Tokenizer(path), records


def _encode(items: list) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """texts or records -> (tokens with EOS after each document, per-document lengths, bincount of the tokens,
    and for records: the loss mask (the EOS takes its document's last value, as packing gives it) and the
    bincount of the tokens that carry loss)."""
    tok = _worker_tok
    assert tok is not None
    if _worker_records is None:
        docs = tok.encode_batch(items, num_threads=1)
        ids, masks = docs, None
    else:
        docs = _worker_records.encode(items, tok)
        ids = [d["tokens"] for d in docs]
        masks = [[*d["loss_mask"], d["loss_mask"][-1] if d["loss_mask"] else False] for d in docs]
    eos = np.array([tok.eos_id], dtype=np.int64)
    parts = []
    for x in ids:
        parts.append(np.array(x, dtype=np.int64))
        parts.append(eos)
    flat = np.concatenate(parts)
    lengths = np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=len(ids))
    counts = np.bincount(flat, minlength=tok.vocab_size)
    if masks is None:
        return flat.astype(token_dtype(tok.vocab_size)), lengths, counts, None, None
    mask = np.fromiter((m for row in masks for m in row), dtype=np.uint8, count=len(flat))
    targets = np.bincount(flat[mask.astype(bool)], minlength=tok.vocab_size)
    return flat.astype(token_dtype(tok.vocab_size)), lengths, counts, mask, targets


def _items(path: str, stats: ReadStats, records: FineTuningRecords | None) -> Iterator[tuple[Any, str, int]]:
    """(item, source, size) of each good document or record of a file."""
    if records is not None:
        for record in records.read(path, stats):
            yield record, "all", len(repr(record))
        return
    for doc in iter_documents(path, stats):
        yield doc.text, doc.source, len(doc.text)


def _batches(
    files: list[str],
    stats: ReadStats,
    by_source: bool,
    batch_bytes: int,
    progress: Progress,
    records: FineTuningRecords | None,
) -> Iterator[tuple[list, list[str]]]:
    texts: list = []
    sources: list[str] = []
    size = 0
    for path in files:
        for item, source, item_size in _items(path, stats, records):
            texts.append(item)
            sources.append(source if by_source else "all")
            size += item_size
            if size >= batch_bytes:
                progress.update(size)
                yield texts, sources
                texts, sources, size = [], [], 0
    if texts:
        progress.update(size)
        yield texts, sources


def fingerprint(files: list[str], tokenizer_sha: str, by_source: bool, records: FineTuningRecords | None) -> dict:
    return {
        "records": None if records is None else {"train_on_prompt": records.train_on_prompt},
        "format": FORMAT_VERSION,
        "files": [
            {"path": os.path.abspath(f), "size": os.path.getsize(f), "mtime_ns": os.stat(f).st_mtime_ns} for f in files
        ],
        "tokenizer_sha256": tokenizer_sha,
        "by_source": by_source,
    }


class Progress(Protocol):
    """What the writer reports its progress to: a tqdm bar, or a counter shared with a parent process."""

    def update(self, n: int) -> Any: ...


def write_prepared(
    files: list[str],
    tok: Tokenizer,
    tokenizer_path: str,
    out: Path,
    fp: dict,
    *,
    by_source: bool,
    workers: int,
    batch_bytes: int,
    progress: Progress,
    records: FineTuningRecords | None,
) -> dict:
    """Tokenise ``files`` into the directory ``out`` (which must exist); returns the manifest written there.
    ``workers=0`` tokenises in this process. A list of files without a document gives a manifest with no
    sources (one empty shard of many is no error; ``data/prepare.py`` refuses a corpus with no document)."""
    dtype = token_dtype(tok.vocab_size)
    stats = ReadStats()
    counts = np.zeros(tok.vocab_size, dtype=np.int64)
    target_counts = np.zeros(tok.vocab_size, dtype=np.int64)
    writers: dict[str, tuple] = {}  # source -> (token file, offsets list, mask file or None)
    batches = _batches(files, stats, by_source, batch_bytes, progress, records)
    with ExitStack() as files_open:  # one open token file per source
        init = (tokenizer_path, records)
        pool = mp.get_context("fork").Pool(workers, _init_worker, (*init, os.getpid())) if workers > 0 else None
        try:
            if pool is None:
                _init_worker(*init)
                encoded = ((src, _encode(texts)) for texts, src in batches)
            else:
                # batches go to the workers in order; their results come back in order (imap), so the output
                # is the same whatever the number of workers
                # at most a few batches in flight: Pool.imap would otherwise queue the whole corpus in memory
                in_flight = threading.Semaphore(4 * workers)
                sources_q: collections.deque[list[str]] = collections.deque()

                def texts_only() -> Iterator[list[str]]:
                    for texts, src in batches:
                        in_flight.acquire()
                        sources_q.append(src)
                        yield texts

                def results() -> Iterator[tuple[list[str], tuple]]:
                    for res in pool.imap(_encode, texts_only()):
                        in_flight.release()
                        yield sources_q.popleft(), res

                encoded = results()
            for src, (flat, lengths, bincount, mask, targets) in encoded:
                counts += bincount
                if targets is not None:
                    target_counts += targets
                starts = np.concatenate([[0], np.cumsum(lengths)])
                i = 0
                for name, run in itertools.groupby(src):  # consecutive documents of one source: one write
                    j = i + len(list(run))
                    if name not in writers:
                        d = out / source_dirname(name)
                        d.mkdir(exist_ok=True)
                        mask_fh = files_open.enter_context(open(d / "loss_mask.bin", "wb")) if records else None
                        writers[name] = (files_open.enter_context(open(d / "tokens.bin", "wb")), [0], mask_fh)
                    fh, offsets, mask_fh = writers[name]
                    fh.write(flat[starts[i] : starts[j]].tobytes())
                    if mask_fh is not None:
                        mask_fh.write(mask[starts[i] : starts[j]].tobytes())
                    offsets.extend((offsets[-1] - starts[i] + starts[i + 1 : j + 1]).tolist())
                    i = j
        finally:
            if pool is not None:
                pool.close()
                pool.join()

    sources = {}
    for name, (_, offsets, _) in sorted(writers.items()):
        d = out / source_dirname(name)
        np.save(d / "doc_offsets.npy", np.asarray(offsets, dtype=np.int64))
        sources[name] = {"dir": source_dirname(name), "tokens": offsets[-1], "documents": len(offsets) - 1}
    np.save(out / "token_counts.npy", counts)
    if records is not None:
        np.save(out / "target_counts.npy", target_counts)
    manifest = {
        "kind": "records" if records is not None else "text",
        "fingerprint": fp,
        "dtype": dtype.name,
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
        "sources": sources,
        "read_stats": asdict(stats),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest
