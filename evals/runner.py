"""Run lm-eval on a losslab checkpoint and write ``eval_results.json`` next to it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from data.tokenizer import Tokenizer
from trainer.checkpoint import load_model

RESULTS_FILE = "eval_results.json"


def flat_metrics(results: dict[str, Any]) -> dict[str, float]:
    """{task: {"acc,none": 0.3, ...}} -> {"task/acc": 0.3, ...} (numbers only, filter suffix dropped)."""
    flat: dict[str, float] = {}
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                flat[f"{task}/{key.split(',')[0]}"] = float(value)
    return flat


def evaluate_checkpoint(
    checkpoint: str | Path,
    tasks: list[str],
    *,
    task_dir: str = "",
    num_fewshot: int = 0,
    limit: int = 0,
    batch_size: int = 16,
    device: str = "cpu",
    offline: bool | None = None,
) -> dict[str, Any]:
    """Evaluate the model saved in ``checkpoint`` (a checkpoint dir or a run dir: its latest checkpoint).

    With local tasks (``task_dir``) the Hugging Face libraries are put in offline mode before lm-eval is
    imported, so nothing reaches for the hub. Returns the summary written to ``eval_results.json``.
    """
    if not tasks:
        raise ValueError("no evaluation tasks given")
    if offline if offline is not None else bool(task_dir):
        os.environ["HF_DATASETS_OFFLINE"] = "1"
        os.environ["HF_HUB_OFFLINE"] = "1"
    import lm_eval
    from lm_eval.tasks import TaskManager

    from evals.lm import LosslabLM

    model, ckpt = load_model(checkpoint, device=device)
    lm = LosslabLM(model, Tokenizer(str(ckpt / "tokenizer.model")), batch_size=batch_size, device=device)
    if task_dir:
        if not Path(task_dir).is_dir():
            raise FileNotFoundError(f"eval task directory not found: {task_dir!r}")
        manager = TaskManager(include_path=str(Path(task_dir).resolve()), include_defaults=False)
    else:
        manager = TaskManager()
    raw = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(tasks),
        num_fewshot=num_fewshot,
        limit=limit or None,
        task_manager=manager,
        log_samples=False,
        random_seed=0,
        numpy_random_seed=0,
        torch_random_seed=0,
        fewshot_random_seed=0,
    )
    meta = json.loads((ckpt / "meta.json").read_text())
    summary = {
        "checkpoint": str(ckpt),
        "step": meta.get("step"),
        "tokens": meta.get("tokens"),
        "git_sha": meta.get("git_sha"),
        "tasks": list(tasks),
        "num_fewshot": num_fewshot,
        "limit": limit,
        "metrics": flat_metrics(raw),
        "results": raw.get("results", {}),
        "n_samples": raw.get("n-samples", {}),
        "versions": raw.get("versions", {}),
    }
    (ckpt / RESULTS_FILE).write_text(json.dumps(summary, indent=2, default=str))
    return summary
