"""The study drivers' command lines and their provenance record (the drivers themselves run for hours and fetch
packages; their toy-size runs are recorded in docs/benchmarks.md): a misspelt flag stops them at once with one line
naming it, before any set-up, download or training."""

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


def test_the_provenance_names_every_input_and_refuses_a_missing_one(tmp_path):
    """scripts/study_record.py hashes each --data file and lists each run; an input or a run that is not there
    stops it with one line naming it (exit 2), and nothing is written."""
    import hashlib
    import json
    import sys

    data = tmp_path / "val.jsonl"
    data.write_text('{"text": "held out"}\n')
    run = tmp_path / "ce-s0"
    run.mkdir()
    (run / "result.json").write_text(json.dumps({"complete": True, "steps": 30}))
    # trained at one commit, its final evaluation finished by a relaunch at another, which trained no step
    launches = [{"git_sha": "a" * 40, "start_step": 1, "max_steps": 30},
                {"git_sha": "b" * 40, "start_step": 31, "max_steps": 30}]  # fmt: skip
    (run / "run_info.json").write_text(json.dumps({"git_sha": "b" * 40, "launches": launches}))
    evals = run / "checkpoints/step_0000030/evals/tasks0"
    evals.mkdir(parents=True)
    (evals / "eval_results.json").write_text(json.dumps({"git_sha": "a" * 40, "evaluated_at": "b" * 40}))
    out = tmp_path / "report"
    cmd = [sys.executable, "scripts/study_record.py", "--out", str(out), "--command", "bash scripts/cpu_study.sh"]
    for args, named in (([str(data), str(tmp_path / "tok.model")], "tok.model"), ([str(data)], "ce-s1")):
        proc = subprocess.run([*cmd, "--data", *args, "--", str(run), str(tmp_path / "ce-s1")], cwd=REPO,
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        assert proc.returncode == 2 and named in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
        assert not out.exists()
    proc = subprocess.run([*cmd, "--data", str(data), "--", str(run)], cwd=REPO, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    rec = json.loads((out / "provenance.json").read_text())
    assert rec["data_files"] == {str(data): hashlib.sha256(data.read_bytes()).hexdigest()}
    assert [(r["complete"], r["steps"]) for r in rec["runs"]] == [(True, 30)]
    commits = {k: rec["runs"][0][k] for k in ("trained_at", "other_launches_at", "evaluated_at")}
    assert commits == {"trained_at": ["a" * 40], "other_launches_at": ["b" * 40], "evaluated_at": ["b" * 40]}
    assert rec["run_commits"] == ["a" * 40, "b" * 40]
    text = (out / "provenance.md").read_text()
    assert "bash scripts/cpu_study.sh" in text and f"| ce-s0 | 30 | `{'a' * 9}` | `{'b' * 9}` | `{'b' * 9}` |" in text


def test_a_report_published_into_docs_results_does_not_count_as_uncommitted_code(tmp_path):
    """A study publishes into tracked files under docs/results/; the commit recorded for the code that made the
    report must not read "-dirty" because of that, and must when the code itself has changed (run in a clone)."""
    import json
    import sys

    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", "--local", str(REPO), str(clone)], check=True, timeout=120)
    here = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    subprocess.run(["git", "checkout", "-q", "--detach", here], cwd=clone, check=True)  # a worktree's HEAD too
    # this checkout's uncommitted changes too, committed in the clone: the code under test is the code here
    diff = subprocess.run(["git", "diff", "HEAD", "--binary"], cwd=REPO, capture_output=True, check=True).stdout
    if diff:
        subprocess.run(["git", "apply", "--index"], cwd=clone, input=diff, check=True)
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "wip"], cwd=clone,
                       check=True)  # fmt: skip
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=clone, capture_output=True, text=True).stdout.strip()

    def recorded() -> str:
        out = tmp_path / "out"
        proc = subprocess.run([sys.executable, str(clone / "scripts/study_record.py"), "--out", str(out)],
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        return json.loads((out / "provenance.json").read_text())["report_commit"]

    (clone / "docs/results/README.md").write_text("rewritten by a study's --publish\n")
    assert recorded() == head
    (clone / "trainer/loop.py").write_text("# changed code\n")
    assert recorded() == head + "-dirty"


def test_what_the_studies_publish_is_tracked_by_git():
    """The published runs (docs/results/finetune/runs/) and every other report file are files git keeps: a
    pattern for the working runs/ folder once swallowed them, and a commit of them committed nothing."""
    for path in ("docs/results/finetune/runs/ce-s0/result.json", "docs/results/finetune/runs/_blobs/x.gz",
                 "docs/results/cpu-study/summary.csv", "docs/results/finetune/settings_greedy.png"):  # fmt: skip
        proc = subprocess.run(["git", "check-ignore", "-v", path], cwd=REPO, capture_output=True, text=True)
        assert proc.returncode == 1, f"{path} is ignored by {proc.stdout.strip()}"
    # ... while the working folders stay out of it
    for path in ("runs/finetune_study/ce-s0/result.json", "corpus/study/manifest.json", ".venv/bin/python"):
        assert subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO).returncode == 0, path
