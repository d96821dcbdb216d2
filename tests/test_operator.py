"""The operator's side, driven from outside the trainer: processes killed by another process at moments it
watches for (before the first checkpoint, while it is written, after it), the whole process group of a
``deepspeed``-launched job sent SIGTERM, torn and corrupted files left behind, a second launch on a run in
progress, a full disk, and data changed under a run. No injected faults (``tests/faults.py``) here."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zstandard
from safetensors.torch import load_file

from data.files import git_commit
from evals.results_store import find_results
from evals.tasks import write_multiple_choice_task
from tests.conftest import debug_overrides, flip
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
    assert (run_dir / "run.lock").is_file()  # left by the killed process, and no obstacle: the kernel released it
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


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
@pytest.mark.parametrize("moment", ["final", "mid-run"])
def test_a_checkpoints_evaluation_cut_short_is_made_by_the_relaunch(sig, moment, reference, corpus, tmp_path):
    """SIGKILL after a checkpoint is written, while its evaluation runs (a job's time running out, the machine
    taken away), or SIGTERM to the job's process group (a scheduler's pre-emption notice). The same command again
    makes that evaluation before anything else: from the final checkpoint it trains no step and ends the run (it
    used to stop with "nothing left to train", the run's final evaluation never made); from an earlier one
    (``eval.every_checkpoint``) it then trains on. Each evaluation once. SIGTERM stops the evaluation at once
    with the run's record written (it used to be deferred until the evaluation ended, which can outlast the
    notice: the trainer said "finishing the step" and evaluated on for half an hour)."""
    docs = [{"context": "The king loves", "choices": [" the crown", " zzz qqq"], "label": 0} for _ in range(8)]
    write_multiple_choice_task(tmp_path / "tasks", "toy_mc", docs)
    run_dir = tmp_path / "run"
    extra = {"eval.tasks": "[toy_mc]", "eval.task_dir": str(tmp_path / "tasks"), "eval.every_checkpoint": "true"}
    if moment == "final":
        extra["eval.every_checkpoint"] = "false"
    step = STEPS if moment == "final" else 10
    proc = start(overrides(corpus, run_dir, **extra), log=tmp_path / "killed")
    line = f"checkpoint step {step}{' (final)' if moment == 'final' else ''}:"
    wait_for(lambda: line in (tmp_path / "killed.out").read_text(), proc)  # lm-eval's set-up takes seconds
    ckpt = run_dir / "checkpoints" / f"step_{step:07d}"
    if sig == signal.SIGKILL:
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
        assert not (run_dir / "result.json").exists()
    else:
        os.killpg(proc.pid, signal.SIGTERM)
        time.sleep(0.3)  # and again, as a launcher forwards it: the same request, inside the 10 s grace
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, output(tmp_path / "killed")[1][-3000:]  # a pre-emption, not a failure
        out, err = output(tmp_path / "killed")
        assert f"pre-empted during the evaluation of {ckpt}: the relaunch (train.resume=auto) makes it" in err
        assert f"pre-empted after step {step}; resume with train.resume=auto" in out
        assert not lines(out, "eval ")  # no evaluation reported
        result = json.loads((run_dir / "result.json").read_text())
        assert (result["complete"], result["steps"], result["checkpoint"]) == (False, step, str(ckpt))
    assert (run_dir / "checkpoints" / "latest").read_text() == ckpt.name
    assert not any(e.complete for e in find_results(ckpt))

    log = tmp_path / "relaunched"
    assert run(overrides(corpus, run_dir, **{**extra, "train.resume": "auto"}), log) == 0, output(log)[1][-3000:]
    out = output(log)[0]
    if moment == "final":
        assert f"resumed from {ckpt}, the run's final checkpoint: no step left to train" in out
        assert not lines(out, "step ")  # no step trained
    else:
        assert f"resumed from {ckpt} at step {step + 1}" in out and lines(out, f"step {STEPS}/{STEPS}")
    assert f"evaluating {ckpt}: its evaluation did not finish" in out
    assert "eval toy_mc/acc:" in out and f"after {STEPS} steps" in lines(out, "final training loss: ")[0]
    evaluated = [step, STEPS] if moment == "mid-run" else [STEPS]
    for s in evaluated:
        done = find_results(run_dir / "checkpoints" / f"step_{s:07d}")
        # made by the relaunch, whose code's commit it records (beside the commit that trained the checkpoint)
        assert [(e.complete, e.summary["source"], e.summary["evaluated_at"]) for e in done] == [
            (True, "training", git_commit())], s  # fmt: skip
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval/toy_mc/acc" in r] == evaluated  # each once, in order
    assert_same_run(run_dir, reference)  # every step once, the same losses and weights, result.json complete


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


def _group_ends(job: subprocess.Popen, seconds: float) -> bool:
    """Whether every process of ``job``'s process group has ended within ``seconds``."""
    deadline = time.monotonic() + seconds
    while _group_alive(job.pid) and time.monotonic() < deadline:
        job.poll()  # reap the launcher once it exits (a zombie still counts as a member of the group)
        time.sleep(0.2)
    return not _group_alive(job.pid)


