"""Training-loop behaviour pinned to what it must be: non-finite steps counted *in a row* (through
scripts/train.py, as a user meets it), a non-finite step that changes nothing under every ZeRO stage and with
optimizer offload, and a checkpoint round trip that gives back the optimizer's moments and the RNG states
exactly."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from models.checkpoint import seal
from tests.conftest import debug_overrides
from tests.faults import nan_at
from tests.test_train import REPO, clean_env
from trainer import loop
from trainer.config import load_config
from trainer.engine import _adam


def run_train(overrides: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "scripts/train.py", "configs/experiments/demo.yaml", *overrides],
        cwd=REPO, env={**clean_env(), "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def nonfinite_overrides(corpus, run_dir: Path, *steps: int) -> list[str]:
    extra = {"train.max_steps": 8, "train.log_every": 4, "train.max_nonfinite_in_a_row": 2,
             **nan_at(*steps), "eval.buckets": False, "checkpoint.at_end": False}  # fmt: skip
    return debug_overrides(corpus, run_dir, **extra)


def test_nonfinite_steps_between_finite_ones_do_not_stop_the_run(corpus, tmp_path):
    """Limit 2 in a row; NaN at steps 3, 5 and 7 is never two in a row (3 and 5 fall in different logging
    intervals, 5 and 7 in the same one): the run completes, with 3 steps skipped."""
    proc = run_train(nonfinite_overrides(corpus, tmp_path / "run", 3, 5, 7))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["step"]: r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())}
    assert rows[4]["skipped_nonfinite_steps"] == 1 and rows[8]["skipped_nonfinite_steps"] == 3
    assert json.loads((tmp_path / "run" / "result.json").read_text())["complete"] is True


def test_two_nonfinite_steps_in_a_row_stop_the_run(corpus, tmp_path):
    proc = run_train(nonfinite_overrides(corpus, tmp_path / "run", 3, 4))
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "not finite for 2 steps in a row (the last at step 4)" in proc.stderr
    assert "Traceback" not in proc.stderr
    result = json.loads((tmp_path / "run" / "result.json").read_text())  # written on this stop too
    assert result["complete"] is False and result["steps"] == 4


def draws() -> tuple:
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def optimizer_state(engine) -> list[dict[str, torch.Tensor]]:
    """Adam's state and master weights of every parameter (ZeRO-1/2: of each flat fp32 partition), in order."""
    adam = _adam(engine)
    out = []
    for group in adam.param_groups:
        for p in group["params"]:
            state = adam.state[p]
            assert {"step", "exp_avg", "exp_avg_sq"} <= set(state)
            out.append({"param": p.detach().clone(), **{k: torch.as_tensor(v).clone() for k, v in state.items()}})
    return out


