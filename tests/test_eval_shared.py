"""In-loop evaluation shared by every rank (evals/distributed.py): two gloo ranks under the deepspeed launcher,
ZeRO-3 (each rank holds a shard of the weights; the forward passes gather them; the head reads the tied embedding,
which ZeRO-3 gathers as an external parameter), score a log-likelihood and a generation task and the held-out
buckets exactly as one process scoring the same checkpoint alone."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from evals.buckets import per_token_loss
from evals.generation import write_generation_task
from evals.results_store import SAMPLES_FILE, find_results, latest
from evals.tasks import write_multiple_choice_task
from models import GPT
from models.config import GPTConfig
from tests.test_distributed import common, launch
from tests.test_train import REPO, clean_env


@pytest.mark.slow
def test_two_ranks_share_the_in_loop_evaluation_and_score_as_one(corpus, tmp_path):
    tasks = tmp_path / "tasks"
    # 7 documents of 2 or 3 choices (17 requests: an odd count, shares of 9 and 8) and 5 prompts
    docs = [{"context": c, "choices": [" the crown", " zzz", " of the king"][: 2 + i % 2], "label": i % 2}
            for i, c in enumerate(["The king loves", "A fool", "My lord", "The duke", "Her father", "The queen",
                                   "Good night"])]  # fmt: skip
    write_multiple_choice_task(tasks, "toy_mc", docs)
    prompts = ["The king loves", "A fool fears", "My lord serves the", "The duke", "Her father"]
    write_generation_task(tasks, "toy_gen", [{"prompt": p, "response": "the crown in the morning."} for p in prompts],
                          until=["."], max_gen_toks=6)  # fmt: skip
    run_dir = tmp_path / "eval2"
    extra = {"train.max_steps": 4, "checkpoint.every": 2, "eval.every_checkpoint": True,
             "eval.tasks": "[toy_mc,toy_gen]", "eval.task_dir": str(tasks), "eval.batch_size": 4,
             "distributed.zero_stage": 3, "loss.name": "mile", "model.tie_embeddings": True}  # fmt: skip
    proc = launch(2, common(corpus, run_dir, **extra), launcher="deepspeed", timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval/toy_mc/acc" in r] == [2, 4]
    ckpt = run_dir / "checkpoints" / "step_0000004"
    in_loop = latest(ckpt)
    assert in_loop is not None and in_loop.complete and in_loop.source == "training"
    shared, shared_samples = in_loop.summary, in_loop.json(SAMPLES_FILE)
    assert "held-out loss" in shared["parts"]  # the held-out buckets, scored in blocks by both ranks
    # each rank scored about half of the requests of each type
    assert shared["shared"]["world_size"] == 2
    assert shared["shared"]["requests"] == {"loglikelihood": [9, 8], "generate_until": [3, 2]}

    one = subprocess.run([sys.executable, "scripts/evaluate.py", "--checkpoint", str(ckpt), "--tasks",
                          "toy_mc,toy_gen", "--task-dir", str(tasks), "--batch-size", "4", "--device", "cpu",
                          "--val-files", corpus["val"]],
                         cwd=REPO, env={**clean_env(), "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    # the same settings (tasks, shots, limit, lm-eval, the run's held-out set): the same key, its folder replaced
    (again,) = find_results(ckpt)
    assert again.key == in_loop.key and again.source == "evaluate" and again.complete
    alone = again.summary
    assert "shared" not in alone
    assert {k for k in alone["metrics"] if k.startswith("bucket/")}, "the held-out buckets were not scored"
    assert set(shared["metrics"]) == set(alone["metrics"])
    for key, value in alone["metrics"].items():
        assert shared["metrics"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    # the same documents, the same generated text and per-document scores
    alone_samples = again.json(SAMPLES_FILE)
    assert shared_samples["toy_gen"]["output"] == alone_samples["toy_gen"]["output"]
    assert shared_samples["toy_mc"]["acc"] == alone_samples["toy_mc"]["acc"]


BLOCKS = """
import sys, torch, torch.distributed as dist
from evals.distributed import shared_per_token_loss
from tests.test_eval_shared import tiny_model
dist.init_process_group("gloo")
windows, lengths = torch.load(sys.argv[1])
loss, targets, counts = shared_per_token_loss(tiny_model(), windows, 2, lengths=lengths, progress="held-out loss")
if dist.get_rank() == 0:
    torch.save((loss, targets, counts), sys.argv[2])
dist.destroy_process_group()
"""


def tiny_model() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=50, n_layers=2, d_model=32, n_heads=4, d_mlp=64, max_seq_len=16)).eval()


def test_two_ranks_score_right_padded_rows_cut_per_batch_as_one_process_and_as_float64(tmp_path):
    """The held-out loss of right-padded records (fine-tuning), shared in blocks by two gloo ranks, each batch of a
    block cut to its longest row: the same losses as one process cutting its own batches, and as a float64
    forward of each row alone, on every real target."""
    gen = torch.Generator().manual_seed(1)
    lengths = torch.tensor([5, 12, 3, 9, 12, 7, 4])  # 7 rows: blocks of 4 and 3 (+ 1 copy), 2 batches each
    windows = torch.randint(1, 50, (7, 12), generator=gen)  # [n, width]
    windows[torch.arange(12)[None, :] >= lengths[:, None]] = 0  # right padding
    torch.save((windows, lengths), tmp_path / "in.pt")
    (tmp_path / "blocks.py").write_text(BLOCKS)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(tmp_path / "blocks.py"), str(tmp_path / "in.pt"), str(tmp_path / "out.pt")],
                          cwd=REPO, env={**clean_env(), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "held-out loss: 4 rows" in proc.stderr  # rank 0's progress line, its block's (one line: rank 1 is quiet)
    shared, targets, counts = torch.load(tmp_path / "out.pt")
    assert counts == [4, 3] and torch.equal(targets, windows[:, 1:].reshape(-1))
    model = tiny_model()
    alone, _ = per_token_loss(model, windows, batch_size=2, lengths=lengths)  # [n * (width - 1)]
    # the real targets (the caller drops the rest: a shorter row's padding inside a batch cut to a longer one)
    real = (torch.arange(11)[None, :] < lengths[:, None] - 1).reshape(-1)  # [n * (width - 1)]
    torch.testing.assert_close(shared[real], alone[real], rtol=1e-5, atol=1e-6)
    reference = torch.zeros(7, 11, dtype=torch.float64)
    model = model.double()
    with torch.no_grad():
        for i, n in enumerate(lengths.tolist()):  # each row alone, its real tokens only, in float64
            hidden = model(windows[i : i + 1, : n - 1])[0]  # [n - 1, d]
            logits = F.linear(hidden, model.head.weight[:50])  # [n - 1, V]
            reference[i, : n - 1] = F.cross_entropy(logits, windows[i, 1:n], reduction="none")
    torch.testing.assert_close(shared.double()[real], reference.reshape(-1)[real], rtol=1e-5, atol=1e-5)
