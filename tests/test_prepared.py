"""Prepared (memory-mapped) data: lossless, idempotent, mixed by weight, disjoint across ranks, resumable."""

from __future__ import annotations

import itertools
import json
from collections import Counter

import numpy as np
import pytest
import torch

from data.config import DataConfig
from data.memmap import MemmapBatches, MemmapSource, PreparedCorpus
from data.prepare import prepare
from data.shards import DataError, write_shard
from data.source import build_source
from data.tokenizer import Tokenizer, train_tokenizer
from tests.conftest import debug_overrides
from tests.corpus import documents
from trainer.config import load_config
from trainer.loop import train


@pytest.fixture(scope="module")
def mixed_shards(tmp_path_factory, corpus):
    """Three sources of different sizes, interleaved across two shards, plus a few bad lines."""
    root = tmp_path_factory.mktemp("mixed")
    docs = documents(150, seed=5)
    for i, d in enumerate(docs):
        d["meta"] = {"pile_set_name": ["Alpha", "Beta", "Gamma Set"][i % 3]}
    write_shard(str(root / "s0.jsonl.zst"), [*docs[:80], {"text": ""}, {"no_text": 1}])
    write_shard(str(root / "s1.jsonl.zst"), docs[80:])
    return {"glob": str(root / "s*.jsonl.zst"), "docs": docs, "root": root}


