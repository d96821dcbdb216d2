"""The GPU benchmark scripts, run small on the CPU: they must not fail on the GPU machine, where time is short.
The figures themselves are only meaningful on a GPU (docs/benchmarks.md)."""

from __future__ import annotations

import json

import pytest

from losslab.losses import LOSSES
from scripts import bench_loss, bench_model, profile_loss


def test_bench_loss_runs_and_checks_every_loss(tmp_path):
    out = tmp_path / "loss.json"
    argv = ["--device", "cpu", "--tokens", "64", "--dim", "16", "--vocab", "300", "--warmup", "0", "--iters", "1",
            "--train-step", "--preset", "debug", "--micro-batch", "2", "--seq", "16", "--json", str(out)]  # fmt: skip
    assert bench_loss.main(argv) == 0
    result = json.loads(out.read_text())
    skipped = [r for r in result["losses"] if "skipped" in r]  # no Liger off CUDA: one row that says why
    assert [(r["loss"], r["impl"], r["skipped"]) for r in skipped] == [("ce", "liger", "Liger's kernels need CUDA")]
    rows = [r for r in result["losses"] if "skipped" not in r]
    assert {(r["loss"], r["impl"]) for r in rows} == {
        (name, impl) for name in LOSSES for impl in ("fused", "fused-torch", "naive")
    }
    for r in rows:  # fused vs materialised, same bf16 inputs
        assert r["ms"] > 0 and max(r["loss_rel"], r["grad_h_rel"], r["grad_w_rel"]) < 2e-2, r
        assert r.get("kernel") == (None if r["impl"] == "naive" else "losslab.losses.rows:TorchRows")
    assert [r["loss"] for r in result["train_step"]] == ["ce", "mile", "ce", "mile"]


def test_bench_loss_times_the_fused_losses_next_to_f_cross_entropy_on_the_cpu(tmp_path):
    out = tmp_path / "speed.json"
    argv = ["--cpu-speed", "--tokens", "32", "64", "--dim", "8", "--vocab", "300", "--iters", "1",
            "--precision", "fp32", "bf16", "--json", str(out)]  # fmt: skip
    assert bench_loss.main(argv) == 0
    rows = json.loads(out.read_text())["cpu_speed"]
    impls = ["F.cross_entropy", "naive ce"] + [f"fused {n}" for n in bench_loss.CPU_SPEED_LOSSES]
    assert [(r["N"], r["precision"], r["impl"]) for r in rows] == [
        (n, p, i) for n in (32, 64) for p in ("fp32", "bf16") for i in impls
    ]
    for r in rows:
        assert r["ms"] > 0 and r["ms_min"] <= r["ms"] <= r["ms_max"]
        assert ("vs_F.cross_entropy" in r) == (r["impl"] == "fused ce")
        assert ("vs_fused_ce" in r) == (r["impl"].startswith("fused") and r["impl"] != "fused ce")


def test_bench_loss_compares_the_peak_memory_of_every_loss_on_the_cpu(tmp_path):
    out = tmp_path / "memory.json"
    argv = ["--cpu-memory", "--tokens", "64", "--dim", "16", "--vocab", "300", "--json", str(out)]
    assert bench_loss.main(argv) in (0, 1)  # 1: a loss above 1.10x fused CE's peak (a finding, not a crash)
    rows = json.loads(out.read_text())["cpu_memory"]
    assert {(r["loss"], r["modifiers"]) for r in rows} == {(name, m) for name in LOSSES for m in (False, True)}
    assert all(r["peak_mib"] > 0 for r in rows) and rows[0]["loss"] == "ce" and rows[0]["vs_ce"] == 1.0


def test_profile_loss_lists_the_operators_of_each_loss_and_precision(capsys):
    argv = ["--losses", "ce", "mile", "--tokens", "32", "--dim", "8", "--vocab", "300", "--iters", "1", "--top", "3"]
    assert profile_loss.main(argv) == 0
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith("| ce") or
            line.startswith("| mile")]  # fmt: skip
    assert [(r[0], r[1]) for r in rows] == [("| ce", "fp32"), ("| ce", "bf16"), ("| mile", "fp32"), ("| mile", "bf16")]
    for r in rows:
        assert float(r[2]) > 0 and r[3].count("`aten::") + r[3].count("`_Chunked") >= 1, r


