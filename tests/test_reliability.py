"""Exact resume, crash-safe checkpoints, guarded numerics and clear errors — driven through scripts/train.py."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import debug_overrides, relist
from tests.faults import kill_in_checkpoint_at, nan_at, sigterm_at
from tests.test_train import REPO, clean_env


def run_train(overrides: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "scripts/train.py", "configs/experiments/demo.yaml", *overrides],
        cwd=REPO, env={**clean_env(), "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def final_weights(run_dir: Path):
    return load_file(str(run_dir / "checkpoints" / "step_0000040" / "model.safetensors"))


@pytest.fixture(scope="module")
def run_a(corpus, tmp_path_factory):
    """40 uninterrupted steps, the reference for every resumed run."""
    run_dir = tmp_path_factory.mktemp("reliability") / "A"
    proc = run_train(debug_overrides(corpus, run_dir, **{"train.max_steps": 40, "train.log_every": 1}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def test_sigterm_then_resume_is_bit_exact(run_a, corpus, tmp_path):
    run_dir = tmp_path / "B"
    common = {"train.max_steps": 40, "train.log_every": 1, "wandb.mode": "offline"}
    first = run_train(debug_overrides(corpus, run_dir, **common, **sigterm_at(20)))
    assert first.returncode == 0, first.stderr[-3000:]
    assert "pre-empted after step 20" in first.stdout and "SIGTERM" in first.stderr
    assert max(losses(run_dir)) == 20
    second = run_train(debug_overrides(corpus, run_dir, **common, **{"train.resume": "auto"}))
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout
    assert losses(run_dir) == losses(run_a)  # every step, exactly
    run_id = (run_dir / "wandb_id").read_text()
    offline_runs = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 2 and all(name.endswith(run_id) for name in offline_runs)  # one W&B run, continued
    a, b = final_weights(run_a), final_weights(run_dir)
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_sigkill_while_checkpointing_leaves_previous_checkpoint_usable(run_a, corpus, tmp_path):
    run_dir = tmp_path / "C"
    common = {"train.max_steps": 40, "train.log_every": 1, "checkpoint.every": 10, "checkpoint.keep": 3}
    killed = run_train(debug_overrides(corpus, run_dir, **common, **kill_in_checkpoint_at(20)))
    assert killed.returncode == -9
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_0000010"
    assert not (ckpts / "step_0000020").exists() and (ckpts / ".tmp-step_0000020").exists()
    resumed = run_train(debug_overrides(corpus, run_dir, **common, **{"train.resume": "auto"}))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "step_0000010" in resumed.stdout
    assert losses(run_dir) == losses(run_a)
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_0000020", "step_0000030", "step_0000040"]


def test_nan_step_is_skipped_and_reported(corpus, tmp_path):
    run_dir = tmp_path / "nan"
    proc = run_train(debug_overrides(corpus, run_dir, **{"train.max_steps": 12, "train.log_every": 1}, **nan_at(5)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "non-finite loss at step 5" in proc.stderr
    rows = {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r}
    assert rows[4]["skipped_nonfinite_steps"] == 0 and rows[5]["skipped_nonfinite_steps"] == 1
    assert math.isnan(rows[5]["loss"]) and math.isfinite(rows[12]["loss"]) and rows[12]["skipped_nonfinite_steps"] == 1
    weights = load_file(str(run_dir / "checkpoints" / "step_0000012" / "model.safetensors"))
    assert all(t.isfinite().all() for t in weights.values())  # the NaN never reached the parameters


def test_nonfinite_steps_in_a_row_stop_the_run(corpus, tmp_path):
    overrides = debug_overrides(
        corpus, tmp_path / "stop", **{"train.max_steps": 12, "train.max_nonfinite_in_a_row": 1}, **nan_at(5)
    )
    proc = run_train(overrides)
    assert proc.returncode == 3
    assert "not finite for 1 steps in a row (the last at step 5)" in proc.stderr


@pytest.mark.parametrize(
    "extra,message",
    [
        ({"train.lr": "fast"}, "train.lr"),
        ({"loss.name": "mile2"}, "loss.name='mile2' is not valid; choose one of ['ce', 'dft', 'focal', 'focal_lin'"),
        ({"train.global_batch_size": 12}, "train.global_batch_size=12 is not a multiple of train.micro_batch_size (8)"),
        (
            {"data.train_files": "[/nonexistent/shard_*.jsonl.zst]"},
            "data file not found: '/nonexistent/shard_*.jsonl.zst'",
        ),
        ({"data.tokenizer": "/nonexistent/tok.model"}, "tokenizer model not found: '/nonexistent/tok.model'"),
        ({"train.resume": "/nonexistent/ckpt"}, "train.resume='/nonexistent/ckpt'"),
    ],
)
def test_config_errors_are_clear_and_early(corpus, tmp_path, extra, message):
    proc = run_train(debug_overrides(corpus, tmp_path / "bad", **extra), timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


class _Evil:
    """Unpickling this runs code: a tampered checkpoint must never be able to."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_tampered_checkpoint_is_refused_without_running_code(run_a, corpus, tmp_path):
    import shutil

    import torch

    run_dir = tmp_path / "tampered"
    shutil.copytree(run_a, run_dir)
    states = run_dir / "checkpoints" / "step_0000040" / "mp_rank_00_model_states.pt"
    payload = torch.load(states, weights_only=False)  # test-only: we wrote this file ourselves
    marker = tmp_path / "pwned"
    payload["evil"] = _Evil(str(marker))
    torch.save(payload, states)
    relist(states)  # whoever tampers with a file can make the checkpoint's file list and checksums agree
    proc = run_train(debug_overrides(corpus, run_dir, **{"train.extend_to": 41, "train.resume": "auto"}))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "refusing to load" in proc.stderr and "open'" in proc.stderr  # names the global it references (io.open)
    assert "weights_only" not in proc.stderr and "Traceback" not in proc.stderr
    assert not marker.exists()