@pytest.fixture(scope="module")
def prepared(mixed_shards, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("prep") / "by_source"
    manifest = prepare([mixed_shards["glob"]], corpus["tokenizer"], out, by_source=True, workers=2, show_progress=False)
    return out, manifest


def test_prepared_tokens_are_the_documents_plus_eos(prepared, mixed_shards, corpus):
    out, manifest = prepared
    tok = Tokenizer(corpus["tokenizer"])
    corp = PreparedCorpus(out)
    all_tokens = []
    for name in ("Alpha", "Beta", "Gamma Set"):
        expected = [
            t
            for d in mixed_shards["docs"]
            if d["meta"]["pile_set_name"] == name
            for t in (*tok.encode(d["text"]), tok.eos_id)
        ]
        got = np.memmap(corp.tokens_path(name), dtype=corp.dtype, mode="r")
        assert got.tolist() == expected
        offsets = np.load(out / corp.sources[name]["dir"] / "doc_offsets.npy")
        assert offsets[-1] == len(expected) and (got[offsets[1:] - 1] == tok.eos_id).all()
        all_tokens.extend(expected)
    assert torch.equal(corp.token_counts(), torch.bincount(torch.tensor(all_tokens), minlength=tok.vocab_size))
    assert manifest["read_stats"]["empty"] == 1 and manifest["read_stats"]["missing_text"] == 1
    assert manifest["sources"]["Gamma Set"]["dir"] == "Gamma_Set"


def test_prepare_is_idempotent_and_worker_count_independent(prepared, mixed_shards, corpus, tmp_path):
    out, manifest = prepared
    before = (out / "manifest.json").stat().st_mtime_ns
    again = prepare([mixed_shards["glob"]], corpus["tokenizer"], out, by_source=True, workers=1, show_progress=False)
    assert again == manifest and (out / "manifest.json").stat().st_mtime_ns == before  # reused, not rewritten
    inline = prepare(
        [mixed_shards["glob"]], corpus["tokenizer"], tmp_path / "inline", by_source=True, workers=0, show_progress=False
    )
    assert inline["sources"] == manifest["sources"]
    for name in manifest["sources"]:
        d = manifest["sources"][name]["dir"]
        assert (tmp_path / "inline" / d / "tokens.bin").read_bytes() == (out / d / "tokens.bin").read_bytes()
    assert not list(out.parent.glob(".*tmp*"))  # no temporary directory left behind


def test_mixing_weights_within_two_percent(prepared):
    out, _ = prepared
    weights = {"Alpha": 0.6, "Beta": 0.3, "Gamma Set": 0.1}
    batches = MemmapBatches(PreparedCorpus(out), weights, seq_len=8, batch_size=10)
    sources, _ = batches.mixture.locate(np.arange(10_000))
    share = np.bincount(sources, minlength=3) / 10_000
    for name, s in zip(batches.names, share, strict=True):
        assert abs(s - weights[name]) < 0.02 * weights[name], (name, s)
    # and the rows really are the located sources' windows
    corp = PreparedCorpus(out)
    maps = {n: np.memmap(corp.tokens_path(n), dtype=corp.dtype, mode="r") for n in batches.names}
    for row, s in zip(batches[0].numpy(), sources[:10], strict=True):
        stream = maps[batches.names[s]]
        windows = np.lib.stride_tricks.sliding_window_view(stream[: len(stream) // 9 * 9], 9)[::9]
        assert (windows == row).all(axis=1).any()


def test_one_epoch_reads_every_window_once(prepared):
    out, _ = prepared
    batches = MemmapBatches(PreparedCorpus(out), {"Beta": 1.0}, seq_len=15, batch_size=1)
    n = batches.num_windows[0]
    rows = torch.cat([batches[k] for k in range(n)])  # one epoch
    stream = np.memmap(PreparedCorpus(out).tokens_path("Beta"), dtype=np.uint16, mode="r")
    expected = torch.from_numpy(stream[: n * 16].astype(np.int64)).view(n, 16)
    assert Counter(map(tuple, rows.tolist())) == Counter(map(tuple, expected.tolist()))
    assert not torch.equal(rows, expected)  # shuffled
    next_epoch = torch.cat([batches[k] for k in range(n, 2 * n)])
    assert Counter(map(tuple, next_epoch.tolist())) == Counter(map(tuple, expected.tolist()))
    assert not torch.equal(next_epoch, rows)  # a new order each epoch


def test_ranks_disjoint_and_resume_across_worker_counts(prepared):
    out, _ = prepared
    corp = PreparedCorpus(out)

    def source(rank=0, world=1, workers=0, batch=4):
        return MemmapSource(
            MemmapBatches(corp, {}, seq_len=16, batch_size=batch, rank=rank, world_size=world, seed=1), corp, workers
        )

    single = list(itertools.islice(iter(source(batch=2)), 12))
    r0 = list(itertools.islice(iter(source(0, 2, batch=1)), 12))
    r1 = list(itertools.islice(iter(source(1, 2, batch=1)), 12))
    for k in range(12):  # global batch k = rank 0's rows then rank 1's rows
        assert torch.equal(torch.cat([r0[k], r1[k]]), single[k])

    full = list(itertools.islice(iter(source()), 12))
    first = source(workers=0)
    it = iter(first)
    head = [next(it) for _ in range(5)]
    state = first.state_dict()
    resumed = source(workers=2)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    tail = list(itertools.islice(iter(resumed), 7))
    for a, b in zip(head + tail, full, strict=True):
        assert torch.equal(a, b)


def test_unknown_source_and_wrong_tokenizer_are_clear_errors(prepared, tmp_path):
    out, _ = prepared
    with pytest.raises(DataError, match=r"unknown sources \['Delta'\]; available"):
        MemmapBatches(PreparedCorpus(out), {"Delta": 1.0}, seq_len=8, batch_size=2)
    with pytest.raises(DataError, match="no prepared data"):
        PreparedCorpus(tmp_path / "nothing")
    other = train_tokenizer((d["text"] for d in documents(50, seed=9)), str(tmp_path / "other"), vocab_size=300)
    cfg = DataConfig(prepared=str(out), tokenizer=other)
    with pytest.raises(DataError, match="not the tokenizer"):
        build_source(cfg, Tokenizer(other), batch_size=2, seed=0, rank=0, world_size=1)
    with pytest.raises(DataError, match=r"data\.mix needs data\.prepared"):
        build_source(DataConfig(mix={"A": 1.0}), Tokenizer(other), batch_size=2, seed=0, rank=0, world_size=1)


def test_training_on_prepared_data_with_pdl(prepared, corpus, dist_env, tmp_path):
    out, _ = prepared
    overrides = debug_overrides(
        corpus,
        tmp_path / "run",
        **{"data.prepared": str(out), "loss.name": "pdl", "train.max_steps": 12, "data.num_workers": 1},
    )
    result = train(load_config(None, overrides))
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert np.isfinite(result.final_loss) and rows[-1]["step"] == 12
    assert json.loads((result.checkpoint / "meta.json").read_text())["data_state"]["samples_consumed"] == 12 * 8
