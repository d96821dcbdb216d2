"""What a user sees while training: progress lines on stdout (a pipe here, as under a scheduler), checkpoint and
evaluation events on their own lines, and a tqdm bar on a terminal; derived run names."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from evals.results_store import latest
from evals.tasks import write_multiple_choice_task
from tests.conftest import debug_overrides
from tests.test_train import REPO, clean_env
from trainer.callbacks import ConsoleProgress, run_names
from trainer.config import load_config

PROGRESS = re.compile(
    r"^step +(\d+)/(\d+) \( *\d+%\) \| loss (\d+\.\d{4}) \| ce (\d+\.\d{4}) \| lr \d\.\d\de[-+]\d\d"
    r"(?: \| gnorm \S+)? \| ([\d.]+[kMG]?) tok/s(?: \| mfu [\d.]+%)? \| eta \S+$"
)


def test_a_training_run_prints_its_progress(corpus, tmp_path):
    docs = [{"context": "The king loves", "choices": [" the crown", " zzz"], "label": 0}] * 4
    write_multiple_choice_task(tmp_path / "tasks", "toy_mc", docs)
    run_dir = tmp_path / "run"
    extra = {"train.max_steps": 10, "train.log_every": 2, "checkpoint.every": 5, "eval.tasks": "[toy_mc]",
             "eval.task_dir": str(tmp_path / "tasks")}  # fmt: skip
    overrides = debug_overrides(corpus, run_dir, **extra)
    proc = subprocess.run(
        [sys.executable, "scripts/train.py", "configs/experiments/demo.yaml", *overrides],
        cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    progress = {int(m[1]): m for m in map(PROGRESS.match, lines) if m}
    assert sorted(progress) == [2, 4, 6, 8, 10], proc.stdout
    logged = {
        r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r
    }
    for step, m in progress.items():  # the console shows what metrics.jsonl records
        assert m[2] == "10"
        assert float(m[3]) == pytest.approx(logged[step]["loss"], abs=6e-5)
        assert float(m[4]) == pytest.approx(logged[step]["ce"], abs=6e-5)
    # events on lines of their own, in order: checkpoint 5, checkpoint 10, then the evaluation of step 10
    ckpt_lines = [i for i, line in enumerate(lines) if line.startswith("checkpoint step ")]
    assert [lines[i].split(":")[0] for i in ckpt_lines] == ["checkpoint step 5", "checkpoint step 10 (final)"]
    assert lines[ckpt_lines[1]].endswith("step_0000010")
    (eval_line,) = [line for line in lines if line.startswith("eval step 10: ")]
    acc = latest(run_dir / "checkpoints" / "step_0000010").summary["metrics"]
    assert f"toy_mc/acc {acc['toy_mc/acc']:.4f} ± {acc['toy_mc/acc_stderr']:.4f}" in eval_line
    assert "ppl by frequency high" in eval_line and lines.index(eval_line) > ckpt_lines[1]


def test_a_terminal_gets_a_progress_bar(monkeypatch):
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    console = ConsoleProgress(max_steps=100, start_step=41, bar=True)  # resumed at step 41
    metrics = {"loss": 3.25, "ce": 3.5, "lr": 1e-3, "tokens_per_s": 12345.0, "perf/mfu": 0.42, "tokens": 1.0}
    console.on_log(50, metrics)
    console.on_checkpoint(50, Path("runs/x/checkpoints/step_0000050"), final=False, emit=lambda *_: None)
    console.on_log(50, {"eval/toy/acc": 0.5, "eval/toy/acc_stderr": 0.25})
    console.on_end()
    text = out.getvalue()
    assert "50/100" in text and "loss 3.2500 | ce 3.5000" in text and "12.3k tok/s" in text and "mfu 42.0%" in text
    assert "\rcheckpoint step 50: runs/x/checkpoints/step_0000050\n" in text  # tqdm clears its bar line first
    assert "eval step 50: toy/acc 0.5000 ± 0.2500" in text


def test_eta_counts_from_the_step_a_run_resumed_at(monkeypatch):
    clock = iter([100.0, 110.0])  # construction, then 10 s later
    monkeypatch.setattr("trainer.callbacks.time.perf_counter", lambda: next(clock))
    console = ConsoleProgress(max_steps=100, start_step=51, bar=False)
    assert console.eta(60) == pytest.approx(10.0 / 10 * 40)  # 10 steps in 10 s, 40 to go


def test_run_names_follow_the_overrides_and_no_experiment_pins_one():
    demo = "configs/experiments/demo.yaml"
    assert run_names(load_config(demo, ["loss.name=ce"]))[0] == "tiny-neox-ce-s0"
    assert run_names(load_config(demo, ["loss.gamma=2", "train.seed=3"]))[0] == "tiny-neox-mile-g2-s3"
    assert run_names(load_config(demo, ["loss.name=pdl", "loss.alpha=0.5"]))[0] == "tiny-neox-pdl-a0.5-s0"
    assert run_names(load_config(demo, ["run.name=mine"]))[0] == "mine"
    assert run_names(load_config(demo, []), experiment="demo")[0] == "demo-tiny-neox-mile-g1-s0"
    experiments = sorted((REPO / "configs" / "experiments").rglob("*.yaml"))
    assert len(experiments) > 10
    for path in experiments:
        assert load_config(path).run.name == "", f"{path} pins run.name"
