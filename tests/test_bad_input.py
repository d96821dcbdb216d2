"""Every bad input an operator met, through the scripts as they run them: one clear line naming the key or file
and exit 2 (no traceback), or — where it is data — skipped and counted while the run goes on."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import zstandard

from data.tokenizer import train_tokenizer
from tests.conftest import debug_overrides, flip, relist
from tests.corpus import documents
from tests.test_train import REPO, clean_env


def script(name: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, f"scripts/{name}", *args],
        cwd=REPO, env={**clean_env(), "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def train(overrides: list[str], config: str = "configs/experiments/demo.yaml") -> subprocess.CompletedProcess:
    return script("train.py", config, *overrides)


def assert_one_line(proc: subprocess.CompletedProcess, *names: str) -> None:
    """Exit 2, no traceback, and exactly one error line, which names what is wrong."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith(("error:", "config error:"))]
    assert len(errors) == 1, proc.stderr[-3000:]
    for name in names:
        assert name in errors[0], (name, errors[0])


@pytest.fixture(scope="module")
def ckpt(corpus, tmp_path_factory) -> Path:
    """A finished debug run's checkpoint, copied and damaged by the cases below."""
    run_dir = tmp_path_factory.mktemp("bad_input") / "good"
    proc = train(debug_overrides(corpus, run_dir, **{"train.max_steps": 4}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir / "checkpoints" / "step_0000004"


def copy_of(ckpt: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run" / "checkpoints" / ckpt.name
    shutil.copytree(ckpt, dst)
    return dst


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def garbage(path: Path) -> None:
    path.write_bytes(b"this is not what the file should hold\n" * 20)


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


class Evil:
    def __reduce__(self):
        return (print, ("this ran while loading a checkpoint",))


# name -> (command line overrides given the corpus, a scratch dir and a damaged copy of the checkpoint, names the
# error line must contain). Each is a mistake an operator made, as they made it.
CONFIG_CASES: dict[str, tuple[Callable[[Path], list[str]], tuple[str, ...]]] = {
    "negative lr": (lambda t: ["train.lr=-1e-3"], ("train.lr",)),
    "beta1 above 1": (lambda t: ["train.beta1=1.5"], ("train.beta1",)),
    "heads do not divide width": (lambda t: ["model.n_heads=5"], ("n_heads",)),
    "log_every 0": (lambda t: ["train.log_every=0"], ("train.log_every",)),
    "negative warmup": (lambda t: ["train.warmup_steps=-1"], ("train.warmup_steps",)),
    "negative weight decay": (lambda t: ["train.weight_decay=-0.1"], ("train.weight_decay",)),
    "negative grad clip": (lambda t: ["train.grad_clip=-1"], ("train.grad_clip",)),
    "negative checkpoint.every": (lambda t: ["checkpoint.every=-5"], ("checkpoint.every",)),
    "nan gamma": (lambda t: ["loss.gamma=nan"], ("loss.gamma",)),
    "garbage tokenizer": (lambda t: [f"data.tokenizer={write(t / 'tok.model', 'no model here')}"], ("tok.model",)),
    "missing train file": (lambda t: [f"data.train_files=[{t}/nothing.jsonl.zst]"], ("nothing.jsonl.zst",)),
    "missing val file": (lambda t: [f"data.val_files=[{t}/held_out.jsonl.zst]"], ("held_out.jsonl.zst",)),
    "plug-in callback's argument misspelt": (
        lambda t: ["run.callbacks.fault.target=tests.faults:SigtermAt", "run.callbacks.fault.steps=[3]"],
        ("run.callbacks.fault", "steps"),
    ),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_config_mistakes_are_one_line(case, corpus, tmp_path):
    make, names = CONFIG_CASES[case]
    proc = train(debug_overrides(corpus, tmp_path / "run") + make(tmp_path))
    assert_one_line(proc, *names)
    assert not (tmp_path / "run").exists()  # refused before anything ran: not even the run directory is left


def test_yaml_syntax_error_names_the_file_and_line(tmp_path):
    bad = write(tmp_path / "exp.yaml", "train:\n  lr: [3e-4\n  max_steps: 10\n")
    assert_one_line(train([], config=bad), "exp.yaml", "line")


def test_includes_written_as_a_string_is_refused(tmp_path):
    bad = write(tmp_path / "exp.yaml", "includes: loss/mile.yaml\n")
    assert_one_line(train([], config=bad), "includes", "list")


def test_a_typo_in_an_eval_task_fails_before_training(corpus, tmp_path):
    from evals.tasks import write_multiple_choice_task

    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    write_multiple_choice_task(task_dir, "cloze", [{"context": "a b", "choices": [" c", " d"], "label": 0}])
    proc = train(debug_overrides(corpus, tmp_path / "run", **{"eval.tasks": "[cloz]", "eval.task_dir": task_dir}))
    assert_one_line(proc, "eval.tasks", "cloz")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.fixture(scope="module")
def other_tokenizer(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("other_tok")
    return train_tokenizer((d["text"] for d in documents(60, seed=5)), str(root / "other"), vocab_size=300)


def test_resume_with_another_tokenizer_is_refused(ckpt, corpus, other_tokenizer, tmp_path):
    copy = copy_of(ckpt, tmp_path)
    proc = train(debug_overrides(corpus, tmp_path / "new", **{"train.resume": copy, "data.tokenizer": other_tokenizer}))
    assert_one_line(proc, "train.resume", "vocab_size")


def test_resume_into_another_model_shape_is_refused(ckpt, corpus, tmp_path):
    copy = copy_of(ckpt, tmp_path)
    proc = train(debug_overrides(corpus, tmp_path / "new", **{"train.resume": copy, "model.d_model": 128}))
    assert_one_line(proc, "train.resume", "d_model")


def test_init_from_with_another_tokenizer_is_refused(ckpt, corpus, other_tokenizer, tmp_path):
    proc = train(
        debug_overrides(corpus, tmp_path / "new", **{"model.init_from": ckpt, "data.tokenizer": other_tokenizer})
    )
    assert_one_line(proc, "model.init_from", "data.tokenizer")


DAMAGED_WEIGHTS = {"truncated": truncate, "not safetensors": garbage, "bytes flipped": flip}


@pytest.mark.parametrize("damage", list(DAMAGED_WEIGHTS))
def test_damaged_weights_are_one_line_everywhere(damage, ckpt, corpus, tmp_path):
    copy = copy_of(ckpt, tmp_path)
    DAMAGED_WEIGHTS[damage](copy / "model.safetensors")
    assert_one_line(script("evaluate.py", "--checkpoint", str(copy), "--val-files", corpus["val"]), "model.safetensors")
    assert_one_line(
        script("export_hf.py", "--checkpoint", str(copy), "--out", str(tmp_path / "hf")), "model.safetensors"
    )
    proc = train(debug_overrides(corpus, tmp_path / "new", **{"model.init_from": copy}))
    assert_one_line(proc, "model.safetensors")


def test_evaluate_refuses_a_tokenizer_that_is_not_the_models(ckpt, corpus, other_tokenizer, tmp_path):
    copy = copy_of(ckpt, tmp_path)
    shutil.copyfile(other_tokenizer, copy / "tokenizer.model")
    damaged = script("evaluate.py", "--checkpoint", str(copy), "--val-files", corpus["val"])
    assert_one_line(damaged, "tokenizer.model", "written with")  # not the file the checkpoint was written with
    relist(copy / "tokenizer.model")  # replaced on purpose, the file list made to agree: the vocabulary still tells
    proc = script("evaluate.py", "--checkpoint", str(copy), "--val-files", corpus["val"])
    assert_one_line(proc, "tokenizer.model", "300")


def _states_file(ckpt: Path) -> Path:
    return next(ckpt.glob("*model_states.pt"))


DAMAGED_STATES: dict[str, tuple[Callable[[Path], None], tuple[str, ...]]] = {
    "truncated": (truncate, ("model_states.pt",)),
    "missing": (lambda p: p.unlink(), ("model_states.pt",)),
    "bytes flipped": (flip, ("model_states.pt", "checksum")),
    # a crafted file, with the checkpoint's file list made to agree (as whoever crafted it would)
    "holds code": (lambda p: _replace_listed(p, lambda: torch.save({"module": Evil()}, p)), ("refusing", "'print'")),
}


def _replace_listed(path: Path, write: Callable[[], None]) -> None:
    write()
    relist(path)


@pytest.mark.parametrize("damage", list(DAMAGED_STATES))
def test_resume_from_damaged_deepspeed_state_is_one_line(damage, ckpt, corpus, tmp_path):
    copy = copy_of(ckpt, tmp_path)
    make, names = DAMAGED_STATES[damage]
    make(_states_file(copy))
    proc = train(debug_overrides(corpus, tmp_path / "new", **{"train.resume": copy, "train.extend_to": 30}))
    assert_one_line(proc, *names)
    assert "this ran while loading" not in proc.stdout + proc.stderr
    assert "weights_only" not in proc.stderr  # torch's advice to load unsafely is not passed on


def test_verify_names_each_damaged_file_without_loading_the_checkpoint(ckpt, tmp_path):
    intact = script("verify_checkpoint.py", str(ckpt))
    assert intact.returncode == 0 and intact.stdout.startswith(f"ok: {ckpt} ("), intact.stdout + intact.stderr
    copy = copy_of(ckpt, tmp_path)
    flip(_states_file(copy))
    flip(copy / "model.safetensors")
    proc = subprocess.run(
        [sys.executable, "-m", "losslab", "verify", str(copy.parent.parent)],  # a run directory, through the CLI
        cwd=REPO, env={**clean_env(), "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    errors = proc.stderr.splitlines()
    assert len(errors) == 2 and all(e.startswith("error:") and "checksum" in e for e in errors), errors
    assert {"model.safetensors", _states_file(copy).name} == {e.split(":")[1].rsplit("/", 1)[-1] for e in errors}


def test_a_checkpoint_from_before_checksums_is_read_as_unverified(ckpt, tmp_path):
    copy = copy_of(ckpt, tmp_path)
    meta = json.loads((copy / "meta.json").read_text())
    for key in ("digests", "digest", "meta_digest"):  # what a checkpoint written before checksums holds
        del meta[key]
    (copy / "meta.json").write_text(json.dumps(meta))
    verified = script("verify_checkpoint.py", str(copy))
    assert verified.returncode == 0 and verified.stdout.startswith(f"unverified: {copy}"), verified.stdout
    exported = script("export_hf.py", "--checkpoint", str(copy), "--out", str(tmp_path / "hf"))
    assert exported.returncode == 0, exported.stderr[-2000:]
    assert f"warning: {copy} was written before checkpoints carried checksums" in exported.stderr


def test_bad_documents_and_empty_shards_are_skipped_and_counted(corpus, tmp_path):
    shard = tmp_path / "odd.jsonl.zst"
    lines = [json.dumps({"text": "\ud800 a lone surrogate is valid JSON, not text"})]  # escaped: "\\ud800"
    lines += [json.dumps(d) for d in documents(20, seed=9)]
    shard.write_bytes(zstandard.ZstdCompressor().compress(("\n".join(lines) + "\n").encode()))
    (tmp_path / "empty.jsonl.zst").write_bytes(b"")
    files = f"[{corpus['train_glob']},{shard},{tmp_path / 'empty.jsonl.zst'}]"
    run_dir = tmp_path / "run"
    proc = train(debug_overrides(corpus, run_dir, **{"data.train_files": files, "train.max_steps": 40}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if "loss" in r][-1]
    assert last["data/bad_utf8"] == 1 and last["data/corrupt_files"] == 1, last


def test_infinite_lr_stops_with_the_nonfinite_error(corpus, tmp_path):
    run_dir = tmp_path / "run"
    proc = train(debug_overrides(corpus, run_dir, **{"train.lr": "inf", "train.log_every": 1}))
    assert proc.returncode == 3 and "not finite" in proc.stderr, proc.stderr[-2000:]
    result = json.loads((run_dir / "result.json").read_text())
    assert result["complete"] is False and "not finite" in result["error"]


def test_prepare_data_reports_an_unwritable_output_and_cleans_up(corpus, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the output folder should go")
    proc = script("prepare_data.py", "--files", corpus["train_glob"], "--tokenizer", corpus["tokenizer"],
                  "--out", str(blocker / "prepared"), "--workers", "0")  # fmt: skip
    assert_one_line(proc, str(blocker))
    # what a killed run leaves (a folder named after a process that no longer exists) is cleared by the next
    stale = tmp_path / ".prepared.tmp-999999999"
    stale.mkdir()
    out = tmp_path / "prepared"
    proc = script("prepare_data.py", "--files", corpus["train_glob"], "--tokenizer", corpus["tokenizer"],
                  "--out", str(out), "--workers", "0")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not stale.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["file", "prepared"]
