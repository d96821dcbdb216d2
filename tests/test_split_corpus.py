"""scripts/split_corpus.py, run as a user runs it, on shards sharded by source (the shape of the study corpus)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import zstandard

REPO = Path(__file__).resolve().parents[1]


def write_shard(path: Path, records: list[dict]) -> None:
    with open(path, "wb") as fh, zstandard.ZstdCompressor().stream_writer(fh) as out:
        for r in records:
            out.write((json.dumps(r) + "\n").encode())


def read_shard(path: Path) -> list[dict]:
    with open(path, "rb") as fh:
        return [json.loads(line) for line in io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(fh))]


def split(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "scripts/split_corpus.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def doc(domain: str, i: int) -> dict:
    return {"text": f"{domain} document number {i}: " + "words " * (i % 7 + 1), "meta": {"pile_set_name": domain}}


def test_every_domain_is_held_out_from_and_the_split_is_stable(tmp_path):
    # one shard per source, as the study corpus: holding out a shard would hold out one domain only
    write_shard(tmp_path / "a.jsonl.zst", [doc("alpha", i) for i in range(200)] + [{"text": ""}, {"meta": {}}])
    write_shard(tmp_path / "b.jsonl.zst", [doc("beta", i) for i in range(30)])
    write_shard(tmp_path / "c.jsonl.zst", [doc("gamma", 0)])  # one document: it stays in training
    out = tmp_path / "split"
    proc = split("--files", str(tmp_path / "*.jsonl.zst"), "--out", str(out), "--fraction", "0.05")
    assert proc.returncode == 0, proc.stderr
    train, val = read_shard(out / "train.jsonl.zst"), read_shard(out / "val.jsonl.zst")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["skipped"] == {"no text": 2}
    val_domains = {r["meta"]["pile_set_name"] for r in val}
    assert val_domains == {"alpha", "beta"} and manifest["domains"]["gamma"]["val_docs"] == 0
    assert 3 <= sum(r["meta"]["pile_set_name"] == "alpha" for r in val) <= 25  # ~5% of 200
    texts = [r["text"] for r in train + val]
    assert len(texts) == len(set(texts)) == 231  # nothing lost, nothing twice
    # training documents interleave the domains (hash order), not one shard after the other
    first = [r["meta"]["pile_set_name"] for r in train[:40]]
    assert {"alpha", "beta"} <= set(first)
    # the same inputs in another order give the same split; a second call reuses it
    proc = split("--files", str(tmp_path / "c.jsonl.zst"), str(tmp_path / "b.jsonl.zst"), str(tmp_path / "a.jsonl.zst"),
                 "--out", str(tmp_path / "again"), "--fraction", "0.05")  # fmt: skip
    assert proc.returncode == 0
    assert read_shard(tmp_path / "again/val.jsonl.zst") == val
    proc = split("--files", str(tmp_path / "*.jsonl.zst"), "--out", str(out), "--fraction", "0.05")
    assert proc.returncode == 0 and "already made" in proc.stdout


def test_an_unreadable_shard_is_one_line_and_exit_2(tmp_path):
    (tmp_path / "bad.jsonl.zst").write_bytes(b"not zstd at all")
    proc = split("--files", str(tmp_path / "bad.jsonl.zst"), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "bad.jsonl.zst" in lines[0] and "Traceback" not in proc.stderr
