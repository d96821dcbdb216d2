"""End-to-end through the real stack: DeepSpeed engine (gloo, CPU), sentencepiece, W&B offline, lm-eval."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from evals.results_store import latest
from evals.tasks import write_multiple_choice_task
from models.checkpoint import load_model, resolve_checkpoint
from tests.conftest import debug_overrides
from trainer.config import load_config
from trainer.loop import train

REPO = Path(__file__).resolve().parent.parent


def clean_env() -> dict[str, str]:
    """The pytest process holds a process group; a child must not join it."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    }
    env["WANDB_SILENT"] = "true"
    return env


@pytest.fixture(scope="module")
def mile_run(corpus, dist_env, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "mile"
    cfg = load_config(
        None, debug_overrides(corpus, run_dir, **{"loss.name": "mile", "checkpoint.every": 10, "wandb.mode": "offline"})
    )
    return train(cfg)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_debug_run_loss_falls(mile_run):
    rows = [r for r in read_metrics(mile_run.run_dir) if "loss" in r]
    assert [r["step"] for r in rows] == [5, 10, 15, 20, 25, 30]
    for key in ("step", "loss", "lr", "tokens", "tokens_per_s", "entropy", "weight"):
        assert key in rows[0]
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0, rows
    assert rows[-1]["tokens"] == 30 * 8 * 32
    # peak host memory of the process: more than the model and optimizer, less than this machine
    assert 0.05 < rows[-1]["perf/host_peak_gib"] < 64 and rows[-1]["perf/tflops_per_device"] > 0
    assert mile_run.final_loss == rows[-1]["loss"]


def test_run_outputs_describe_the_run(mile_run):
    run_dir = mile_run.run_dir
    assert load_config(run_dir / "config.yaml").loss.name == "mile"  # the resolved config loads back
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["git_sha"] and info["tokenizer_sha256"]
    meta = json.loads((mile_run.checkpoint / "meta.json").read_text())
    assert meta["step"] == 30 and meta["data_state"]["windows_consumed"] == 30 * 8
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    assert ckpts == ["step_0000020", "step_0000030"]  # keep=2
    assert list((run_dir / "wandb").glob("offline-run-*")), "W&B offline run written"
    assert (mile_run.checkpoint / "token_counts.safetensors").is_file()


def test_the_saved_config_reproduces_the_run(mile_run, tmp_path):
    """The resolved config.yaml alone trains the same run again: every logged loss is equal."""
    again = {"run.dir": str(tmp_path / "again"), "wandb.mode": "disabled", "eval.buckets": False,
             "checkpoint.every": 0, "checkpoint.at_end": False}  # fmt: skip
    train(load_config(mile_run.run_dir / "config.yaml", [f"{k}={v}" for k, v in again.items()]))
    first = {r["step"]: r["loss"] for r in read_metrics(mile_run.run_dir) if "loss" in r}
    second = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "again") if "loss" in r}
    assert second == first and len(first) == 6


def test_final_checkpoint_gets_rare_token_perplexity(mile_run):
    final = [r for r in read_metrics(mile_run.run_dir) if "eval_bucket/high_ppl" in r]
    assert len(final) == 1 and final[0]["step"] == 30
    row = final[0]
    total = sum(row[f"eval_bucket/{b}_tokens"] for b in ("high", "medium", "low"))
    assert total == row["eval_bucket/tokens"] > 0
    assert row["eval_bucket/high_ppl"] < row["eval_bucket/low_ppl"]  # frequent tokens are easier


def test_checkpoint_reload_gives_identical_logits(mile_run):
    model, ckpt = load_model(mile_run.run_dir)
    assert ckpt == resolve_checkpoint(mile_run.checkpoint)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = mile_run.model.eval().logits(ids)
        assert torch.equal(model.logits(ids), expected)


def test_deepspeed_checkpoint_loads_into_a_fresh_engine(mile_run, corpus):
    from losslab.losses import build_loss
    from models import GPT
    from trainer.config import model_config
    from trainer.engine import build_engine, build_optimizer
    from trainer.objective import CausalLMObjective
    from trainer.optim import build_scheduler, param_groups

    cfg = load_config(mile_run.run_dir / "config.yaml")
    torch.manual_seed(123)  # different init: the load must overwrite it
    model = GPT(model_config(cfg, mile_run.model.cfg.vocab_size))
    opt = build_optimizer(param_groups(model, cfg.train), cfg.train, cfg.distributed)
    objective = CausalLMObjective(model, build_loss(cfg.loss))
    engine = build_engine(objective, opt, build_scheduler(opt, cfg.train), cfg.train, cfg.distributed)
    path, client = engine.load_checkpoint(str(mile_run.run_dir / "checkpoints"), tag=mile_run.checkpoint.name)
    assert path is not None and client["losslab"]["tokens"] == 30 * 8 * 32
    ids = torch.randint(0, model.cfg.vocab_size, (2, 16))
    with torch.no_grad():
        assert torch.equal(model.eval().logits(ids), mile_run.model.eval().logits(ids))


