from __future__ import annotations

import subprocess
import sys

from evals.tasks import write_multiple_choice_task
from tests.conftest import debug_overrides
from tests.test_train import REPO, clean_env
from trainer.callbacks import run_names
from trainer.config import load_config
from trainer.loop import train


def test_compare_runs_builds_plots_and_table(corpus, dist_env, tmp_path):
    docs = [{"context": "The king loves", "choices": [" the crown", " zzz"], "label": 0}] * 4
    write_multiple_choice_task(tmp_path / "tasks", "toy_mc", docs)
    runs = []
    for loss, seed in (("ce", 0), ("ce", 1), ("mile", 0)):
        run_dir = tmp_path / f"{loss}-s{seed}"
        extra = {"loss.name": loss, "train.seed": seed, "train.max_steps": 8, "train.log_every": 2,
                 "eval.tasks": "[toy_mc]", "eval.task_dir": str(tmp_path / "tasks")}  # fmt: skip
        train(load_config(None, debug_overrides(corpus, run_dir, **extra)))
        runs.append(str(run_dir))
    out = tmp_path / "report"
    proc = subprocess.run(
        [sys.executable, "scripts/compare_runs.py", *runs, "--out", str(out)],
        cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    for png in ("loss_vs_tokens.png", "bucket_ppl.png", "downstream.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, png
    table = (out / "summary.md").read_text()
    rows = {
        line.split("|")[1].strip(): line
        for line in table.splitlines()
        if line.startswith("| ce") or line.startswith("| mile")
    }
    assert set(rows) == {"ce", "mile"}
    assert "0,1" in rows["ce"] and "±" in rows["ce"]  # two seeds: mean ± spread
    assert "eval/toy_mc/acc" in table and "eval_bucket/low_ppl" in table


def test_wandb_names_follow_the_experiment():
    cfg = load_config(
        None, ["model.preset=468m", "model.block=llama", "loss.name=mile", "train.seed=3", "data.seq_len=128"]
    )
    assert run_names(cfg) == ("468m-llama-mile-s3", "468m-llama", ["loss:mile", "size:468m", "block:llama"])


def test_grid_runs_resume_after_an_interruption_and_skip_finished_runs(corpus, tmp_path):
    grid = tmp_path / "toy"
    grid.mkdir()
    (grid / "mile.yaml").write_text("includes:\n  - loss/mile.yaml\n")
    overrides = [o for o in debug_overrides(corpus, tmp_path / "unused", **{"train.max_steps": 6, "train.log_every": 2})
                 if not o.startswith("run.dir=")]  # fmt: skip
    env = {**clean_env(), "RUNS": str(tmp_path / "runs"), "LAUNCHER": sys.executable, "PYTHON": sys.executable}

    def grid_run(*extra: str) -> subprocess.CompletedProcess:
        cmd = ["bash", "scripts/run_grid.sh", str(grid), "0", "--", *overrides, *extra]
        return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)

    run_dir = tmp_path / "runs" / "toy" / "mile-s0"
    first = grid_run("debug.sigterm_at_step=3")  # pre-empted: a checkpoint, not finished
    assert first.returncode == 75, first.stdout[-2000:] + first.stderr[-2000:]
    assert '"complete": false' in (run_dir / "result.json").read_text()
    second = grid_run()
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resumed from" in second.stdout and (tmp_path / "runs" / "toy" / "report" / "summary.md").is_file()
    assert '"complete": true' in (run_dir / "result.json").read_text()
    third = grid_run()
    assert third.returncode == 0 and "final training loss" not in third.stdout  # nothing left to train
