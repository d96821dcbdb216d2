"""A non-finite step changes nothing under every optimizer layout, and the run's config prints as it runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.conftest import debug_overrides
from tests.faults import nan_at
from tests.test_train import REPO, clean_env

LAYOUTS = {
    # ZeRO-0: torch's fused AdamW skips on the device; the others: DeepSpeed's overflow check
    "zero0": {},
    "zero1_fp32": {"distributed.zero_stage": 1},
    "zero3_fp32": {"distributed.zero_stage": 3},
    "zero2_offload": {"distributed.zero_stage": 2, "distributed.offload_optimizer": "true"},
}


def train(overrides: list[str], *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "scripts/train.py", "configs/experiments/demo.yaml", *overrides, *extra],
        cwd=REPO, env={**clean_env(), "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def weights(run_dir: Path, step: int) -> dict:
    return load_file(str(run_dir / "checkpoints" / f"step_{step:07d}" / "model.safetensors"))


@pytest.mark.cpu_adam  # the zero2_offload layout
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_a_nonfinite_step_changes_no_parameter(layout, corpus, tmp_path):
    run_dir = tmp_path / layout
    steps = {"train.max_steps": 5, "train.log_every": 1, "checkpoint.every": 1, "checkpoint.keep": 0}
    proc = train(debug_overrides(corpus, run_dir, **steps, **LAYOUTS[layout], **nan_at(3)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    before, skipped, after = weights(run_dir, 2), weights(run_dir, 3), weights(run_dir, 4)
    assert all((before[k] == skipped[k]).all() for k in before)  # step 3 was skipped
    assert any((skipped[k] != after[k]).any() for k in before)  # step 4 trained again
    assert all(t.isfinite().all() for t in weights(run_dir, 5).values())


def test_print_config_loads_back_to_itself(tmp_path):
    args = ["loss.name=pdl", "loss.alpha=0.5", "train.global_batch_size=64", "train.seed=3"]
    first = train(args, "--print-config")
    assert first.returncode == 0, first.stderr[-2000:]
    printed = tmp_path / "resolved.yaml"
    printed.write_text(first.stdout)
    again = subprocess.run(
        [sys.executable, "scripts/train.py", str(printed), "--print-config"],
        cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert again.returncode == 0 and again.stdout == first.stdout, again.stderr[-2000:]
    from trainer.config import load_config

    cfg = load_config(printed)
    # derived fields are filled: the preset's shape, the accumulation the global batch implies, the run's name
    assert (cfg.model.n_layers, cfg.model.d_model, cfg.train.grad_accum) == (4, 128, 4)
    assert cfg.loss.name == "pdl" and cfg.loss.alpha == 0.5 and "pdl" in cfg.run.name and cfg.run.name.endswith("s3")


def test_list_names_the_choices():
    proc = train([], "--list")
    assert proc.returncode == 0, proc.stderr[-2000:]
    for word in ("468m", "llama", "mile", "pdl", "paper", "zero3_offload", "configs/experiments/demo.yaml"):
        assert word in proc.stdout
