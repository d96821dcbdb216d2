"""losslab.hf.patch under DeepSpeed ZeRO-3 through transformers' own integration, on the CPU (gloo): the head's
weight is partitioned (an empty placeholder) outside its call, tied to the embeddings, and the patched loss
must still train exactly as transformers' own cross-entropy does."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.test_train import REPO, clean_env

pytest.importorskip("transformers")
pytest.importorskip("deepspeed")


@pytest.mark.slow
def test_zero3_through_transformers_trains_as_its_own_loss(tmp_path):
    out = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
         "tests/dist/hf_zero3.py", str(out)],
        cwd=REPO, env={**clean_env(), "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["partitioned"]  # ZeRO-3 was on: the head's weight is gathered only around its call
    patched, plain = report["patched"], report["plain"]
    assert len(patched) == len(plain) == 3
    # step 1 is the loss of the same weights; steps 2 and 3 follow SGD updates (lr 0.5) from the gradients
    assert patched == pytest.approx(plain, rel=1e-5)
    assert abs(plain[2] - plain[0]) > 1e-2  # the updates moved the loss