@pytest.mark.slow
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
    assert _group_ends(job, 120), "ranks still running two minutes after SIGTERM"
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


@pytest.mark.slow
def test_sigterm_to_a_deepspeed_job_during_its_shared_evaluation_stops_it_and_the_relaunch_makes_it(corpus, tmp_path):
    """Two ranks scoring the final checkpoint together (ZeRO-3: each holds a shard of the weights, every forward
    gathers them) when the job's process group gets SIGTERM: each rank stops its part of the evaluation at once (a
    rank waiting in a collective for the other is released by its exit, within the launcher's 30 s), rank 0 writes
    result.json, no traceback; the same command with resume=auto makes the evaluation and ends the run."""
    docs = [
        {"context": f"The king loves {i}", "choices": [" the crown", " zzz qqq", " of the realm"], "label": i % 3}
        for i in range(160)
    ]  # seconds of set-up and scoring on two ranks: the signal comes in the middle
    write_multiple_choice_task(tmp_path / "tasks", "toy_mc", docs)
    launcher = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port())]
    extra = {"distributed.zero_stage": 3, "train.micro_batch_size": 4, "checkpoint.every": 0, "train.max_steps": 4,
             "eval.tasks": "[toy_mc]", "eval.task_dir": str(tmp_path / "tasks"), "eval.batch_size": 2}  # fmt: skip
    run_dir = tmp_path / "run"
    ckpt = run_dir / "checkpoints" / "step_0000004"
    job = start(overrides(corpus, run_dir, **extra), launcher=launcher, log=tmp_path / "job")
    wait_for(lambda: "checkpoint step 4 (final)" in (tmp_path / "job.out").read_text(), job, poll=0.01)
    os.killpg(job.pid, signal.SIGTERM)
    assert _group_ends(job, 60), "ranks still running a minute after SIGTERM"
    out, err = output(tmp_path / "job")
    assert "Traceback" not in err + out, err[-3000:]
    assert f"pre-empted during the evaluation of {ckpt}" in err
    result = json.loads((run_dir / "result.json").read_text())
    assert (result["complete"], result["steps"]) == (False, 4) and not any(e.complete for e in find_results(ckpt))

    launcher[-1] = str(free_port())
    again = start(overrides(corpus, run_dir, **extra, **{"train.resume": "auto"}), launcher=launcher,
                  log=tmp_path / "again")  # fmt: skip
    assert again.wait(timeout=600) == 0, (tmp_path / "again.err").read_text()[-3000:]
    out = (tmp_path / "again.out").read_text()
    assert f"evaluating {ckpt}: its evaluation did not finish" in out and "eval toy_mc/acc:" in out
    assert [(e.complete, e.summary["source"]) for e in find_results(ckpt)] == [(True, "training")]
    assert json.loads((run_dir / "result.json").read_text())["complete"]


PREEMPTED_WORK = """
import sys, time
from trainer.signals import Preempted, Preemption
p = Preemption()
print("ready", flush=True)
try:
    with p.interruptible("the work"):
        time.sleep(60)
except Preempted:
    print("stopped", flush=True)
p.restore()  # the run is over; result.json would be written now
print("restored", flush=True)
time.sleep(2)
print("exiting", flush=True)
"""


