"""Data pipeline throughput, side by side with raw sentencepiece encoding of the same text, in one run:

- raw: ``SentencePieceProcessor.encode`` on one thread (the ceiling for tokenisation per core);
- prepare: ``scripts/prepare_data.py``'s pipeline (read .zst + parse JSON + tokenise + pack + write), with 1
  worker and with one worker per core, in MB of text per second;
- loader: batches per second from the prepared memmap (``MemmapSource``), in tokens per second.

    python scripts/build_study_corpus.py --out corpus/study && python scripts/fetch_study_tokenizer.py
    python scripts/bench_data.py --files 'corpus/study/*.jsonl.zst' \
        --tokenizer corpus/tokenizers/llama-style-32k-bpe.model
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import _bootstrap  # noqa: F401  (this checkout first on sys.path)

from data.memmap import MemmapBatches, MemmapSource, PreparedCorpus
from data.prepare import prepare
from data.shards import ReadStats, iter_documents, resolve_files
from data.tokenizer import Tokenizer


def raw_encode_mb_s(texts: list[str], tokenizer: Tokenizer) -> float:
    size = sum(len(t.encode()) for t in texts)
    start = time.perf_counter()
    tokenizer.encode_batch(texts, num_threads=1)
    return size / (time.perf_counter() - start) / 1e6


def prefix(texts: list[str], max_bytes: int) -> list[str]:
    """The first documents up to ``max_bytes`` of text (all of them for 0)."""
    if not max_bytes:
        return texts
    out, size = [], 0
    for t in texts:
        out.append(t)
        size += len(t.encode())
        if size >= max_bytes:
            break
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", nargs="+", default=["corpus/study/*.jsonl.zst"])
    parser.add_argument("--tokenizer", default="corpus/tokenizers/llama-style-32k-bpe.model")
    parser.add_argument("--raw-bytes", type=int, default=0, help="text bytes for the raw-encode baseline (0: all)")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--loader-batches", type=int, default=2000)
    args = parser.parse_args(argv)
    files = resolve_files(args.files)
    tok = Tokenizer(args.tokenizer)
    cores = os.cpu_count() or 1
    print(f"# {len(files)} files, tokenizer {args.tokenizer} ({tok.vocab_size} pieces), {cores} cores")

    # raw speed drifts by several percent between runs on a shared machine: measured before and after, averaged
    texts = [d.text for f in files for d in iter_documents(f, ReadStats())]  # read once, used by every raw run
    text_bytes = sum(len(t.encode()) for t in texts)
    raw_texts = prefix(texts, args.raw_bytes)
    raw_before = raw_encode_mb_s(raw_texts, tok)
    print(f"raw sentencepiece encode, 1 thread: {raw_before:.2f} MB/s")

    tmp = Path(tempfile.mkdtemp(prefix="bench_data_"))
    prepared_mb_s: dict[int, float] = {}
    try:
        for workers in sorted({1, cores}):
            start = time.perf_counter()
            manifest = prepare(files, args.tokenizer, tmp / f"w{workers}", workers=workers, show_progress=False)
            secs = time.perf_counter() - start
            prepared_mb_s[workers] = text_bytes / secs / 1e6
            print(f"prepare, {workers} worker(s): {text_bytes / 1e6:.0f} MB in {secs:.1f} s")
        raw_after = raw_encode_mb_s(raw_texts, tok)
        raw = (raw_before + raw_after) / 2
        print(f"raw sentencepiece encode, 1 thread, again: {raw_after:.2f} MB/s (mean {raw:.2f})")
        for workers, mb_s in prepared_mb_s.items():
            print(
                f"prepare (read + parse + tokenise + pack + write), {workers} worker(s): {mb_s:.2f} MB/s "
                f"= {mb_s / raw:.2f}x raw encode of one core ({mb_s / raw / workers:.2f}x per worker)"
            )
        corpus = PreparedCorpus(tmp / f"w{cores}")
        tokens = sum(s["tokens"] for s in manifest["sources"].values())
        print(f"prepared {tokens} tokens")
        batches = MemmapBatches(corpus, {}, seq_len=args.seq_len, batch_size=args.batch)
        source = MemmapSource(batches, corpus, num_workers=0)
        it = iter(source)
        next(it)
        start = time.perf_counter()
        for _ in itertools.islice(it, args.loader_batches):
            pass
        secs = time.perf_counter() - start
        rate = args.loader_batches * args.batch * args.seq_len / secs
        print(f"memmap loader, 1 process: {rate / 1e6:.2f} M tokens/s ({args.batch} x {args.seq_len} per batch)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
