"""Per-token streams carried with prepared data (issue 17): a reference model's losses for Rho-1, written by
``scripts/score_reference.py`` and trained on with exact resume; per-token weights, where weight 0 means no
gradient."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from data.memmap import MemmapBatches, PreparedCorpus
from data.prepare import prepare
from tests.conftest import debug_overrides
from tests.faults import sigterm_at
from tests.test_train import REPO, clean_env

SEQ = 32


def script(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, f"scripts/{name}", *args],
        cwd=REPO, env={**clean_env(), "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def train(overrides: list[str]) -> subprocess.CompletedProcess:
    return script("train.py", "configs/experiments/demo.yaml", *overrides)


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("streams") / "prepared"
    prepare([corpus["train_glob"]], corpus["tokenizer"], out, workers=0, show_progress=False)
    return out


@pytest.fixture(scope="module")
def reference(corpus, prepared, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("streams") / "reference"
    proc = train(debug_overrides(corpus, run_dir, **{"data.prepared": prepared, "train.max_steps": 6}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def scored(prepared, reference, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("streams") / "scored"
    shutil.copytree(prepared, out)
    proc = script("score_reference.py", "--checkpoint", str(reference), "--prepared", str(out), "--seq-len", str(SEQ),
                  "--batch-size", "64")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_reference_losses_are_the_reference_models_own(scored, reference):
    from models.checkpoint import load_model

    model, _ = load_model(reference)
    corpus = PreparedCorpus(scored)
    assert corpus.stream_info("ref_ce")["seq_len"] == SEQ
    tokens = np.fromfile(corpus.tokens_path("all"), dtype=corpus.dtype).astype(np.int64)
    ref = np.fromfile(corpus.source_file("all", "ref_ce.bin"), dtype=np.float32)
    assert ref.shape == tokens.shape
    for w in (0, 7, len(tokens) // (SEQ + 1) - 1):  # windows as training reads them
        window = torch.from_numpy(tokens[w * (SEQ + 1) : (w + 1) * (SEQ + 1)])[None]
        with torch.no_grad():
            logits = model(window[:, :-1]).double() @ model.head.weight.double()[: model.cfg.vocab_size].T
        ce = torch.nn.functional.cross_entropy(logits[0], window[0, 1:], reduction="none")
        assert ref[w * (SEQ + 1)] == 0.0
        assert np.allclose(ref[w * (SEQ + 1) + 1 : (w + 1) * (SEQ + 1)], ce.numpy(), atol=1e-4)


def test_scoring_resumes_where_it_stopped(scored, reference, tmp_path):
    """A scoring stopped halfway (its partial file and progress as it left them) finishes to the same numbers."""
    half = tmp_path / "half"
    shutil.copytree(scored, half)
    final = half / "all" / "ref_ce.bin"
    full = np.fromfile(final, dtype=np.float32)
    windows = len(full) // (SEQ + 1)
    stop = windows // 2
    partial = full.copy()
    partial[stop * (SEQ + 1) :] = 0
    partial.tofile(final.with_name("ref_ce.bin.partial"))
    final.unlink()
    ckpt = json.loads((half / "manifest.json").read_text())["streams"]["ref_ce"]["checkpoint"]
    (half / "all" / "ref_ce.progress.json").write_text(json.dumps({"seq_len": SEQ, "checkpoint": ckpt,
                                                                   "windows_done": stop}))  # fmt: skip
    # rerun the same command, as a user does after an interruption (a fresh process, like the one that scored `full`:
    # the pytest process's thread settings and earlier tests' global state could change a matmul's rounding)
    proc = script("score_reference.py", "--checkpoint", str(reference), "--prepared", str(half), "--seq-len", str(SEQ),
                  "--batch-size", "64")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f" {stop // 64 * 64}/{windows} " in proc.stderr, proc.stderr[-2000:]  # the bar starts where it stopped
    assert np.array_equal(np.fromfile(final, dtype=np.float32), full)


def test_rho1_trains_on_scored_data_and_resumes_exactly(scored, corpus, tmp_path):
    common = {"data.prepared": scored, "loss.name": "rho1", "train.max_steps": 12, "train.log_every": 1}
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    assert train(debug_overrides(corpus, straight, **common)).returncode == 0
    first = train(debug_overrides(corpus, interrupted, **common, **sigterm_at(6)))
    assert first.returncode == 0 and "pre-empted after step 6" in first.stdout, first.stderr[-3000:]
    again = train(debug_overrides(corpus, interrupted, **common, **{"train.resume": "auto"}))
    assert again.returncode == 0, again.stderr[-3000:]

    def losses(d: Path) -> dict[int, float]:
        rows = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in rows if "loss" in r}

    assert losses(interrupted) == losses(straight) and len(losses(straight)) == 12


def test_scored_data_refuses_another_sequence_length(scored, corpus, tmp_path):
    proc = train(debug_overrides(corpus, tmp_path / "run", **{"data.prepared": scored, "loss.name": "rho1",
                                                              "data.seq_len": 16}))  # fmt: skip
    assert proc.returncode == 2 and "seq_len=32" in proc.stderr and "Traceback" not in proc.stderr


def test_weight_zero_tokens_get_no_gradient(prepared, corpus, tmp_path):
    """A weight stream beside the tokens: batches carry it, and a token of weight 0 moves nothing."""
    from data.batch import labels, token_inputs
    from losslab.losses import build_loss
    from losslab.losses.config import LossConfig
    from models import GPT, GPTConfig

    weighted = tmp_path / "weighted"
    shutil.copytree(prepared, weighted)
    corpus_ = PreparedCorpus(weighted)
    n = len(np.fromfile(corpus_.tokens_path("all"), dtype=corpus_.dtype))
    weights = np.random.default_rng(0).choice([0.0, 0.5, 2.0], size=n).astype(np.float32)
    weights.tofile(corpus_.source_file("all", "weight.bin"))
    batch = MemmapBatches(PreparedCorpus(weighted), {}, seq_len=SEQ, batch_size=4)[0]
    assert set(batch) == {"tokens", "weight"}
    model = GPT(GPTConfig(vocab_size=384, n_layers=2, d_model=32, n_heads=4, d_mlp=64, max_seq_len=64)).double()
    hidden = model(batch["tokens"][:, :-1])  # [B, T, d]
    hidden.retain_grad()
    inputs = {k: v.double() for k, v in token_inputs(batch).items()}
    for fused in ("false", "true"):
        hidden.grad = None
        loss_fn = build_loss(LossConfig(name="weighted", fused=fused))
        out = loss_fn(hidden.reshape(-1, 32), model.head.weight, labels(batch).reshape(-1), token_inputs=inputs)
        out.loss.backward(retain_graph=True)
        zero = (batch["weight"][:, 1:] == 0).reshape(hidden.shape[:2])
        assert zero.any() and (hidden.grad[zero] == 0).all() and (hidden.grad[~zero].abs().sum(-1) > 0).all()


def test_online_reference_scoring_equals_the_scored_stream(scored, prepared, reference, corpus, tmp_path):
    """loss.reference scores each micro-batch with the frozen reference: the same run as on scored data."""
    common = {"loss.name": "rho1", "train.max_steps": 6, "train.log_every": 1}
    stored, online = tmp_path / "stored", tmp_path / "online"
    assert train(debug_overrides(corpus, stored, **common, **{"data.prepared": scored})).returncode == 0
    proc = train(debug_overrides(corpus, online, **common, **{"data.prepared": prepared, "loss.reference": reference}))
    assert proc.returncode == 0, proc.stderr[-3000:]

    def losses(d: Path) -> list[float]:
        return [json.loads(x)["loss"] for x in (d / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]

    assert losses(online) == pytest.approx(losses(stored), rel=1e-5) and len(losses(online)) == 6