@pytest.mark.parametrize("stage,portable", [(0, False), (2, False), (2, True)])
def test_checkpoint_round_trip_gives_back_moments_and_rng_states(
    corpus, dist_env, tmp_path, monkeypatch, stage, portable
):
    """Train 3 steps and checkpoint; a run resumed from that checkpoint holds the same Adam moments, step and
    master weights, and its torch / numpy / python RNGs draw what the uninterrupted process draws next. Also on
    the portable path (a ZeRO checkpoint resumed on another number of ranks)."""
    from trainer.run import build_run

    overrides = {"train.max_steps": 3, "train.log_every": 1, "distributed.zero_stage": stage,
                 "train.precision": "fp32", "eval.buckets": False,
                 "checkpoint.portable_optimizer": portable}  # fmt: skip
    cfg = load_config(None, debug_overrides(corpus, tmp_path / "run", **overrides))
    runs = []

    def build_and_use_the_global_rngs(cfg):
        run = build_run(cfg)
        runs.append(run)
        draws()  # as a component with dropout or random masking would: the RNG states move on during training
        return run

    monkeypatch.setattr(loop, "build_run", build_and_use_the_global_rngs)
    result = loop.train(cfg)
    expected_draws = draws()  # what the uninterrupted process draws next
    expected = optimizer_state(runs[0].engine)
    assert all(s["step"].item() == 3 for s in expected)

    torch.manual_seed(99)  # anything but the saved states
    np.random.seed(99)
    random.seed(99)
    if portable:  # as if written by 2 ranks: the layout-free optimizer file is what gets loaded
        meta = json.loads((result.checkpoint / "meta.json").read_text())
        (result.checkpoint / "meta.json").write_text(json.dumps(seal({**meta, "world_size": 2})))
    # one more step than the run had (a run at its last step has nothing to resume); on "2 ranks", the same
    # global batch on one
    resume = {**overrides, "train.resume": str(result.checkpoint), "train.extend_to": 4,
              **({"train.grad_accum": 2} if portable else {})}  # fmt: skip
    resumed = build_run(load_config(None, debug_overrides(corpus, tmp_path / "run", **resume)))
    resumed.preemption.restore()
    assert draws() == expected_draws
    got = optimizer_state(resumed.engine)
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        for key in ("param", "exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(a[key], b[key]), key
        assert b["exp_avg"].abs().sum() > 0 and b["exp_avg_sq"].abs().sum() > 0


@pytest.mark.parametrize(
    "stage,offload", [(0, False), (2, False), (3, False), pytest.param(3, True, marks=pytest.mark.cpu_adam)]
)
def test_a_nonfinite_step_changes_no_weight_and_no_optimizer_state(
    corpus, dist_env, tmp_path, monkeypatch, stage, offload
):
    """Under every ZeRO stage, and with the optimizer offloaded to the CPU (DeepSpeedCPUAdam): the NaN step 2
    leaves the weights exactly as step 1 wrote them and does not count as an Adam step; step 3 trains on. The LR
    schedule advances over it or not as the README says."""
    from safetensors.torch import load_file

    from trainer.run import build_run

    overrides = {"train.max_steps": 3, "train.log_every": 1, "distributed.zero_stage": stage,
                 "train.precision": "fp32", "eval.buckets": False, **nan_at(2),
                 "checkpoint.every": 1, "checkpoint.keep": 0, "distributed.offload_optimizer": offload}  # fmt: skip
    runs = []
    monkeypatch.setattr(loop, "build_run", lambda cfg: runs.append(build_run(cfg)) or runs[-1])
    result = loop.train(load_config(None, debug_overrides(corpus, tmp_path / "run", **overrides)))
    weights = [
        load_file(str(result.run_dir / "checkpoints" / f"step_{s:07d}" / "model.safetensors")) for s in (1, 2, 3)
    ]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])  # the NaN step changed nothing
    assert all(t.isfinite().all() for t in weights[2].values())
    assert any(not torch.equal(weights[1][k], weights[2][k]) for k in weights[1])  # the next step trained
    rows = {r["step"]: r for r in map(json.loads, (result.run_dir / "metrics.jsonl").read_text().splitlines())}
    assert [rows[s]["skipped_nonfinite_steps"] for s in (1, 2, 3)] == [0, 1, 1]
    lr = [rows[s]["lr"] for s in (1, 2, 3)]  # warm-up: the rate rises each step the schedule advances
    if stage == 0:
        assert lr[0] < lr[1] < lr[2]  # skipped on the device (found_inf): the LR schedule still advanced
    else:
        assert lr[0] == lr[1] < lr[2]  # skipped by DeepSpeed's overflow check: the schedule waited
    adam = _adam(runs[0].engine)
    steps = {int(torch.as_tensor(s["step"]).item()) for s in adam.state.values()}
    assert steps == {2}, steps  # three steps, one skipped


def test_grad_norm_is_logged_without_clipping(corpus, dist_env, tmp_path):
    overrides = {"train.max_steps": 1, "train.log_every": 1, "train.grad_clip": 0.0, "train.precision": "fp32",
                 "distributed.zero_stage": 0, "eval.buckets": False, "checkpoint.at_end": False}  # fmt: skip
    result = loop.train(load_config(None, debug_overrides(corpus, tmp_path / "run", **overrides)))
    row = json.loads((result.run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert row["grad_norm"] > 0


@pytest.mark.parametrize("log_entropy", [False, True])
def test_the_entropy_is_logged_only_when_computed(corpus, dist_env, tmp_path, log_entropy):
    """CE does not read the entropy: the fused path skips it and metrics.jsonl has no entropy column, rather than
    a zero that reads like a measurement, unless loss.log_entropy asks for it (issue #18)."""
    overrides = {"train.max_steps": 2, "train.log_every": 1, "train.precision": "fp32", "loss.name": "ce",
                 "loss.log_entropy": log_entropy, "distributed.zero_stage": 0, "eval.buckets": False,
                 "checkpoint.at_end": False}  # fmt: skip
    result = loop.train(load_config(None, debug_overrides(corpus, tmp_path / "run", **overrides)))
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    assert len(rows) == 2 and all(("entropy" in r) == log_entropy for r in rows)
    if log_entropy:  # a near-uniform debug model over the vocabulary: the entropy is close to log V
        assert all(0 < r["entropy"] <= math.log(result.model.cfg.vocab_size) + 1e-3 for r in rows)
