"""Run records that cannot lie (#33), driven through the scripts on real run directories: a relaunch that would
splice two experiments is refused, settings that change no math may change and are recorded, an extension is an
explicit act recorded where the run's outputs are read, a finished run stays finished, and the small lies
(warmup as long as the run, a single path for a list key, DeepSpeed's accelerator notice in commands that do not
train, files unreadable to others, the MLP width of --list, the fine-tuning demo's output directory)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from models.presets import PRESETS
from tests.conftest import debug_overrides
from tests.faults import nan_at, sigterm_at
from tests.test_train import REPO, clean_env
from trainer.config import RunConfig, load_config
from trainer.optim import lr_factor
from trainer.resume_check import DERIVED, EXPERIMENT, FREE, KEY_CLASSES, LAUNCH, flatten, key_class

LR, WARMUP = 3e-3, 5  # debug_overrides'
ACCELERATOR_NOTICE = "Setting accelerator to CPU"


def script(name: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """A command as a user runs it, under the usual umask (so that a file written 0600 shows)."""
    return subprocess.run(
        [sys.executable, f"scripts/{name}", *args], cwd=REPO, env={**clean_env(), "OMP_NUM_THREADS": "1"},
        capture_output=True, text=True, timeout=timeout, preexec_fn=lambda: os.umask(0o022),
    )  # fmt: skip


def train(corpus, run_dir: Path, *args: str, **extra) -> subprocess.CompletedProcess:
    common = {"train.max_steps": 20, "checkpoint.every": 10, "checkpoint.keep": 0, **extra}
    return script("train.py", "configs/experiments/demo.yaml", *debug_overrides(corpus, run_dir, **common), *args)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """Every file's content hash and modification time — the run's record; not ``run.lock``, which each launch
    takes (and writes its holder into) before it can look at the run (trainer/lock.py)."""
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "run.lock"}  # fmt: skip


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def launches(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "run_info.json").read_text())["launches"]


@pytest.fixture(scope="module")
def finished(corpus, tmp_path_factory) -> Path:
    """A debug run pre-empted at step 10, then continued to its end (20 steps) with settings that change no math
    changed: the relaunch a pre-empted job gets."""
    run_dir = tmp_path_factory.mktemp("records") / "run"
    first = ok(train(corpus, run_dir, **sigterm_at(10)))
    assert "pre-empted after step 10" in first.stdout
    second = ok(train(corpus, run_dir, **{"train.resume": "auto", "train.log_every": 2, "checkpoint.keep": 3}))
    assert "resumed from" in second.stdout
    assert "train.log_every: 5 -> 2" in second.stdout  # said on the console
    return run_dir


def copy(run_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run_dir, dst, symlinks=True)
    return dst


def test_every_config_key_is_classified():
    """A key added to the schema must be classified here (trainer/resume_check.py) before a resume can judge it."""
    keys = set(flatten(RunConfig()))
    assert keys - set(KEY_CLASSES) == set(), "unclassified: add them to KEY_CLASSES"
    assert set(KEY_CLASSES) - keys == set(), "classified keys that are not in the schema"
    assert set(KEY_CLASSES.values()) == {EXPERIMENT, FREE, LAUNCH}
    # the experiment, as the issue lists it, is refused when changed
    for key in ("model.d_model", "loss.name", "data.train_files", "train.lr", "train.max_steps",
                "train.warmup_steps", "train.seed", "train.beta2"):  # fmt: skip
        assert KEY_CLASSES[key] == EXPERIMENT, key
    # a loss's own parameters (declared with its class) are flat keys of the experiment, whichever loss runs
    assert "loss.gamma" in flatten(load_config(None, ["loss.name=mile"]))
    for key in ("loss.gamma", "loss.alpha", "loss.keep_ratio"):
        assert key_class(key) == EXPERIMENT, key
    for key in ("train.log_every", "eval.limit", "checkpoint.every", "data.num_workers", "wandb.mode"):
        assert KEY_CLASSES[key] == FREE, key
    assert DERIVED == ("train.global_batch_size (resolved)", "train.precision (resolved)",
                       "run.callbacks (those that change training)")  # fmt: skip


def test_a_resume_records_what_changed(finished):
    first, second = launches(finished)
    assert (first["start_step"], first["resumed_from"], first["changed"]) == (1, None, {})
    assert second["start_step"] == 11 and second["resumed_from"].endswith("step_0000010")
    fault = {"sigterm_at": {"target": "tests.faults:SigtermAt", "step": 10}}  # a pre-emption changes no step
    changed = {"train.log_every": [5, 2], "checkpoint.keep": [0, 3], "run.callbacks": [fault, {}]}
    assert second["changed"] == changed
    assert "extended" not in second and second["precision"] == "fp32" and second["max_steps"] == 20
    result = json.loads((finished / "result.json").read_text())
    losses = [r["loss"] for r in rows(finished) if "loss" in r]
    assert result["complete"] and result["steps"] == 20 and result["final_loss"] == losses[-1]


def test_a_relaunch_that_changes_the_experiment_is_refused_and_touches_nothing(finished, corpus, tmp_path):
    run_dir = copy(finished, tmp_path)
    before = snapshot(run_dir)
    proc = train(corpus, run_dir, **{"train.resume": "auto", "loss.name": "pdl", "train.max_steps": 30,
                                     "train.seed": 1, "train.micro_batch_size": 4, **nan_at(25)})  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("config error:")]
    nan = """run.callbacks (those that change training): [] -> ['{"steps": [25], "target": "tests.faults:NanAt"}']"""
    for part in ("loss.name: 'mile' -> 'pdl'", "train.max_steps: 20 -> 30", "train.seed: 0 -> 1",
                 "train.global_batch_size (resolved): 8 -> 4", "train.extend_to=30", nan):  # fmt: skip
        assert part in line, (part, line)
    assert "train.micro_batch_size" not in line  # how the batch is split is free; the batch itself is not
    assert snapshot(run_dir) == before


def test_a_finished_run_relaunched_does_nothing(finished, corpus, tmp_path):
    run_dir = copy(finished, tmp_path)
    before = snapshot(run_dir)
    proc = ok(train(corpus, run_dir, **{"train.resume": "auto", "eval.limit": 3}))
    assert "holds a finished run (20 steps" in proc.stdout and "nothing to do" in proc.stdout, proc.stdout
    assert "eval.limit: 0 -> 3" in proc.stdout and "train.extend_to=N" in proc.stdout
    assert snapshot(run_dir) == before  # result.json included: never rewritten with less
    # a checkpoint at its run's last step has nothing left to train, into any directory
    proc = train(corpus, tmp_path / "other", **{"train.resume": str(run_dir / "checkpoints" / "step_0000020")})
    assert proc.returncode == 2 and "nothing left to train" in proc.stderr and "train.extend_to" in proc.stderr


def test_extending_a_run_is_recorded_and_survives_a_preemption(finished, corpus, tmp_path):
    run_dir = copy(finished, tmp_path)
    extend = {"train.resume": "auto", "train.extend_to": 30, "wandb.mode": "offline"}
    # pre-empted at the first new step, before it logs: result.json keeps the run's last loss
    first = ok(train(corpus, run_dir, **extend, **sigterm_at(21)))
    new_lr = LR * lr_factor(20, warmup=WARMUP, total=30, min_ratio=0.0)
    said = "extending the run: train.max_steps 20 -> 30 from step 21; the LR schedule is now that of a 30-step run"
    assert said in first.stdout and f"0.000e+00 under the old schedule -> {new_lr:.3e}" in first.stdout
    result = json.loads((run_dir / "result.json").read_text())
    assert not result["complete"] and result["steps"] == 21
    assert result["final_loss"] == [r for r in rows(run_dir) if "loss" in r][-1]["loss"]  # step 20's, not null
    # relaunched with the same command: continues the extended run, records the extension once
    second = ok(train(corpus, run_dir, **extend))
    assert "resumed from" in second.stdout and "extending the run" not in second.stdout
    extended = [r for r in rows(run_dir) if "launch/extended_to_max_steps" in r]
    assert extended == [{"step": 21, "launch/extended_from_max_steps": 20, "launch/extended_to_max_steps": 30,
                         "launch/lr_old_schedule": 0.0, "launch/lr_new_schedule": new_lr}]  # fmt: skip
    record = [x["extended"] for x in launches(run_dir) if "extended" in x]
    assert record == [{"step": 20, "old_max_steps": 20, "new_max_steps": 30, "old_lr": 0.0, "new_lr": new_lr}]
    assert [x["start_step"] for x in launches(run_dir)] == [1, 11, 21, 22]
    lr = {r["step"]: r["lr"] for r in rows(run_dir) if "lr" in r}
    for step in (25, 30):  # a 30-step run's schedule from step 21 on (logged: the LR after the step's update)
        assert lr[step] == pytest.approx(LR * lr_factor(step, warmup=WARMUP, total=30, min_ratio=0.0), abs=1e-12)
    assert "max_steps: 30" in (run_dir / "config.yaml").read_text()
    assert json.loads((run_dir / "result.json").read_text())["complete"]
    streams = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))  # one per launch, one W&B run

    def logged() -> bool:
        return any(b"launch/extended_to_max_steps" in s.read_bytes() for s in streams)

    deadline = time.monotonic() + 60
    while not logged() and time.monotonic() < deadline:
        time.sleep(0.5)  # W&B's service process writes the stream on its own
    assert logged() and not any(b"train/launch/" in s.read_bytes() for s in streams)  # its own W&B section
    # the same command once more: finished, nothing to do
    assert "nothing to do" in ok(train(corpus, run_dir, **extend)).stdout
    # a run is never shortened
    proc = train(corpus, run_dir, **{"train.resume": "auto", "train.extend_to": 25})
    assert proc.returncode == 2 and "never shortened" in proc.stderr


def modes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): oct(stat.S_IMODE(p.stat().st_mode)) for p in root.rglob("*") if p.is_file()}


def test_commands_that_do_not_train_say_nothing_of_deepspeed_and_files_follow_the_umask(finished, corpus, tmp_path):
    """Every file of the run (written under umask 022) is 0644, every checkpoint directory 0755, and so are HF
    exports and imports — the safetensors library alone writes 0600."""
    ckpts = finished / "checkpoints"
    assert set(modes(finished).values()) == {"0o644"}, modes(finished)
    assert {oct(stat.S_IMODE(p.stat().st_mode)) for p in ckpts.iterdir() if p.is_dir()} == {"0o755"}
    run_dir = copy(finished, tmp_path)
    listing = ok(script("train.py", "--list"))
    debug = PRESETS["debug"]
    assert f"MLP {debug.d_mlp('neox')} (neox, GELU) / {debug.d_mlp('llama')} (llama, SwiGLU)" in listing.stdout
    commands = [
        listing,
        ok(script("train.py", "--help")),
        printed := ok(script("train.py", "configs/experiments/demo.yaml", "--print-config")),
        ok(script("evaluate.py", "--checkpoint", str(run_dir), "--val-files", corpus["val"])),
        ok(script("export_hf.py", "--checkpoint", str(run_dir), "--out", str(tmp_path / "hf"))),
        ok(script("import_hf.py", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "imported"))),
        ok(script("compare_runs.py", str(run_dir), "--out", str(tmp_path / "report"))),
        ok(script("generation_table.py", str(run_dir))),
        ok(script("fetch_eval_data.py", "--help")),
        ok(script("fetch_smollm2.py", "--help")),
    ]
    for proc in commands:
        assert ACCELERATOR_NOTICE not in proc.stdout + proc.stderr, proc.args
    for out in ("hf", "imported"):
        assert set(modes(tmp_path / out).values()) == {"0o644"}, modes(tmp_path / out)
    assert "warning" not in printed.stderr  # the demo's warmup (30 of 500 steps) is sensible


def test_warmup_as_long_as_the_run_warns_and_a_list_key_takes_one_path(corpus, tmp_path):
    shard = corpus["val"]
    exp = tmp_path / "exp.yaml"
    exp.write_text(f"includes: [loss/ce.yaml]\ndata:\n  val_files: {shard}\neval:\n  tasks: quick\n")
    proc = ok(script("train.py", str(exp), f"data.train_files={shard}", "data.sft_files=", "train.max_steps=3",
                     "train.warmup_steps=5", "--print-config"))  # fmt: skip
    (tmp_path / "printed.yaml").write_text(proc.stdout)
    printed = load_config(tmp_path / "printed.yaml")  # the resolved config loads back to itself
    assert printed.data.train_files == [shard] and printed.data.val_files == [shard]
    assert printed.data.sft_files == [] and printed.eval.tasks == ["quick"]
    (warning,) = [x for x in proc.stderr.splitlines() if x.startswith("warning:")]
    assert "train.warmup_steps=5 >= the run's 3 steps" in warning and "never decays" in warning


def test_the_finetuning_demo_and_table_take_an_output_directory(finished, tmp_path):
    out = tmp_path / "out"
    for name in ("ce", "pdl_a1"):
        shutil.copytree(finished, out / name, symlinks=True)
    table = ok(script("generation_table.py", str(out))).stdout
    assert "| ce | mile |" in table and "| pdl_a1 | mile |" in table  # every run of the directory
    for args, message in ((["run.dir=x"], "use --out DIR"), (["--out"], "--out needs a directory")):
        proc = subprocess.run(["bash", "scripts/finetune_demo.sh", *args], cwd=REPO, capture_output=True, text=True,
                              timeout=60)  # fmt: skip
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr  # refused before any set-up
