"""The operator's side, driven from outside the trainer: processes killed by another process at moments it
watches for (before the first checkpoint, while it is written, after it), the whole process group of a
``deepspeed``-launched job sent SIGTERM, and torn files left behind. No ``debug.*`` fault injection here."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.conftest import debug_overrides
from tests.ports import free_port
from tests.test_train import REPO, clean_env

STEPS = 20


def start(overrides: list[str], *, launcher: list[str] | None = None, log: Path) -> subprocess.Popen:
    """The trainer in the background, its output in files (a pipe nobody reads would block it)."""
    cmd = [*(launcher or [sys.executable]), "scripts/train.py", "configs/experiments/demo.yaml", *overrides]
    out, err = open(log.with_suffix(".out"), "w"), open(log.with_suffix(".err"), "w")  # noqa: SIM115
    env = {**clean_env(), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=err, start_new_session=True)


def run(overrides: list[str], log: Path, timeout: int = 300) -> int:
    proc = start(overrides, log=log)
    return proc.wait(timeout=timeout)


def wait_for(condition, proc: subprocess.Popen, timeout: float = 300, poll: float = 0.0005) -> None:
    """Poll ``condition`` as fast as the file system allows, failing if the process ends first."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, "the trainer ended before the moment the test waits for"
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(poll)


def logged_steps(run_dir: Path) -> int:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    steps = [json.loads(x)["step"] for x in lines if x.endswith("}")]
    return max(steps, default=0)


def metrics(run_dir: Path) -> dict[int, dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "loss" in r}


def assert_same_run(run_dir: Path, reference: Path) -> None:
    """Equal losses at every step, bit for bit, equal data counters, equal final weights."""
    got, ref = metrics(run_dir), metrics(reference)
    assert sorted(got) == sorted(ref) == list(range(1, STEPS + 1))
    assert {s: r["loss"] for s, r in got.items()} == {s: r["loss"] for s, r in ref.items()}
    data = {k for k in ref[STEPS] if k.startswith("data/")}
    assert data and {k: got[STEPS][k] for k in data} == {k: ref[STEPS][k] for k in data}
    a = load_file(str(run_dir / "checkpoints" / f"step_{STEPS:07d}" / "model.safetensors"))
    b = load_file(str(reference / "checkpoints" / f"step_{STEPS:07d}" / "model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    result = json.loads((run_dir / "result.json").read_text())
    assert result["complete"] and result["steps"] == STEPS


def overrides(corpus, run_dir: Path, **extra) -> list[str]:
    common = {"train.max_steps": STEPS, "train.log_every": 1, "checkpoint.every": 10, "checkpoint.keep": 0}
    return debug_overrides(corpus, run_dir, **{**common, **extra})


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("operator") / "reference"
    assert run(overrides(corpus, run_dir), run_dir.with_suffix(".log")) == 0
    return run_dir


def _tmp_checkpoint(run_dir: Path) -> bool:
    return (run_dir / "checkpoints" / ".tmp-step_0000010").exists()


KILL_MOMENTS = {
    # the moment (seen from outside) at which the trainer is SIGKILLed
    "before_first_checkpoint": lambda d: logged_steps(d) >= 7,
    "while_writing_first_checkpoint": _tmp_checkpoint,
    "after_first_checkpoint": lambda d: logged_steps(d) >= 13,
}


@pytest.mark.parametrize("moment", list(KILL_MOMENTS))
def test_sigkill_then_resume_auto_equals_the_uninterrupted_run(moment, reference, corpus, tmp_path):
    run_dir = tmp_path / "run"
    proc = start(overrides(corpus, run_dir), log=tmp_path / "killed")
    wait_for(lambda: KILL_MOMENTS[moment](run_dir), proc)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    ckpts = run_dir / "checkpoints"
    if moment == "while_writing_first_checkpoint":  # killed mid-write: a partial checkpoint, no complete one
        assert (ckpts / ".tmp-step_0000010").exists() and not (ckpts / "latest").exists()
    if moment == "after_first_checkpoint":
        assert (ckpts / "latest").read_text() == "step_0000010"
    # the same command, as a pre-empted job is relaunched
    log = tmp_path / "resumed"
    assert run(overrides(corpus, run_dir, **{"train.resume": "auto"}), log) == 0, log.with_suffix(".err").read_text()
    out = log.with_suffix(".out").read_text()
    if moment == "after_first_checkpoint":
        assert "resumed from" in out and "step_0000010" in out
    else:
        assert "no complete checkpoint to continue from; starting the run again" in out
    assert not (ckpts / ".tmp-step_0000010").exists()
    assert_same_run(run_dir, reference)


def test_torn_metrics_line_is_survived(reference, corpus, tmp_path):
    """A crash mid-write of metrics.jsonl leaves half a line; the resumed run drops it and logs on."""
    run_dir = tmp_path / "torn"
    proc = start(overrides(corpus, run_dir), log=tmp_path / "killed")
    wait_for(lambda: logged_steps(run_dir) >= 13, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    with open(run_dir / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 14, "loss": 2.3')  # what a kill in the middle of a write leaves
    log = tmp_path / "resumed"
    assert run(overrides(corpus, run_dir, **{"train.resume": "auto"}), log) == 0, log.with_suffix(".err").read_text()
    assert_same_run(run_dir, reference)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_sigterm_to_a_deepspeed_jobs_process_group_checkpoints_and_resumes_exactly(corpus, tmp_path):
    """What Slurm and Kubernetes do: SIGTERM to every process of the job. Under the deepspeed launcher each rank
    gets it twice (directly, and forwarded by launch.py); that must be one request, not an abort."""
    launcher = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port())]
    two_ranks = {"distributed.zero_stage": 2, "train.micro_batch_size": 4, "checkpoint.every": 0}
    reference = tmp_path / "reference"
    ref = start(overrides(corpus, reference, **two_ranks), launcher=launcher, log=tmp_path / "reference")
    assert ref.wait(timeout=600) == 0, (tmp_path / "reference.err").read_text()[-3000:]

    run_dir = tmp_path / "run"
    job = start(overrides(corpus, run_dir, **two_ranks), launcher=launcher, log=tmp_path / "job")
    wait_for(lambda: logged_steps(run_dir) >= 8, job, poll=0.01)
    os.killpg(job.pid, signal.SIGTERM)
    deadline = time.monotonic() + 120
    while _group_alive(job.pid) and time.monotonic() < deadline:
        job.poll()  # reap the launcher once it exits (a zombie still counts as a member of the group)
        time.sleep(0.2)
    assert not _group_alive(job.pid), "ranks still running two minutes after SIGTERM"
    err = (tmp_path / "job.err").read_text() + (tmp_path / "job.out").read_text()
    assert "Traceback" not in err and "Connection reset" not in err, err[-3000:]
    result = json.loads((run_dir / "result.json").read_text())
    stopped = result["steps"]
    assert not result["complete"] and 8 <= stopped < STEPS, result
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step_{stopped:07d}"  # the pre-emption checkpoint

    again = start(overrides(corpus, run_dir, **two_ranks, **{"train.resume": "auto"}), launcher=launcher,
                  log=tmp_path / "again")  # fmt: skip
    assert again.wait(timeout=600) == 0, (tmp_path / "again.err").read_text()[-3000:]
    assert f"step_{stopped:07d}" in (tmp_path / "again.out").read_text()
    assert_same_run(run_dir, reference)
