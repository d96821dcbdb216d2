from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.test_train import REPO, clean_env


def test_rank_averaged_normaliser_two_gloo_ranks(tmp_path: Path):
    out = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "tests/dist/loss_normaliser.py", str(out)],
        cwd=REPO, env={**clean_env(), "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = json.loads(out.read_text())
    assert len(reports) == 2
    for rank_report in reports:
        for key, r in rank_report.items():
            assert abs(r["loss"] - r["ref"]) < 1e-9 * abs(r["ref"]), key
            assert r["grad_h_err"] < 1e-12 and r["grad_w_err"] < 1e-12, key
    # the ranks' normalisers differ (rank 0 has ignored positions), so the averaging is visible in the value
    assert abs(reports[0]["mile/true"]["loss"] - reports[0]["mile/true"]["local_only"]) > 1e-6
