"""Shards -> pre-tokenised memory-mapped token files, written atomically and idempotently.

Output directory layout::

    OUT/manifest.json            inputs (paths, sizes, mtimes), tokenizer hash, dtype, sources, read stats
    OUT/token_counts.npy         int64 [V] token frequencies (EOS once per document), for PDL and rare-token eval
    OUT/<source>/tokens.bin      the source's documents, each followed by EOS (uint16, or uint32 if V > 65535)
    OUT/<source>/doc_offsets.npy int64 [D + 1] token offset of each document

One source ``all`` by default; ``by_source`` splits by ``meta.pile_set_name`` so that domains can be mixed by
weight. The main process reads and parses; worker processes tokenise (the expensive part) and count.
"""

from __future__ import annotations

import collections
import itertools
import json
import multiprocessing as mp
import os
import re
import shutil
import threading
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data.shards import DataError, ReadStats, iter_documents, resolve_files
from data.tokenizer import Tokenizer

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
_worker_tok: Tokenizer | None = None


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def source_dirname(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_.") or "unknown"


def _init_worker(path: str) -> None:
    global _worker_tok
    _worker_tok = Tokenizer(path)


def _encode(texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """texts -> (tokens with EOS after each document, per-document lengths, bincount of the tokens)."""
    tok = _worker_tok
    assert tok is not None
    ids = tok.encode_batch(texts, num_threads=1)
    eos = np.array([tok.eos_id], dtype=np.int64)
    parts = []
    for x in ids:
        parts.append(np.array(x, dtype=np.int64))
        parts.append(eos)
    flat = np.concatenate(parts)
    lengths = np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=len(ids))
    return flat.astype(token_dtype(tok.vocab_size)), lengths, np.bincount(flat, minlength=tok.vocab_size)


def _batches(
    files: list[str], stats: ReadStats, by_source: bool, batch_bytes: int, progress: tqdm
) -> Iterator[tuple[list[str], list[str]]]:
    texts: list[str] = []
    sources: list[str] = []
    size = 0
    for path in files:
        for doc in iter_documents(path, stats):
            texts.append(doc.text)
            sources.append(doc.source if by_source else "all")
            size += len(doc.text)
            if size >= batch_bytes:
                progress.update(size)
                yield texts, sources
                texts, sources, size = [], [], 0
    if texts:
        progress.update(size)
        yield texts, sources


def fingerprint(files: list[str], tokenizer_sha: str, by_source: bool) -> dict:
    return {
        "format": FORMAT_VERSION,
        "files": [
            {"path": os.path.abspath(f), "size": os.path.getsize(f), "mtime_ns": os.stat(f).st_mtime_ns} for f in files
        ],
        "tokenizer_sha256": tokenizer_sha,
        "by_source": by_source,
    }


def prepare(
    patterns: list[str],
    tokenizer_path: str,
    out_dir: str | Path,
    *,
    by_source: bool = False,
    workers: int = os.cpu_count() or 1,
    batch_bytes: int = 1 << 20,
    show_progress: bool = True,
) -> dict:
    """Tokenise the shards into ``out_dir``; returns the manifest. Reuses an existing output for the same
    inputs and tokenizer. ``workers=0`` tokenises in this process."""
    files = resolve_files(patterns)
    out = Path(out_dir)
    tok = Tokenizer(tokenizer_path)
    fp = fingerprint(files, tok.sha256, by_source)
    if (out / MANIFEST).is_file():
        manifest = json.loads((out / MANIFEST).read_text())
        if manifest.get("fingerprint") == fp:
            return manifest
    _remove_stale_outputs(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        manifest = _write(files, tok, tokenizer_path, tmp, fp, by_source, workers, batch_bytes, show_progress)
    except BaseException:  # an error or Ctrl-C: leave no half-written output behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # atomic publish: the old output (if any) is moved aside before the new one takes its name
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
    return manifest


def _remove_stale_outputs(out: Path) -> None:
    """Half-written outputs of earlier runs that were killed (SIGKILL leaves no chance to clean up)."""
    for stale in out.parent.glob(f".{out.name}.*-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _write(
    files: list[str],
    tok: Tokenizer,
    tokenizer_path: str,
    tmp: Path,
    fp: dict,
    by_source: bool,
    workers: int,
    batch_bytes: int,
    show_progress: bool,
) -> dict:
    """Tokenise ``files`` into the directory ``tmp``; returns the manifest written there."""
    dtype = token_dtype(tok.vocab_size)
    stats = ReadStats()
    counts = np.zeros(tok.vocab_size, dtype=np.int64)
    writers: dict[str, tuple] = {}  # source -> (file handle, offsets list)
    total_bytes = sum(os.path.getsize(f) for f in files)
    progress = tqdm(total=None, unit="B", unit_scale=True, desc="tokenising", disable=not show_progress)
    progress.set_postfix_str(f"{len(files)} files, {total_bytes / 1e6:.0f} MB compressed")
    batches = _batches(files, stats, by_source, batch_bytes, progress)
    with ExitStack() as files_open:  # one open token file per source
        pool = mp.get_context("fork").Pool(workers, _init_worker, (tokenizer_path,)) if workers > 0 else None
        try:
            if pool is None:
                _init_worker(tokenizer_path)
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
            for src, (flat, lengths, bincount) in encoded:
                counts += bincount
                starts = np.concatenate([[0], np.cumsum(lengths)])
                i = 0
                for name, run in itertools.groupby(src):  # consecutive documents of one source: one write
                    j = i + len(list(run))
                    if name not in writers:
                        d = tmp / source_dirname(name)
                        d.mkdir(exist_ok=True)
                        writers[name] = (files_open.enter_context(open(d / "tokens.bin", "wb")), [0])
                    fh, offsets = writers[name]
                    fh.write(flat[starts[i] : starts[j]].tobytes())
                    offsets.extend((offsets[-1] - starts[i] + starts[i + 1 : j + 1]).tolist())
                    i = j
        finally:
            if pool is not None:
                pool.close()
                pool.join()
            progress.close()
    if not writers:
        raise DataError(f"no documents in {files} (read stats: {stats.as_dict()})")

    sources = {}
    for name, (_, offsets) in sorted(writers.items()):
        d = tmp / source_dirname(name)
        np.save(d / "doc_offsets.npy", np.asarray(offsets, dtype=np.int64))
        sources[name] = {"dir": source_dirname(name), "tokens": offsets[-1], "documents": len(offsets) - 1}
    np.save(tmp / "token_counts.npy", counts)
    manifest = {
        "fingerprint": fp,
        "dtype": dtype.name,
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
        "sources": sources,
        "read_stats": asdict(stats),
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest
