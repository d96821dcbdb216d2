from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
import zstandard

from data.packing import pack
from data.shards import DataError, ReadStats, iter_documents, resolve_files, write_shard
from data.stream import PackedStream
from data.tokenizer import Tokenizer


def test_bad_lines_are_skipped_and_counted(tmp_path: Path):
    good = [{"text": f"good document {i}", "meta": {"pile_set_name": "X"}} for i in range(5)]
    lines = [
        json.dumps(good[0]).encode(),
        b"{not json",
        json.dumps({"meta": {}}).encode(),  # no text
        json.dumps({"text": 42}).encode(),  # text of the wrong type
        json.dumps(good[1]).encode(),
        b'{"text": "caf\xe9"}',  # latin-1 byte: not UTF-8
        json.dumps({"text": "   "}).encode(),  # empty
        json.dumps(good[2]).encode(),
        b"[1, 2]",  # JSON but not an object
        b"",
        json.dumps(good[3]).encode(),
        json.dumps(good[4]).encode(),
    ]
    path = tmp_path / "bad.jsonl.zst"
    path.write_bytes(zstandard.ZstdCompressor().compress(b"\n".join(lines) + b"\n"))
    stats = ReadStats()
    docs = list(iter_documents(str(path), stats))
    assert [d.text for d in docs] == [g["text"] for g in good]
    assert docs[0].source == "X"
    assert (stats.documents, stats.bad_json, stats.missing_text, stats.bad_utf8, stats.empty) == (5, 1, 3, 1, 1)


def test_truncated_shard_is_reported_and_rest_of_corpus_used(tmp_path: Path):
    docs = [{"text": f"document {i} " * 40} for i in range(3000)]
    whole = tmp_path / "a.jsonl.zst"
    write_shard(str(whole), docs)
    cut = tmp_path / "b.jsonl.zst"
    data = whole.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    stats = ReadStats()
    read_cut = [d.text for d in iter_documents(str(cut), stats)]
    read_whole = [d.text for d in iter_documents(str(whole), stats)]
    assert stats.corrupt_files == 1
    assert stats.bad_json == 0  # the partial line at the cut is not parsed as a document
    assert read_cut == [d["text"] for d in docs[: len(read_cut)]]
    assert read_whole == [d["text"] for d in docs]


def test_missing_files_fail_clearly(tmp_path: Path):
    with pytest.raises(DataError, match="not found"):
        resolve_files([str(tmp_path / "nothing_*.jsonl.zst")])
    with pytest.raises(DataError, match="tokenizer"):
        Tokenizer(str(tmp_path / "missing.model"))


def test_packing_is_lossless():
    docs = [list(range(i, i + n)) for i, n in enumerate([5, 1, 17, 3, 30, 2])]
    windows = list(pack(docs, window=7, eos_id=-1))
    stream = [t for d in docs for t in (*d, -1)]
    flat = torch.cat(windows).tolist()
    assert all(len(w) == 7 for w in windows)
    assert flat == stream[: len(flat)] and len(stream) - len(flat) < 7


def make_stream(corpus, **kw) -> PackedStream:
    args = dict(seq_len=16, batch_size=4, seed=3, shuffle_buffer=8)
    args.update(kw)
    return PackedStream([corpus["train_glob"]], Tokenizer(corpus["tokenizer"]), **args)


def test_ranks_see_disjoint_data_covering_the_stream(corpus):
    single = list(itertools.islice(iter(make_stream(corpus, batch_size=2)), 20))  # 40 windows
    r0 = list(itertools.islice(iter(make_stream(corpus, batch_size=2, rank=0, world_size=2)), 10))
    r1 = list(itertools.islice(iter(make_stream(corpus, batch_size=2, rank=1, world_size=2)), 10))
    all_single = torch.cat(single)  # [40, 17]
    rows0, rows1 = torch.cat(r0), torch.cat(r1)
    assert torch.equal(rows0, all_single[0::2]) and torch.equal(rows1, all_single[1::2])
    seen = {tuple(r.tolist()) for r in torch.cat([rows0, rows1])}
    assert seen == {tuple(r.tolist()) for r in all_single}


def test_resume_continues_with_exactly_the_next_batch(corpus):
    full = list(itertools.islice(iter(make_stream(corpus)), 12))
    first = make_stream(corpus)
    it = iter(first)
    head = [next(it) for _ in range(5)]
    state = first.state_dict()
    resumed = make_stream(corpus)
    resumed.load_state_dict(state)
    tail = list(itertools.islice(iter(resumed), 7))
    for a, b in zip(head + tail, full, strict=True):
        assert torch.equal(a, b)


def test_stream_is_infinite_over_epochs(corpus):
    tokenizer = Tokenizer(corpus["tokenizer"])
    stream = make_stream(corpus, seq_len=255, batch_size=8)
    epoch_tokens = sum(len(ids) + 1 for ids in stream._documents(0))
    num_batches = epoch_tokens // (256 * 8) + 3  # more than one epoch's worth
    batches = list(itertools.islice(iter(stream), num_batches))
    assert len(batches) == num_batches and all(b.shape == (8, 256) for b in batches)
    # counted by this pass from zero: the 240 documents of the first epoch, then some of them again
    assert 240 < stream.stats.documents < 2 * 240
    assert tokenizer.eos_id in torch.cat(batches)


def test_empty_corpus_fails_before_training(tmp_path: Path, corpus):
    path = tmp_path / "empty.jsonl.zst"
    write_shard(str(path), [{"text": ""}, {"nope": 1}])
    stream = PackedStream([str(path)], Tokenizer(corpus["tokenizer"]), seq_len=16, batch_size=2)
    with pytest.raises(DataError, match="no window"):
        next(iter(stream))


def test_token_counts_are_the_packed_streams_frequencies(corpus):
    """count_tokens over the whole corpus (a budget larger than it) counts exactly what packing feeds the
    model: every document's tokens plus one EOS each — PDL's weights and the eval's buckets rest on it."""
    from data.counts import count_tokens

    tok = Tokenizer(corpus["tokenizer"])
    files = resolve_files([corpus["train_glob"]])
    counts = count_tokens(files, tok, byte_budget=10**9)
    stream = [t for path in files for d in iter_documents(path, ReadStats()) for t in (*tok.encode(d.text), tok.eos_id)]
    assert torch.equal(counts, torch.bincount(torch.tensor(stream), minlength=tok.vocab_size))
    # and a budget stops early, at whole documents
    assert 0 < count_tokens(files, tok, byte_budget=2000).sum() < counts.sum()