def test_bench_model_runs_both_blocks_next_to_transformers(tmp_path):
    out = tmp_path / "model.json"
    argv = ["--device", "cpu", "--preset", "debug", "--modes", "eager", "--seq", "32", "--batches", "2", "--iters",
            "1", "--profile", "--profile-ops", "5", "--precision", "fp32", "bf16", "--json", str(out)]  # fmt: skip
    assert bench_model.main(argv) == 0
    rows = json.loads(out.read_text())
    assert {(r["impl"], r["block"], r["precision"]) for r in rows} == {
        (i, b, p) for i in ("losslab", "hf") for b in ("neox", "llama") for p in ("fp32", "bf16")
    }
    for r in rows:  # side by side: the ratio to HF's row of the same configuration, the top operators of each
        same = (r["block"], r["precision"])
        twin = next(t for t in rows if t["impl"] == "hf" and (t["block"], t["precision"]) == same)
        assert abs(r["vs_hf"] - r["tokens_per_s"] / twin["tokens_per_s"]) < 1e-9
        assert len(r["ops"]) == 5 and all(o["ms_per_step"] > 0 for o in r["ops"])
    assert all(r["micro_batch"] == 2 and r["tokens_per_s"] > 0 for r in rows)
    for block in ("neox", "llama"):  # the same shape on both sides
        assert len({r["params"] for r in rows if r["block"] == block}) == 1
    for r in rows:  # where the time goes, for the losslab rows
        assert ("time_share" in r) == (r["impl"] == "losslab")
        if "time_share" in r:
            assert abs(sum(r["time_share"].values()) - 1) < 1e-6 and r["time_share"].get("matmul", 0) > 0


def test_bench_checkpoint_runs_and_puts_the_checksums_back(tmp_path, capsys):
    from scripts import bench_checkpoint
    from trainer import checkpoint
    from trainer.checkpoint_io import FileDigests, HashingCheckpointEngine

    argv = ["--layers", "1", "--d-model", "64", "--vocab", "300", "--repeats", "1", "--out", str(tmp_path / "c")]
    assert bench_checkpoint.main(argv) == 0
    out = capsys.readouterr().out
    assert "xxh3_128" in out and "sha256" in out and "cost of checksums" in out
    assert checkpoint.HashingCheckpointEngine is HashingCheckpointEngine and checkpoint.FileDigests is FileDigests


@pytest.mark.slow
def test_bench_eval_compares_with_the_stock_tools_at_toy_size(corpus, tmp_path):
    """The three comparisons of issue #25 end to end on a toy model of SmolLM2's kind (GQA, tied, llama), one run
    a side: generation next to transformers' generate(), evaluate.py next to lm_eval --model hf on both task
    kinds (subprocesses, as a user runs them), and the fine-tuning step next to transformers."""
    from scripts import bench_eval

    out = tmp_path / "eval.json"
    argv = ["--model", "random:toy", "--tokenizer", corpus["tokenizer"], "--text", corpus["val"], "--work",
            str(tmp_path / "work"), "--runs", "1", "--gen-batches", "2", "5", "--gen-prompts", "5", "--gen-tokens",
            "4", "--ll-limit", "4", "--gen-limit", "3", "--eval-batch", "4", "--task-new-tokens", "4",
            "--cloze-docs", "8", "--train-batch", "2", "--train-seq", "16", "--threads", "1",
            "--json", str(out)]  # fmt: skip
    assert bench_eval.main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["part"], r.get("batch"), r.get("task"), r.get("precision")) for r in rows] == [
        ("generation", 2, None, None),
        ("generation", 5, None, None),
        ("evaluate", 4, "shakespeare_cloze", None),
        ("evaluate", 4, "shakespeare_dialogue", None),
        ("train_step", 2, None, "fp32"),
        ("train_step", 2, None, "bf16"),
    ]
    for r in rows:
        assert r["losslab"]["median"] > 0 and r["stock"]["median"] > 0
        assert abs(r["ratio"] - r["losslab"]["median"] / r["stock"]["median"]) < 1e-9
    gen = [r for r in rows if r["part"] == "generation"]
    assert all(r["equal_outputs"] and r["new_tokens"]["losslab"] == r["new_tokens"]["stock"] > 0 for r in gen)
    evals = [r for r in rows if r["part"] == "evaluate"]
    assert all(r["same_scores"] for r in evals)
    assert set(evals[0]["scores"]) == {"acc", "acc_norm"} and "rouge1" in evals[1]["scores"]
    for r in rows:  # the same model, batch and targets on both sides: the same loss before any update
        if r["part"] == "train_step":
            assert abs(r["first_loss"]["losslab"] - r["first_loss"]["stock"]) < 1e-3 * r["first_loss"]["stock"]
