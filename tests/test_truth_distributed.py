"""The training loop's normalisation across ranks and micro-steps, pinned to one float64 computation.

Two gloo ranks, gradient accumulation 2, fine-tuning batches whose prompts carry no loss (a different number of
ignored labels on each rank and micro-step): the logged loss, the logged gradient norm and the gradients the
optimizer receives equal a single-process float64 computation over the whole global batch — for CE (the loop's
global-token denominator) and MiLe (the official rank-averaged normaliser). The tolerance is far tighter than
the distance to the plausible wrong normalisers (each rank's own token mean, each micro-step's own mean), which
the report also computes.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.test_train import REPO, clean_env

LOSS_RTOL = 4e-7  # fp32 sums over ~90 tokens (measured: under 1e-7)
GRAD_RTOL = 1e-5  # fp32 gradients relative to the largest component


@pytest.fixture(scope="module")
def reports(corpus, tmp_path_factory) -> list[dict]:
    root = tmp_path_factory.mktemp("loop_normaliser")
    out = root / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "tests/dist/loop_normaliser.py", str(out), corpus["tokenizer"], corpus["train_glob"], str(root / "runs")],
        cwd=REPO, env={**clean_env(), "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    reports = json.loads(out.read_text())
    assert len(reports) == 2
    return reports


@pytest.mark.parametrize("loss", ["ce", "mile"])
def test_two_ranks_with_accumulation_and_ignored_labels_equal_one_float64_batch(reports, loss):
    for rank, report in enumerate(reports):
        r = report[loss]
        assert r["valid_tokens"] == 2 * 2 * 3 * 8 - 10  # the hand-made global batch, with its 10 ignored labels
        assert abs(r["loss"] - r["ref"]) <= LOSS_RTOL * abs(r["ref"]), (rank, r)
        assert r["grad_err"] <= GRAD_RTOL * r["grad_scale"], (rank, r)
        assert r["grad_norm"] == pytest.approx(r["ref_grad_norm"], rel=GRAD_RTOL), (rank, r)  # of the global gradient
        # the test can tell the right normaliser from the plausible wrong ones by a wide margin
        for name, alt in r["alternatives"].items():
            assert abs(alt - r["ref"]) > 100 * LOSS_RTOL * abs(r["ref"]), (rank, name, alt, r["ref"])
    assert reports[0][loss]["loss"] == reports[1][loss]["loss"]  # every rank logs the same value