def expected_accuracy(run_dir: Path, docs: list[dict]) -> float:
    """Multiple-choice accuracy computed directly: a document counts when its label's continuation has the
    highest summed log-probability (continuation tokens = those of context + choice after the context's)."""
    from data.tokenizer import Tokenizer

    model, ckpt = load_model(run_dir)
    tok = Tokenizer(str(ckpt / "tokenizer.model"))
    correct = 0
    for doc in docs:
        ctx = tok.encode(doc["context"])
        scores = []
        for choice in doc["choices"]:
            ids = tok.encode(doc["context"] + choice)
            with torch.no_grad():
                logp = torch.log_softmax(model.logits(torch.tensor([ids[:-1]])).double()[0], dim=-1)
            scores.append(sum(logp[i - 1, ids[i]].item() for i in range(len(ctx), len(ids))))
        correct += max(range(len(scores)), key=scores.__getitem__) == doc["label"]
    return correct / len(docs)


def test_evaluate_script_writes_results(mile_run, tmp_path):
    docs = [
        {"context": "The king loves", "choices": [" the crown", " zzz qqq"], "label": 0},
        {"context": "The king loves", "choices": [" the crown", " zzz qqq"], "label": 1},
        {"context": "A fool fears", "choices": [" the night", " the sea", " a letter"], "label": 2},
        {"context": "Her father serves", "choices": [" the duke", " his honour"], "label": 0},
        {"context": "My lord forgives", "choices": [" a soldier", " the queen"], "label": 1},
        {"context": "The old man remembers", "choices": [" the castle", " qq zz"], "label": 0},
    ]
    write_multiple_choice_task(tmp_path / "tasks", "toy_mc", docs)
    proc = subprocess.run(
        [sys.executable, "scripts/evaluate.py", "--checkpoint", str(mile_run.run_dir), "--tasks", "toy_mc",
         "--task-dir", str(tmp_path / "tasks")],
        cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = latest(mile_run.checkpoint).summary  # the newest evaluation: this one, beside training's
    assert results["step"] == 30 and results["n_samples"]["toy_mc"]["effective"] == 6
    assert results["metrics"]["toy_mc/acc"] == pytest.approx(expected_accuracy(mile_run.run_dir, docs), abs=1e-9)


def test_train_script_rejects_unknown_key_with_its_name(corpus, tmp_path):
    proc = subprocess.run(
        [sys.executable, "scripts/train.py", "configs/experiments/demo.yaml", "train.max_stepz=3"],
        cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "train.max_stepz" in proc.stderr and "max_steps" in proc.stderr


def test_train_script_end_to_end_with_in_loop_eval(corpus, tmp_path):
    docs = [{"context": "The king loves", "choices": [" the crown", " zzz qqq"], "label": 0} for _ in range(4)]
    write_multiple_choice_task(tmp_path / "tasks", "toy_mc", docs)
    overrides = debug_overrides(
        corpus,
        tmp_path / "run",
        **{"train.max_steps": 6, "eval.tasks": "[toy_mc]", "eval.task_dir": str(tmp_path / "tasks")},
    )
    proc = subprocess.run(
        [sys.executable, "scripts/train.py", "configs/experiments/demo.yaml", *overrides],
        cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "final training loss:" in proc.stdout and "eval toy_mc/acc:" in proc.stdout
    assert f"run directory: {(tmp_path / 'run').resolve()}" in proc.stdout
    # a second run into the same directory is refused unless asked for
    again = subprocess.run(
        [sys.executable, "scripts/train.py", "configs/experiments/demo.yaml", *overrides],
        cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert again.returncode == 2 and "run.overwrite=true" in again.stderr


def test_init_from_another_runs_weights(mile_run, corpus, tmp_path):
    from trainer.run import build_run

    cfg = load_config(None, debug_overrides(corpus, tmp_path / "warm", **{"model.init_from": str(mile_run.run_dir)}))
    run = build_run(cfg)
    ids = torch.randint(0, run.model.cfg.vocab_size, (2, 16))
    with torch.no_grad():
        assert torch.equal(run.model.eval().logits(ids), mile_run.model.eval().logits(ids))
    run.preemption.restore()
    bad = load_config(
        None,
        debug_overrides(corpus, tmp_path / "bad", **{"model.init_from": str(mile_run.run_dir), "model.d_model": 32}),
    )
    with pytest.raises(Exception, match=r"model\.d_model=32 disagrees with model\.init_from"):
        build_run(bad)


def test_benchmark_runs_can_skip_the_final_checkpoint(corpus, dist_env, tmp_path):
    overrides = {"train.max_steps": 4, "checkpoint.at_end": False, "eval.buckets": False}
    result = train(load_config(None, debug_overrides(corpus, tmp_path / "bench", **overrides)))
    assert result.steps == 4 and result.checkpoint is None
    assert not (tmp_path / "bench" / "checkpoints").exists()
    assert [r["step"] for r in read_metrics(tmp_path / "bench")] == [4]


def test_wandb_logging_without_the_package_fails_before_set_up(monkeypatch, tmp_path):
    import importlib.util

    from trainer.config import ConfigError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"wandb\.mode=offline needs the wandb package"):
        train(load_config(None, [f"run.dir={tmp_path}", "wandb.mode=offline"]))
    assert not (tmp_path / "metrics.jsonl").exists()
