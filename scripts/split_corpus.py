"""Split Pile-format shards into a training and a held-out set with every domain on both sides:
``python scripts/split_corpus.py --files corpus/study/*.jsonl.zst --out corpus/study_split --fraction 0.03``.

Some corpora are sharded by source (the study corpus, ``scripts/build_study_corpus.py``, has one shard a domain),
so holding out a whole shard would leave most domains (``meta.pile_set_name``) without held-out text. Here a
document is held out when the hash of its text falls below ``--fraction``, and in each domain at least
``--min-docs`` documents are (the ones with the smallest hashes; a domain of one document stays in training): the
split depends on the text alone, not on file order, and is the same on every machine. Training documents are
written in hash order (domains interleaved). Writes ``train.jsonl.zst``, ``val.jsonl.zst`` and ``manifest.json``
(documents and bytes per domain and split, the sha256 of every input). Records without text are skipped and counted; an
unreadable file is one error line, exit 2. Idempotent: an existing split of the same inputs and settings is
reused.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

import _bootstrap  # noqa: F401  (this checkout first on sys.path)
import zstandard

from data.shards import DataError, resolve_files
from losslab.log import fail

SPLIT_VERSION = 1


def doc_hash(text: str) -> float:
    """A stable number in [0, 1) from the text (first 8 bytes of its sha256)."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") / 2**64


def read_records(path: Path, skipped: Counter) -> list[dict]:
    records = []
    with open(path, "rb") as fh:
        reader = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(fh), encoding="utf-8")
        for line in reader:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                skipped["not JSON"] += 1
                continue
            if not isinstance(record, dict) or not isinstance(record.get("text"), str) or not record["text"]:
                skipped["no text"] += 1
                continue
            records.append(record)
    return records


def domain(record: dict) -> str:
    meta = record.get("meta")
    return str(meta.get("pile_set_name", "unknown")) if isinstance(meta, dict) else "unknown"


def write_zst(path: Path, records: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as fh, zstandard.ZstdCompressor(level=10).stream_writer(fh) as out:
        for record in records:
            out.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
    tmp.replace(path)  # never a half-written file under the final name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", nargs="+", required=True, help="Pile-format .jsonl.zst shards (paths or globs)")
    parser.add_argument("--out", required=True, help="directory for train.jsonl.zst, val.jsonl.zst, manifest.json")
    parser.add_argument("--fraction", type=float, default=0.02, help="share of documents held out")
    parser.add_argument("--min-docs", type=int, default=1, help="held-out documents per domain at least")
    args = parser.parse_args(argv)
    if not 0.0 < args.fraction < 1.0 or args.min_docs < 1:
        return fail("--fraction must be in (0, 1) and --min-docs >= 1")
    try:
        files = resolve_files(args.files)
        inputs = {str(f): hashlib.sha256(Path(f).read_bytes()).hexdigest() for f in files}
    except (DataError, OSError) as e:
        return fail(e)
    out = Path(args.out)
    settings = {"version": SPLIT_VERSION, "fraction": args.fraction, "min_docs": args.min_docs, "inputs": inputs}
    manifest_path = out / "manifest.json"
    if manifest_path.exists() and json.loads(manifest_path.read_text()).get("settings") == settings:
        print(f"{out}: split already made from these inputs")
        return 0

    skipped: Counter = Counter()
    by_domain: dict[str, list[tuple[float, dict]]] = defaultdict(list)
    for f in files:
        try:
            records = read_records(Path(f), skipped)
        except (OSError, zstandard.ZstdError, UnicodeDecodeError) as e:
            return fail(f"{f}: cannot be read as zstd-compressed JSON lines ({e})")
        for record in records:
            by_domain[domain(record)].append((doc_hash(record["text"]), record))
    train, val, stats = [], [], {}
    for name, docs in sorted(by_domain.items()):
        docs.sort(key=lambda hd: hd[0])  # by hash: the held-out ones first
        n_val = min(max(sum(h < args.fraction for h, _ in docs), args.min_docs), len(docs) - 1)
        held, kept = [r for _, r in docs[:n_val]], docs[n_val:]
        val += held
        train += kept
        kept = [r for _, r in kept]
        stats[name] = {
            "train_docs": len(kept),
            "val_docs": len(held),
            "train_bytes": sum(len(r["text"].encode()) for r in kept),
            "val_bytes": sum(len(r["text"].encode()) for r in held),
        }
    # training documents in hash order, not by domain (shards sharded by source would stream one domain at a time)
    train = [r for _, r in sorted(train, key=lambda hd: hd[0])]
    out.mkdir(parents=True, exist_ok=True)
    write_zst(out / "train.jsonl.zst", train)
    write_zst(out / "val.jsonl.zst", val)
    manifest = {"settings": settings, "domains": stats, "skipped": dict(skipped)}
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    for name, st in stats.items():
        print(f"  {name:24s} train {st['train_docs']:5d} docs {st['train_bytes'] / 1e6:7.2f} MB | "
              f"held out {st['val_docs']:4d} docs {st['val_bytes'] / 1e6:6.2f} MB")  # fmt: skip
    print(f"wrote {out}: {len(train)} training and {len(val)} held-out documents; skipped {dict(skipped) or 0}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
