"""In-loop evaluation shared by every rank (evals/distributed.py): two gloo ranks under the deepspeed launcher,
ZeRO-3 (each rank holds a shard of the weights; the forward passes gather them; the head reads the tied embedding,
which ZeRO-3 gathers as an external parameter), score a log-likelihood and a generation task and the held-out
buckets exactly as one process scoring the same checkpoint alone."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from evals.generation import write_generation_task
from evals.results_store import SAMPLES_FILE, find_results, latest
from evals.tasks import write_multiple_choice_task
from tests.test_distributed import common, launch
from tests.test_train import REPO, clean_env


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
