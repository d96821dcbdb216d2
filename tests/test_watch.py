"""The evaluation watcher (``scripts/evaluate.py --watch RUN_DIR``, evals/watch.py) beside a training run: every
checkpoint evaluated once, oldest first, across a SIGKILL and a restart of the watcher, which stops when the run
has finished; the results go to ``eval_metrics.jsonl`` and to the run's own W&B run."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from evals.results_store import find_results
from evals.tasks import write_multiple_choice_task
from tests.conftest import debug_overrides
from tests.test_train import REPO, clean_env

STEPS = ["step_0000020", "step_0000040", "step_0000060"]


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    env = {**clean_env(), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, *cmd], cwd=REPO, env=env, stdout=open(f"{log}.out", "w"),
                            stderr=open(f"{log}.err", "w"))  # fmt: skip


@pytest.mark.slow
def test_watcher_evaluates_each_checkpoint_once_across_a_kill_and_stops_with_the_run(corpus, tmp_path):
    # Both are started by a process that ran W&B itself, as a driver script would: its service (WANDB_SERVICE) is
    # inherited by both children, and it refuses the watcher the run id that training holds unless the watcher
    # starts its own.
    import wandb

    wandb.init(mode="offline", dir=str(tmp_path), project="driver", settings=wandb.Settings(quiet=True)).finish()
    docs = [{"context": c, "choices": [" the crown", " zzz"], "label": 0} for c in ("The king loves", "A fool")]
    write_multiple_choice_task(tmp_path / "tasks", "toy_mc", docs)
    run_dir = tmp_path / "run"
    # no in-loop evaluation: the watcher does it (held-out buckets off, or the final checkpoint would get both)
    extra = {"train.max_steps": 60, "checkpoint.every": 20, "checkpoint.keep": 0, "train.log_every": 10,
             "eval.buckets": "false", "wandb.mode": "offline"}  # fmt: skip
    overrides = debug_overrides(corpus, run_dir, **extra)
    watch = ["scripts/evaluate.py", "--watch", str(run_dir), "--tasks", "toy_mc", "--task-dir", str(tmp_path / "tasks"),
             "--device", "cpu", "--interval", "0.2"]  # fmt: skip
    first = start(watch, tmp_path / "watch1")  # before the run exists: it waits for it
    trainer = start(["scripts/train.py", "configs/experiments/demo.yaml", *overrides], tmp_path / "train")
    done_dir, log1 = run_dir / "eval_watch", tmp_path / "watch1.err"
    deadline = time.monotonic() + 300
    # killed once the first checkpoint is done and, most often, in the middle of the second's evaluation
    while not ((done_dir / "step_0000020.json").is_file() and "evaluating step_0000040" in log1.read_text()):
        assert first.poll() is None, log1.read_text()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint evaluated in 5 minutes"
        time.sleep(0.05)
    first.kill()  # SIGKILL: no chance to tidy up
    first.wait()
    done_at_kill = {p.stem for p in done_dir.iterdir()}
    assert "step_0000020" in done_at_kill and done_at_kill < set(STEPS)

    second = start(watch, tmp_path / "watch2")
    assert second.wait(timeout=300) == 0, (tmp_path / "watch2.err").read_text()[-3000:]
    assert trainer.wait(timeout=300) == 0, (tmp_path / "train.err").read_text()[-3000:]
    assert json.loads((run_dir / "result.json").read_text())["complete"]  # it stopped because the run finished

    logs = [(tmp_path / f"watch{i}.err").read_text() for i in (1, 2)]
    finished = [m for log in logs for m in re.findall(r"(step_\d+) evaluated in", log)]
    assert finished == STEPS  # each once, oldest first, across both watchers
    restarted = re.findall(r"evaluating (step_\d+)", logs[1])
    assert restarted == sorted(set(STEPS) - done_at_kill)  # nothing done before the kill is done again
    assert {p.stem for p in done_dir.iterdir()} == set(STEPS)
    rows = [json.loads(x) for x in (run_dir / "eval_metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [20, 40, 60]
    tokens = {
        json.loads(x)["step"]: json.loads(x)["tokens"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()
    }
    assert all(r["tokens"] == tokens[r["step"]] and 0 <= r["eval/toy_mc/acc"] <= 1 for r in rows)
    for name, row in zip(STEPS, rows, strict=True):
        (stored,) = find_results(run_dir / "checkpoints" / name)
        assert stored.complete and stored.key == row["eval_setting"]
        assert stored.summary["metrics"]["toy_mc/acc"] == row["eval/toy_mc/acc"]
    # the evaluations went to the training run's own W&B run (its id), offline
    run_id = (run_dir / "wandb_id").read_text()
    streams = list((run_dir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    deadline = time.monotonic() + 60
    while not any(b"eval/toy_mc/acc" in s.read_bytes() for s in streams) and time.monotonic() < deadline:
        time.sleep(0.5)  # W&B's service process writes the stream on its own
    assert len(streams) >= 2 and any(b"eval/toy_mc/acc" in s.read_bytes() for s in streams)
    assert not any("W&B run of" in log for log in logs)  # every watcher opened the run's W&B run

    # "done" is for the watcher's own settings: the same again evaluates nothing; another limit evaluates every
    # checkpoint again, into its own folder, the first setting's results untouched
    env = {**clean_env(), "OMP_NUM_THREADS": "1"}
    quiet = [sys.executable, *watch, "--wandb", "disabled"]
    same = subprocess.run(quiet, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert same.returncode == 0 and "evaluating" not in same.stderr, same.stderr[-3000:]
    other = subprocess.run([*quiet, "--limit", "1"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert other.returncode == 0, other.stderr[-3000:]
    assert re.findall(r"evaluating (step_\d+)", other.stderr) == STEPS
    for name, row in zip(STEPS, rows, strict=True):
        by_key = {s.key: s for s in find_results(run_dir / "checkpoints" / name)}
        assert len(by_key) == 2 and all(s.complete for s in by_key.values())
        assert by_key[row["eval_setting"]].summary["metrics"]["toy_mc/acc"] == row["eval/toy_mc/acc"]


def test_watcher_refuses_a_run_directory_that_cannot_appear(tmp_path):
    """A mistyped path is one line and exit 2, not a wait for a run that will never start."""
    missing = tmp_path / "no_such_dir" / "run"
    proc = subprocess.run([sys.executable, "scripts/evaluate.py", "--watch", str(missing), "--tasks", "toy_mc"],
                          cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    expected = f"error: {missing}: its parent directory {missing.parent} does not exist"
    assert proc.stderr.strip().splitlines() == [expected]
