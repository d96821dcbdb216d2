"""The mixture a run gets, said before training: a data.mix domain missing from the data stops the run before
the model is built (or is renormalised away when asked), and the run saves the mixture it trained with."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data.config import DataConfig
from data.memmap import MemmapBatches, PreparedCorpus
from data.mixture import describe, effective_mix
from data.prepare import prepare
from data.shards import DataError, write_shard
from tests.conftest import debug_overrides
from tests.corpus import documents
from trainer.config import load_config
from trainer.loop import train

REPO = Path(__file__).resolve().parents[1]
MIX = "{Alpha: 0.6, Beta: 0.3, Delta: 0.1}"  # Delta is not in the data


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, corpus) -> Path:
    root = tmp_path_factory.mktemp("mixture")
    docs = documents(120, seed=8)
    for i, d in enumerate(docs):
        d["meta"] = {"pile_set_name": ["Alpha", "Beta", "Gamma"][i % 3]}
    write_shard(str(root / "s.jsonl.zst"), docs)
    prepare([str(root / "s.jsonl.zst")], corpus["tokenizer"], root / "prep", by_source=True, workers=0,
            show_progress=False)  # fmt: skip
    return root / "prep"


def overrides(corpus, prepared: Path, run_dir: Path, **extra) -> list[str]:
    return debug_overrides(corpus, run_dir, **{"data.prepared": str(prepared), "data.train_files": "[]",
                                               "data.mix": MIX, "train.max_steps": 2, **extra})  # fmt: skip


def test_a_mix_naming_a_missing_domain_fails_before_the_model_is_built(corpus, prepared, tmp_path):
    run_dir = tmp_path / "run"
    for cmd in (
        ["scripts/train.py", "configs/experiments/demo.yaml"],
        ["scripts/check_data.py", "configs/experiments/demo.yaml"],
    ):
        proc = subprocess.run([sys.executable, *cmd, *overrides(corpus, prepared, run_dir)], cwd=REPO,
                              capture_output=True, text=True, timeout=300)  # fmt: skip
        assert proc.returncode == 2, proc.stderr[-3000:]
        errors = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
        assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert "['Delta']" in errors[0] and "data.mix_missing=renormalise" in errors[0]
        assert not run_dir.exists()  # stopped before the run directory, let alone the model, was made


def test_renormalise_drops_the_missing_domain_and_saves_the_mixture(corpus, prepared, dist_env, tmp_path):
    run_dir = tmp_path / "run"
    train(load_config(None, overrides(corpus, prepared, run_dir, **{"data.mix_missing": "renormalise"})))
    saved = json.loads((run_dir / "mixture.json").read_text())
    weights = {d["name"]: d["weight"] for d in saved["domains"]}
    assert math.isclose(sum(weights.values()), 1.0, abs_tol=1e-12)
    assert weights == pytest.approx({"Alpha": 2 / 3, "Beta": 1 / 3, "Gamma": 0.0}, abs=1e-12)
    assert saved["missing"] == {"Delta": 0.1} and saved["planned_tokens"] == 2 * 8 * 32
    corpus_tokens = PreparedCorpus(prepared).sources
    assert {d["name"]: d["tokens"] for d in saved["domains"]} == {k: v["tokens"] for k, v in corpus_tokens.items()}
    assert json.loads((run_dir / "run_info.json").read_text())["mixture"] == saved
    # and the sampler really draws those shares
    mix = effective_mix({"Alpha": 0.6, "Beta": 0.3, "Delta": 0.1}, corpus_tokens, "renormalise", "test")
    batches = MemmapBatches(PreparedCorpus(prepared), mix, seq_len=8, batch_size=1)
    sources, _ = batches.mixture.locate(np.arange(10_000))
    drawn = dict(zip(batches.names, np.bincount(sources) / 10_000, strict=True))
    assert drawn == pytest.approx({k: v for k, v in weights.items() if v}, abs=1e-4)


def test_check_data_prints_the_mixture(corpus, prepared, tmp_path):
    args = overrides(corpus, prepared, tmp_path / "run", **{"data.mix_missing": "renormalise", "train.max_steps": 500})
    proc = subprocess.run([sys.executable, "-m", "losslab", "check-data", "configs/experiments/demo.yaml", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "renormalised over the domains present" in proc.stdout and "Delta 0.1000" in proc.stdout
    assert "in the data but given no weight (not in data.mix): Gamma" in proc.stdout
    assert "more than once" in proc.stdout  # 500 steps of 256 tokens go over this small corpus many times
    assert not (tmp_path / "run").exists()


def test_streamed_data_reports_its_natural_proportions(corpus):
    report = describe(DataConfig(train_files=[corpus["train_glob"]], tokenizer=corpus["tokenizer"]))
    shares = {d.name: d.weight for d in report.domains}
    assert set(shares) == {"Plays", "Poems"} and math.isclose(sum(shares.values()), 1.0)
    assert all(0.3 < s < 0.7 for s in shares.values())  # the test corpus alternates the two
    assert "streamed: natural proportions" in report.render()


def test_effective_mix_errors():
    with pytest.raises(DataError, match=r"does not hold: \['B'\]"):
        effective_mix({"A": 1.0, "B": 1.0}, {"A": 10}, "error", "x")
    with pytest.raises(DataError, match="no weight"):
        effective_mix({"B": 1.0}, {"A": 10}, "renormalise", "x")
    assert effective_mix({}, {"A": 10}, "error", "x") == {}