def test_a_launchers_duplicate_signal_after_a_stopped_evaluation_is_still_the_same_request():
    """SIGTERM stops interruptible work at once; the copy a launcher sends a moment later (deepspeed's launch.py
    terminates its ranks the instant it is signalled itself) must not kill the process while it writes its
    record. It did, about one time in seven with two ranks: the handlers were put back as soon as the loop ended,
    and a duplicate landing after that took the default action, before result.json was written."""
    proc = subprocess.Popen([sys.executable, "-c", PREEMPTED_WORK], cwd=REPO, env=clean_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    assert proc.stdout.readline() == "ready\n"
    proc.send_signal(signal.SIGTERM)
    assert proc.stdout.readline() == "stopped\n" and proc.stdout.readline() == "restored\n"
    proc.send_signal(signal.SIGTERM)  # the duplicate, well inside the 10 s grace
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and out == "exiting\n", err[-2000:]


# --- integrity: damaged checkpoints, a second launch, a full disk, data changed under a run ------------------


def script(name: str, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, f"scripts/{name}", *args], cwd=REPO, capture_output=True, text=True,
                          env={**clean_env(), "OMP_NUM_THREADS": "1"}, timeout=timeout)  # fmt: skip


def output(log: Path) -> tuple[str, str]:
    return log.with_suffix(".out").read_text(), log.with_suffix(".err").read_text()


def lines(text: str, prefix: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(prefix)]