@pytest.mark.parametrize("stage", [1, 2, 3])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_every_zero_stage_reloads_with_weights_only(dist_env, tmp_path, stage, precision):
    import torch

    from losslab.losses import build_loss
    from models import GPT, GPTConfig
    from trainer.config import DistributedSection, TrainSection
    from trainer.engine import build_engine, build_optimizer
    from trainer.objective import CausalLMObjective
    from trainer.optim import build_scheduler, param_groups

    train, dist_cfg = TrainSection(precision=precision, micro_batch_size=2), DistributedSection(zero_stage=stage)

    def engine():
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=100, n_layers=1, d_model=32, n_heads=2, d_mlp=64, max_seq_len=16))
        opt = build_optimizer(param_groups(model, train), train, dist_cfg)
        return build_engine(
            CausalLMObjective(model, build_loss({"name": "mile"})), opt, build_scheduler(opt, train), train, dist_cfg
        )

    first = engine()
    batch = torch.randint(0, 100, (2, 9))
    first.backward(first(batch).loss)
    first.step()
    first.save_checkpoint(str(tmp_path), tag="t", client_state={"losslab": {"step": 1}}, save_latest=False)
    second = engine()
    _, client = second.load_checkpoint(str(tmp_path), tag="t")
    assert client["losslab"] == {"step": 1}
    assert torch.equal(second(batch).loss, first(batch).loss)


def test_cpu_adam_that_cannot_be_built_is_a_clear_error(monkeypatch):
    """Offloading the optimizer compiles DeepSpeed's CPU Adam at first use; a machine without a toolchain gets
    a message that says so and what to do, not a compiler log ending in a traceback."""
    import deepspeed.ops.adam

    from trainer.config import DistributedSection, TrainSection
    from trainer.engine import EngineSetupError, build_optimizer

    def no_toolchain(*args, **kwargs):
        raise RuntimeError("Error building extension 'cpu_adam'")

    monkeypatch.setattr(deepspeed.ops.adam, "DeepSpeedCPUAdam", no_toolchain)
    groups = [{"params": [torch.nn.Parameter(torch.zeros(2))]}]
    with pytest.raises(EngineSetupError, match=r"CPU Adam.*could not be built.*cpu_adam.*DS_BUILD_CPU_ADAM=1"):
        build_optimizer(groups, TrainSection(), DistributedSection(zero_stage=3, offload_optimizer=True))
