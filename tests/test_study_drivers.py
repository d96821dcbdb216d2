"""The study drivers' command lines (the drivers themselves run for hours and fetch packages; their toy-size runs
are recorded in docs/benchmarks.md): a misspelt flag stops them at once with one line naming it, before any
set-up, download or training."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script", ["scripts/cpu_study.sh", "scripts/finetune_study.sh"])
def test_an_unknown_flag_is_one_line_and_exit_2(script, tmp_path):
    env = {"PATH": "/usr/bin:/bin", "RUNS": str(tmp_path / "runs"), "STUDY_DATA": str(tmp_path / "data")}
    proc = subprocess.run(["bash", script, "--acept-changed-corpus", "--", "train.max_steps=1"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "unknown argument '--acept-changed-corpus'" in proc.stderr and proc.stdout == ""
    assert not (tmp_path / "runs").exists() and not (tmp_path / "data").exists()
