"""The GPU benchmark scripts, run small on the CPU: they must not fail on the GPU machine, where time is short.
The figures themselves are only meaningful on a GPU (docs/benchmarks.md)."""

from __future__ import annotations

import json

from scripts import bench_loss, bench_model
from trainer.losses import LOSSES


def test_bench_loss_runs_and_checks_every_loss(tmp_path):
    out = tmp_path / "loss.json"
    argv = ["--device", "cpu", "--tokens", "64", "--dim", "16", "--vocab", "300", "--warmup", "0", "--iters", "1",
            "--train-step", "--preset", "debug", "--micro-batch", "2", "--seq", "16", "--json", str(out)]  # fmt: skip
    assert bench_loss.main(argv) == 0
    result = json.loads(out.read_text())
    rows = result["losses"]
    assert {(r["loss"], r["impl"]) for r in rows} == {
        (name, impl) for name in LOSSES for impl in ("fused", "fused-torch", "naive")
    }
    for r in rows:  # fused vs materialised, same bf16 inputs
        assert r["ms"] > 0 and max(r["loss_rel"], r["grad_h_rel"], r["grad_w_rel"]) < 2e-2, r
    assert [r["loss"] for r in result["train_step"]] == ["ce", "mile", "ce", "mile"]


def test_bench_model_runs_both_blocks_next_to_transformers(tmp_path):
    out = tmp_path / "model.json"
    argv = ["--device", "cpu", "--preset", "debug", "--modes", "eager", "--seq", "32", "--batches", "2",
            "--iters", "1", "--profile", "--json", str(out)]  # fmt: skip
    assert bench_model.main(argv) == 0
    rows = json.loads(out.read_text())
    assert {(r["impl"], r["block"]) for r in rows} == {(i, b) for i in ("losslab", "hf") for b in ("neox", "llama")}
    assert all(r["micro_batch"] == 2 and r["tokens_per_s"] > 0 for r in rows)
    for block in ("neox", "llama"):  # the same shape on both sides
        assert len({r["params"] for r in rows if r["block"] == block}) == 1
    for r in rows:  # where the time goes, for the losslab rows
        assert ("time_share" in r) == (r["impl"] == "losslab")
        if "time_share" in r:
            assert abs(sum(r["time_share"].values()) - 1) < 1e-6 and r["time_share"].get("matmul", 0) > 0
