"""Run lm-eval on a losslab checkpoint and write ``eval_results.json`` next to it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from evals.buckets import (
    bucket_metrics,
    document_losses,
    frequency_buckets,
    held_out_documents,
    held_out_records,
    per_token_loss,
)
from evals.generation import rarity_metrics
from evals.task_sets import check_tasks, resolve_tasks
from evals.tasks import relocate_tasks
from models.checkpoint import COUNTS_FILE, META, checkpoint_tokenizer, load_model
from models.checkpoint_files import load_json, load_safetensors

RESULTS_FILE = "eval_results.json"
SAMPLES_FILE = "eval_samples.json"
"""Per-document scores of each task, beside ``eval_results.json`` (see ``document_scores``)."""
HELD_OUT_FILE = "eval_held_out.json"
"""Per held-out document summed loss and token count, overall and per frequency bucket (``document_losses``)."""


def flat_metrics(results: dict[str, Any]) -> dict[str, float]:
    """{task: {"acc,none": 0.3, ...}} -> {"task/acc": 0.3, ...} (numbers only, filter suffix dropped)."""
    flat: dict[str, float] = {}
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                flat[f"{task}/{key.split(',')[0]}"] = float(value)
    return flat


def run_lm_eval(lm: Any, tasks: list[str], *, task_dir: str, num_fewshot: int, limit: int) -> dict[str, Any]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    if task_dir:
        if not Path(task_dir).is_dir():
            raise FileNotFoundError(f"eval task directory not found: {task_dir!r}")
        relocate_tasks(task_dir)  # built on another machine or in another place: its absolute paths moved
        manager = TaskManager(include_path=str(Path(task_dir).resolve()), include_defaults=False)
    else:
        manager = TaskManager()
    return lm_eval.simple_evaluate(
        model=lm,
        tasks=resolve_tasks(tasks, task_dir),
        num_fewshot=num_fewshot,
        limit=limit or None,
        task_manager=manager,
        log_samples=True,  # per-document scores: paired comparisons between runs, generation rarity
        random_seed=0,
        numpy_random_seed=0,
        torch_random_seed=0,
        fewshot_random_seed=0,
    )


def run_buckets(
    model: Any, ckpt: Path, val_files: list[str], val_tokens: int, batch_size: int, records: bool = False
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """(aggregate bucket metrics, per-document sums of the same tokens: ``document_losses``). ``records``: the
    files hold fine-tuning records, and the response tokens are scored (``held_out_records``)."""
    counts_file = ckpt / COUNTS_FILE
    if not counts_file.is_file():
        raise FileNotFoundError(f"{ckpt} holds no training token counts ({COUNTS_FILE}) to define frequency buckets")
    counts = load_safetensors(counts_file)["token_counts"]
    read = held_out_records if records else held_out_documents
    held_out = read(val_files, checkpoint_tokenizer(ckpt, model.cfg), model.cfg.max_seq_len, val_tokens)
    loss, targets = per_token_loss(model, held_out.windows, batch_size=batch_size)  # [n * seq_len] each
    document = held_out.document[:, 1:].reshape(-1)
    if held_out.scored is not None:  # only the tokens that carry loss in training
        keep = held_out.scored[:, 1:].reshape(-1)
        loss, targets, document = loss[keep], targets[keep], document[keep]
    buckets = frequency_buckets(counts)
    per_doc = document_losses(loss, targets, document, buckets)
    return bucket_metrics(loss, targets, buckets), per_doc


def evaluate_checkpoint(
    checkpoint: str | Path,
    tasks: list[str],
    *,
    task_dir: str = "",
    num_fewshot: int | list[int] = 0,
    limit: int = 0,
    batch_size: int = 16,
    device: str = "cpu",
    offline: bool | None = None,
    val_files: list[str] | None = None,
    val_tokens: int = 200_000,
    val_records: bool = False,
    precision: str = "auto",
) -> dict[str, Any]:
    """Evaluate the model saved in ``checkpoint`` (a checkpoint dir or a run dir: its latest checkpoint) with
    lm-eval on ``tasks`` (names or sets; k-shot metrics get an ``@kshot`` suffix for k > 0) and, given
    ``val_files``, held-out loss by token-frequency bucket (``bucket/...``); with ``val_records`` the files hold
    fine-tuning records and the buckets are over their response tokens (response perplexity by frequency).

    With local tasks (``task_dir``) the Hugging Face libraries are put in offline mode before lm-eval is
    imported, so nothing reaches for the hub. ``precision`` ``auto`` evaluates in bf16 on CUDA (weights as
    trained, half the memory of fp32 beside a training run) and fp32 elsewhere. Returns the summary written to
    ``eval_results.json``.
    """
    if not tasks and not val_files:
        raise ValueError("nothing to evaluate: give tasks and/or held-out files")
    check_tasks(tasks, task_dir)  # a typo fails now, not after the model is loaded
    if offline if offline is not None else bool(task_dir):
        os.environ["HF_DATASETS_OFFLINE"] = "1"
        os.environ["HF_HUB_OFFLINE"] = "1"
    from evals.lm import LosslabLM, uses_bf16

    bf16 = uses_bf16(precision, device)  # decided here too: the weights are loaded in that dtype
    model, ckpt = load_model(checkpoint, device=device, dtype=torch.bfloat16 if bf16 else torch.float32)
    tokenizer = checkpoint_tokenizer(ckpt, model.cfg)
    lm = LosslabLM(model, tokenizer, batch_size=batch_size, device=device, precision="bf16" if bf16 else "fp32")
    shots = [num_fewshot] if isinstance(num_fewshot, int) else list(num_fewshot)
    metrics: dict[str, float] = {}
    results: dict[str, Any] = {}
    n_samples: dict[str, Any] = {}
    per_document: dict[str, Any] = {}
    counts = load_safetensors(ckpt / COUNTS_FILE)["token_counts"] if (ckpt / COUNTS_FILE).is_file() else None
    for k in shots if tasks else []:
        raw = run_lm_eval(lm, tasks, task_dir=task_dir, num_fewshot=k, limit=limit)
        suffix = f"@{k}shot" if k else ""
        metrics.update({f"{name}{suffix}": v for name, v in flat_metrics(raw).items()})
        if counts is not None:  # generation tasks: how rare the output's tokens are under the training counts
            metrics.update({f"{name}{suffix}": v for name, v in rarity_metrics(raw, tokenizer, counts).items()})
        results[f"{k}shot"] = raw.get("results", {})
        n_samples.update(raw.get("n-samples", {}))
        per_document.update({f"{task}{suffix}": v for task, v in document_scores(raw).items()})
    held_out: dict[str, Any] | None = None
    if val_files:
        aggregate, per_doc = run_buckets(model, ckpt, val_files, val_tokens, batch_size, records=val_records)
        metrics.update({f"bucket/{k}": v for k, v in aggregate.items()})
        held_out = {"step": None, "files": list(val_files), "val_tokens": val_tokens,
                    "scored": "responses" if val_records else "all tokens", **per_doc}  # fmt: skip
    meta = load_json(ckpt / META)
    summary = {
        "checkpoint": str(ckpt),
        "step": meta.get("step"),
        "tokens": meta.get("tokens"),
        "git_sha": meta.get("git_sha"),
        "tasks": list(tasks),
        "num_fewshot": shots,
        "limit": limit,
        "metrics": metrics,
        "results": results,
        "n_samples": n_samples,
    }
    (ckpt / RESULTS_FILE).write_text(json.dumps(summary, indent=2, default=str))
    if per_document:
        (ckpt / SAMPLES_FILE).write_text(json.dumps(per_document) + "\n")
    if held_out is not None:
        held_out["step"] = meta.get("step")  # a later evaluation of another checkpoint cannot be mistaken for it
        (ckpt / HELD_OUT_FILE).write_text(json.dumps(held_out) + "\n")
    return summary


def document_scores(raw: dict[str, Any]) -> dict[str, dict[str, list[float]]]:
    """Per task, each numeric per-document score lm-eval logged (``acc``, ``acc_norm``, ``rouge1``, ...) and the
    documents' ids, in document order: what a paired comparison of two runs needs."""
    out: dict[str, dict[str, list[float]]] = {}
    for task, samples in (raw.get("samples") or {}).items():
        if not samples:
            continue
        samples = sorted(samples, key=lambda s: s["doc_id"])
        names = [k for k, v in samples[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        out[task] = {name: [float(s[name]) for s in samples] for name in names if name != "doc_id"}
        out[task]["doc_id"] = [s["doc_id"] for s in samples]
    return out
