"""Held-out loss per domain in the training loop (``eval.val_every``), against a direct computation."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from evals.domains import build_domain_set, domain_losses
from evals.heldout import SampleSpec, pack, sample_held_out
from models import GPT, GPTConfig
from tests.conftest import debug_overrides
from tests.test_train import REPO, clean_env


def test_domain_losses_equal_a_direct_computation(corpus):
    from data.tokenizer import Tokenizer

    tok = Tokenizer(corpus["tokenizer"])
    held, pieces = sample_held_out([corpus["val"]], tok, 32, SampleSpec(tokens=1200, tokens_per_domain=300))
    inputs = pack(held, pieces, tok.eos_id)
    held_out = build_domain_set(held, inputs)
    assert held_out.names == ["Plays", "Poems"]  # the test corpus's two pile_set_names
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=384, n_layers=2, d_model=32, n_heads=4, d_mlp=64, max_seq_len=64)).double()
    got = domain_losses(model, held_out, batch_size=5)
    with torch.no_grad():
        logits = model(held_out.windows[:, :-1]) @ model.head.weight[:384].T  # [n, T, V]
        ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), held_out.windows[:, 1:], reduction="none")
    # each target token's domain, from its document in the set (padding after the last document: none)
    target_doc = inputs.document[:, 1:]
    of_doc = {i: d.domain for i, d in enumerate(held.documents)}
    for name in held_out.names:
        mine = ce[torch.tensor([[of_doc.get(int(j)) == name for j in row] for row in target_doc])]
        assert got[f"{name}/loss"] == pytest.approx(mine.mean().item(), rel=1e-9)
        assert got[f"{name}/tokens"] == mine.numel() > 0
        # every sampled document of the domain counts: its tokens (less the ones that open a window)
        assert mine.numel() == sum(d.tokens for d in held.documents if d.domain == name) - sum(
            of_doc[int(j)] == name for j in inputs.document[:, 0])  # fmt: skip
    scored = target_doc >= 0
    assert got["overall"] == pytest.approx(ce[scored].mean().item(), rel=1e-9)  # the domains weighted by tokens
    losses = [got[f"{n}/loss"] for n in held_out.names]
    assert got["average"] == pytest.approx(sum(losses) / 2) and got["worst"] == max(losses)


@pytest.mark.parametrize("zero_stage", [0, 3])
def test_validation_runs_in_the_loop_under_each_layout(zero_stage, corpus, tmp_path):
    run_dir = tmp_path / f"z{zero_stage}"
    extra = {"eval.val_every": 5, "train.max_steps": 10, "distributed.zero_stage": zero_stage}
    args = debug_overrides(corpus, run_dir, **extra)
    proc = subprocess.run(
        [sys.executable, "scripts/train.py", "configs/experiments/demo.yaml", *args],
        cwd=REPO, env={**clean_env(), "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    val = {r["step"]: r for r in rows if "eval_domain/overall" in r}
    assert sorted(val) == [5, 10] and val[10]["eval_domain/overall"] < val[5]["eval_domain/overall"]