def logged_once(run_dir: Path) -> None:
    """Each step's training row in metrics.jsonl exactly once: no launch logged over another's."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == list(range(1, STEPS + 1)), steps


def test_a_corrupted_checkpoint_is_passed_over_for_the_newest_intact_one(reference, corpus, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    # as a run killed after writing its last checkpoint, before result.json: not finished (a finished run relaunched
    # with resume=auto does nothing, README), and the step-20 checkpoint is the one a relaunch continues from
    (run_dir / "result.json").unlink()
    ckpts = run_dir / "checkpoints"
    states = ckpts / "step_0000020" / "mp_rank_00_model_states.pt"
    flip(states)  # what the issue found loaded silently
    # named by a resume that asks for exactly it: one line, exit 2
    log = tmp_path / "explicit"
    assert run(overrides(corpus, tmp_path / "other", **{"train.resume": states.parent}), log) == 2
    err = output(log)[1]
    assert "Traceback" not in err, err[-3000:]
    [error] = lines(err, "error:")
    assert str(states) in error and "checksum" in error
    # resume=auto: one warning naming the file, the damaged checkpoint moved aside, the run continued from step 10
    log = tmp_path / "auto"
    assert run(overrides(corpus, run_dir, **{"train.resume": "auto"}), log) == 0, output(log)[1][-3000:]
    out, err = output(log)
    warnings = lines(err, "warning:")
    assert len(warnings) == 1 and str(states) in warnings[0] and "step_0000010" in warnings[0], err[-3000:]
    assert f"resumed from {ckpts / 'step_0000010'}" in out
    assert (ckpts / "damaged-step_0000020" / states.name).is_file()
    assert_same_run(run_dir, reference)
    logged_once(run_dir)
    assert script("verify_checkpoint.py", str(run_dir)).returncode == 0  # the new step 20 is intact


def test_a_second_launch_on_a_run_directory_in_use_is_refused(reference, corpus, tmp_path):
    """A requeued job started while the old one still runs: the same command, a moment later."""
    run_dir = tmp_path / "run"
    first = start(overrides(corpus, run_dir, **{"train.resume": "auto"}), log=tmp_path / "first")
    wait_for(lambda: logged_steps(run_dir) >= 1, first)
    first.send_signal(signal.SIGSTOP)  # held mid-run, however long the second launch takes to start
    log = tmp_path / "second"
    try:
        assert run(overrides(corpus, run_dir, **{"train.resume": "auto"}), log) == 2
    finally:
        first.send_signal(signal.SIGCONT)
    err = output(log)[1]
    assert "Traceback" not in err and len(lines(err, "error:")) == 1, err[-3000:]
    holder = f"pid {first.pid} on host {socket.gethostname()}, started "
    assert holder in lines(err, "error:")[0] and "in use by another launch" in err
    assert first.wait(timeout=300) == 0, output(tmp_path / "first")[1][-3000:]
    assert_same_run(run_dir, reference)
    logged_once(run_dir)


@pytest.fixture
def small_fs(tmp_path):
    """A real file system of a chosen size (tmpfs), resized on demand: ``resize(bytes)``."""
    if os.geteuid() != 0:
        pytest.skip("a full file system needs root to mount a small tmpfs (run as root, or see README)")
    mnt = tmp_path / "fs"
    mnt.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if made.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.strip()}")

    def resize(size: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(mnt)], check=True)

    yield mnt, resize
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_disk_while_checkpointing_stops_with_one_line_and_resumes_once_space_is_back(
    reference, corpus, small_fs, tmp_path
):
    mnt, resize = small_fs
    size = sum(f.stat().st_size for f in (reference / "checkpoints" / "step_0000010").iterdir())
    resize(size * 3 // 2)  # room for the first checkpoint, not for a second one
    run_dir = mnt / "run"
    log = tmp_path / "full"
    assert run(overrides(corpus, run_dir), log) == 2
    err = output(log)[1]
    assert "Traceback" not in err, err[-3000:]
    [error] = lines(err, "error:")
    assert "checkpoint step 20 could not be written" in error and "step_0000010" in error and "free" in error
    assert any("may not fit" in w for w in lines(err, "warning:"))  # said before the save was tried
    result = json.loads((run_dir / "result.json").read_text())
    assert not result["complete"] and "checkpoint step 20 could not be written" in result["error"]
    ckpts = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_0000010"]  # the partial one removed
    resize(size * 4)
    log = tmp_path / "resumed"
    assert run(overrides(corpus, run_dir, **{"train.resume": "auto"}), log) == 0, output(log)[1][-3000:]
    assert_same_run(run_dir, reference)
    logged_once(run_dir)


def _reshuffle(shard: Path) -> None:
    """The shard rewritten in place with its documents in another order."""
    raw = zstandard.ZstdDecompressor().decompress(shard.read_bytes(), max_output_size=1 << 30)
    docs = raw.decode().splitlines()
    random.Random(0).shuffle(docs)
    shard.write_bytes(zstandard.ZstdCompressor().compress(("\n".join(docs) + "\n").encode()))


def test_data_changed_under_a_run_stops_its_resume_unless_allowed(reference, corpus, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for shard in sorted(Path(corpus["dir"]).glob("train_*.jsonl.zst")):
        shutil.copy2(shard, data / shard.name)
    files = {"data.train_files": f"[{data}/train_*.jsonl.zst]"}
    run_dir = tmp_path / "run"
    proc = start(overrides(corpus, run_dir, **files), log=tmp_path / "first")
    wait_for(lambda: logged_steps(run_dir) >= 5, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0
    stopped = json.loads((run_dir / "result.json").read_text())["steps"]
    assert 5 <= stopped < STEPS
    _reshuffle(data / "train_01.jsonl.zst")
    resume = {**files, "train.resume": "auto"}
    log = tmp_path / "changed"
    assert run(overrides(corpus, run_dir, **resume), log) == 2
    err = output(log)[1]
    assert "Traceback" not in err and len(lines(err, "error:")) == 1, err[-3000:]
    assert str(data / "train_01.jsonl.zst") in err and "data.allow_changed=true" in err
    log = tmp_path / "allowed"
    assert run(overrides(corpus, run_dir, **resume, **{"data.allow_changed": "true"}), log) == 0
    warnings = [w for w in lines(output(log)[1], "warning:") if "training data changed" in w]
    assert len(warnings) == 1 and "train_01.jsonl.zst" in warnings[0]
    [change] = json.loads((run_dir / "run_info.json").read_text())["data_changes"]
    assert change["step"] == stopped and "train_01.jsonl.zst" in change["changes"][0]
    got, ref = metrics(run_dir), metrics(reference)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert [got[s]["loss"] for s in range(1, stopped + 1)] == [ref[s]["loss"] for s in range(1, stopped + 1)]
