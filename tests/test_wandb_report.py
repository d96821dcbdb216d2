"""W&B: a study's runs carry flat loss columns and its group; scripts/wandb_report.py's offline behaviour (the
service itself cannot be reached from tests)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time

from tests.conftest import debug_overrides
from tests.test_train import REPO, clean_env
from trainer.callbacks import wandb_config
from trainer.config import load_config
from trainer.loop import train


def test_wandb_run_is_grouped_by_study_with_loss_columns(corpus, dist_env, tmp_path):
    run_dir = tmp_path / "run"
    extra = {"train.max_steps": 4, "train.log_every": 2, "loss.name": "mile", "loss.gamma": 2, "wandb.mode": "offline",
             "wandb.group": "toy-study", "eval.val_every": 2, "eval.buckets": "false"}  # fmt: skip
    cfg = load_config(None, debug_overrides(corpus, run_dir, **extra))
    columns = wandb_config(cfg, {"loss": {"name": "mile"}}, "toy-study")
    assert columns["experiment"] == "toy-study" and columns["loss/tag"] == "mile-g2" and columns["seed"] == 0
    assert columns["loss/gamma"] == 2.0 and columns["loss/name"] == "mile" and columns["loss"] == {"name": "mile"}
    train(cfg)
    # the offline run's record stream (protobuf): config columns, group, and per-domain losses under eval_domain/
    (stream,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    deadline = time.monotonic() + 60
    while b"eval_domain/Plays/loss" not in (data := stream.read_bytes()) and time.monotonic() < deadline:
        time.sleep(0.5)  # W&B's service process writes the stream on its own after finish() returns
    for needle in (b"loss/tag", b'"mile-g2"', b"loss/gamma", b"experiment", b"toy-study", b"eval_domain/Plays/loss"):
        assert needle in data, needle
    assert b"train/eval_domain" not in data  # its own namespace, as in metrics.jsonl


def _report(*args: str) -> subprocess.CompletedProcess:
    env = clean_env()
    return subprocess.run([sys.executable, "scripts/wandb_report.py", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip


def test_wandb_report_checks_its_arguments_and_says_what_is_missing(tmp_path):
    missing = _report("--group", "study")
    assert missing.returncode == 2 and "--entity" in missing.stderr
    bad = _report("--entity", "me", "--group", "study", "--summary", str(tmp_path / "nope.md"))
    assert bad.returncode == 2 and "nope.md" in bad.stderr and "Traceback" not in bad.stderr
    quoted = _report("--entity", "me", "--group", "it's")
    assert quoted.returncode == 2 and "--group" in quoted.stderr
    summary = tmp_path / "summary.md"
    summary.write_text("# Loss comparison\n\n| group | Δ |\n|---|---|\n| mile | +0.01 |\n")
    proc = _report("--entity", "me", "--group", "study", "--tasks", "piqa_local/acc", "--summary", str(summary),
                   "--dry-run")  # fmt: skip
    if importlib.util.find_spec("wandb_workspaces") is None:  # the optional extra is not installed: one clear line
        assert proc.returncode == 2 and "wandb-workspaces" in proc.stderr and "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
        return
    assert proc.returncode == 0, proc.stderr[-2000:]
    outline = json.loads(proc.stdout)
    (grid,) = [b for b in outline["blocks"] if b["block"] == "PanelGrid"]
    assert grid["runsets"][0]["filters"] == "Metric('Group') == 'study'"
    assert grid["runsets"][0]["groupby"] == ["config.loss/tag"]
    panels = {p["title"]: p for p in grid["panels"] if p["title"]}
    assert any(p["metrics"] == ["train/ce"] and p["x"] == "train/tokens" for p in panels.values())
    assert any("eval_bucket/low_ppl" in p["metrics"] for p in panels.values())
    assert any(p["metric_regex"] == "eval_domain/.*/loss" for p in panels.values())
    assert any(p["metrics"] == ["eval/piqa_local/acc"] for p in panels.values())
    assert any(b["block"] == "MarkdownBlock" and "mile" in b["text"] for b in outline["blocks"])
