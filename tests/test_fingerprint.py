"""The data's fingerprint (data/fingerprint.py): what a resumed run compares to tell changed data from the same."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from data.config import DataConfig
from data.fingerprint import BLOCKS, EDGE, differences, fingerprint, prepared_files
from data.prepare import prepare


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fingerprint") / "prepared"
    prepare([corpus["train_glob"]], corpus["tokenizer"], out, workers=0, show_progress=False)
    return out


def same_size_change(path: Path, at: int) -> None:
    """One byte changed in place, the size and the modification time put back: only the content differs."""
    st = path.stat()
    with open(path, "r+b") as fh:
        fh.seek(at)
        byte = fh.read(1)
        fh.seek(at)
        fh.write(bytes([byte[0] ^ 1]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_prepared_data_are_hashed_whole(prepared, tmp_path):
    copy = tmp_path / "prepared"
    shutil.copytree(prepared, copy)
    cfg = DataConfig(prepared=str(copy))
    names = {p.name for p in prepared_files(copy)}
    assert {"manifest.json", "token_counts.npy", "tokens.bin", "doc_offsets.npy"} <= names
    before = fingerprint(cfg, [])
    assert all(r["hashed"] == "whole" for r in before["files"])
    tokens = next(p for p in prepared_files(copy) if p.name == "tokens.bin")
    same_size_change(tokens, tokens.stat().st_size // 2 + 3)  # a byte no sample of a streamed file would read
    found = differences(before, fingerprint(cfg, []))
    assert len(found) == 1 and found[0].startswith(f"{tokens}: its content changed, same size"), found


def test_streamed_files_are_sampled_and_a_touch_or_a_move_is_no_change(corpus, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(corpus["dir"], data, ignore=shutil.ignore_patterns("tok*"))
    shards = sorted(str(p) for p in data.glob("train_*.jsonl.zst"))
    cfg = DataConfig(train_files=shards)
    before = fingerprint(cfg, shards)
    assert [r["path"] for r in before["files"]] == shards and {r["hashed"] for r in before["files"]} == {"sampled"}
    os.utime(shards[0])  # touched: a new modification time, the same bytes
    assert differences(before, fingerprint(cfg, shards)) == []
    moved = tmp_path / "moved"
    shutil.copytree(data, moved)  # the data copied to another file system: other paths, the same bytes
    elsewhere = sorted(str(p) for p in moved.glob("train_*.jsonl.zst"))
    assert differences(before, fingerprint(DataConfig(train_files=elsewhere), elsewhere)) == []
    same_size_change(Path(shards[1]), Path(shards[1]).stat().st_size - 10)  # in the tail
    found = differences(before, fingerprint(cfg, shards))
    assert len(found) == 1 and found[0].startswith(f"{shards[1]}: its content changed, same size"), found
    Path(shards[0]).write_bytes(Path(shards[0]).read_bytes()[:-100])  # truncated
    found = differences(before, fingerprint(cfg, shards))
    assert found[0].startswith(f"{shards[0]}: ") and "bytes, " in found[0] and len(found) == 2
    assert differences(before, fingerprint(cfg, shards[:1]))[-1] == f"{shards[1]}: no longer among the data files"


def test_a_large_streamed_file_is_sampled_through_its_middle(tmp_path):
    """A few MiB read whatever the size: the head, the tail, and 16 blocks spread between them."""
    big = tmp_path / "big.jsonl"
    big.write_bytes(os.urandom(8 * EDGE))
    shard = [str(big)]
    before = fingerprint(DataConfig(), shard)
    step = (8 * EDGE - 2 * EDGE) // (BLOCKS + 1)
    same_size_change(big, EDGE + 8 * step)  # the middle of the 8th block
    found = differences(before, fingerprint(DataConfig(), shard))
    assert len(found) == 1 and found[0].startswith(f"{big}: its content changed, same size"), found
