"""Run lm-eval on a losslab checkpoint and write ``eval_results.json`` next to it."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from data.files import write_atomic
from evals.buckets import bucket_metrics, document_losses, frequency_buckets, per_token_loss
from evals.generation import rarity_metrics
from evals.heldout import (
    SET_FILE,
    HeldOut,
    HeldOutError,
    HeldOutSet,
    SampleSpec,
    load_or_sample,
    load_set,
    pack,
    read_pieces,
)
from evals.task_sets import check_tasks, resolve_tasks
from evals.tasks import relocate_tasks
from models.checkpoint import COUNTS_FILE, META, checkpoint_tokenizer, load_model, resolve_checkpoint
from models.checkpoint_files import load_json, load_safetensors

RESULTS_FILE = "eval_results.json"
SAMPLES_FILE = "eval_samples.json"
"""Per-document scores of each task, beside ``eval_results.json`` (see ``document_scores``)."""
HELD_OUT_FILE = "eval_held_out.json"
"""Per held-out document summed loss and token count, overall and per frequency bucket (``document_losses``),
with each document's key, text hash and domain, and the held-out set's summary (``held_out_record``)."""


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
    model: Any, ckpt: Path, held: HeldOutSet, inputs: HeldOut, batch_size: int, shared: bool = False
) -> tuple[dict[str, float], dict[str, list[Any]]]:
    """(aggregate bucket metrics, per-document sums of the same tokens: ``document_losses`` with each document's
    key, hash and domain) over the held-out set ``held`` (``inputs``: its windows)."""
    counts_file = ckpt / COUNTS_FILE
    if not counts_file.is_file():
        raise FileNotFoundError(f"{ckpt} holds no training token counts ({COUNTS_FILE}) to define frequency buckets")
    counts = load_safetensors(counts_file)["token_counts"]
    if shared:  # every rank scores a block of the windows (evals/distributed.py)
        from evals.distributed import shared_per_token_loss

        loss, targets, _ = shared_per_token_loss(model, inputs.windows, batch_size)
    else:
        loss, targets = per_token_loss(model, inputs.windows, batch_size=batch_size)  # [n * seq_len] each
    document = inputs.document[:, 1:].reshape(-1)
    if inputs.scored is not None:  # only the tokens that carry loss in training, never padding
        keep = inputs.scored[:, 1:].reshape(-1)
        loss, targets, document = loss[keep], targets[keep], document[keep]
    buckets = frequency_buckets(counts)
    per_doc: dict[str, list[Any]] = dict(document_losses(loss, targets, document, buckets))
    docs = [held.documents[i] for i in per_doc["doc_id"]]
    per_doc.update(key=[d.key for d in docs], sha=[d.sha for d in docs], domain=[d.domain for d in docs])
    return bucket_metrics(loss, targets, buckets), per_doc


def held_out_record(held: HeldOutSet) -> dict[str, Any]:
    """The held-out set's summary as the per-document file records it (what a report states about the set)."""
    return {"identity": held.identity, "n_documents": len(held.documents), "tokens": held.tokens,
            "n_eff": held.n_eff, "domains": held.domains, "missing": held.missing,
            "spec": held.to_json()["spec"]}  # fmt: skip


def held_out_set(
    ckpt: Path, files: list[str], tokenizer: Any, seq_len: int, spec: SampleSpec | None, val_tokens: int,
    records: bool, path: str | Path | None,
) -> tuple[HeldOutSet, HeldOut]:  # fmt: skip
    """The held-out set to score: the one saved at ``path`` (a training run passes its own); else, when no sampling
    settings are given, one saved beside the checkpoint or beside its run (``SET_FILE``: to score another model,
    e.g. the one before fine-tuning, on a run's set, copy the run's file beside its checkpoint); else a sample by
    ``spec`` (default: ``val_tokens`` with the default settings) written beside the checkpoint, in windows of
    ``seq_len + 1``. A saved set must come from these files and this tokenizer; it is never overwritten here."""
    saved_at = (
        [Path(path)] if path is not None else [ckpt / SET_FILE, ckpt.parent.parent / SET_FILE] if spec is None else []
    )
    for own in saved_at:
        try:
            saved = load_set(own, files, tokenizer, records)
        except HeldOutError:
            if path is not None:
                raise
            continue  # a set of other held-out files: sample this evaluation's own
        if saved is not None:
            return saved, pack(saved, read_pieces(saved, tokenizer), tokenizer.eos_id)
    target = Path(path) if path is not None else ckpt / SET_FILE
    held, pieces = load_or_sample(target, files, tokenizer, seq_len, spec or SampleSpec(tokens=val_tokens),
                                  records=records)  # fmt: skip
    return held, pack(held, pieces, tokenizer.eos_id)


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
    val_sample: SampleSpec | None = None,
    held_out_set_file: str | Path | None = None,
    model: Any = None,
    shared: bool = False,
    lockstep: bool = False,
) -> dict[str, Any]:
    """Evaluate the model saved in ``checkpoint`` (a checkpoint dir or a run dir: its latest checkpoint) with
    lm-eval on ``tasks`` (names or sets; k-shot metrics get an ``@kshot`` suffix for k > 0) and, given
    ``val_files``, held-out loss by token-frequency bucket (``bucket/...``); with ``val_records`` the files hold
    fine-tuning records and the buckets are over their response tokens (response perplexity by frequency). The
    held-out documents are a held-out set (``evals/heldout.py``; see ``held_out_set`` for which one): the run's
    own when evaluating a run's checkpoint, else a sample by ``val_sample`` (default: ``val_tokens``).

    With local tasks (``task_dir``) the Hugging Face libraries are put in offline mode before lm-eval is
    imported, so nothing reaches for the hub. ``precision`` ``auto`` evaluates in bf16 on CUDA (weights as
    trained, half the memory of fp32 beside a training run) and fp32 elsewhere. Returns the summary written to
    ``eval_results.json``.

    In a training run (``trainer/callbacks.py``): ``model`` is the model in memory (the engine's module, whose
    weights are the checkpoint's), evaluated as it is rather than loaded again; ``shared``: every rank of the
    process group calls this together, scores its share of the requests and held-out windows and receives all
    the results (``evals/distributed.py``); rank 0 writes the files; ``lockstep``: the model is partitioned
    (ZeRO-3), its forward passes are collectives that the ranks must enter together.
    """
    if not tasks and not val_files:
        raise ValueError("nothing to evaluate: give tasks and/or held-out files")
    check_tasks(tasks, task_dir)  # a typo fails now, not after the model is loaded
    if offline if offline is not None else bool(task_dir):
        os.environ["HF_DATASETS_OFFLINE"] = "1"
        os.environ["HF_HUB_OFFLINE"] = "1"
    from evals.lm import LosslabLM, uses_bf16

    started = time.perf_counter()
    bf16 = uses_bf16(precision, device)  # decided here too: the weights are loaded in that dtype
    if model is None:
        model, ckpt = load_model(checkpoint, device=device, dtype=torch.bfloat16 if bf16 else torch.float32)
    else:
        ckpt = resolve_checkpoint(checkpoint)
    tokenizer = checkpoint_tokenizer(ckpt, model.cfg)
    lm_args = {"batch_size": batch_size, "device": device, "precision": "bf16" if bf16 else "fp32"}
    if shared:
        from evals.distributed import SharedLM, world

        lm = SharedLM(model, tokenizer, lockstep=lockstep, **lm_args)
    else:
        lm = LosslabLM(model, tokenizer, **lm_args)
    shots = [num_fewshot] if isinstance(num_fewshot, int) else list(num_fewshot)
    metrics: dict[str, float] = {}
    results: dict[str, Any] = {}
    n_samples: dict[str, Any] = {}
    per_document: dict[str, Any] = {}
    counts = load_safetensors(ckpt / COUNTS_FILE)["token_counts"] if (ckpt / COUNTS_FILE).is_file() else None
    for k in shots if tasks else []:
        raw = run_lm_eval(lm, tasks, task_dir=task_dir, num_fewshot=k, limit=limit)
        if raw is None:  # lm-eval reports on the process of LOCAL_RANK 0 only: a shared evaluation's other ranks
            continue
        suffix = f"@{k}shot" if k else ""
        metrics.update({f"{name}{suffix}": v for name, v in flat_metrics(raw).items()})
        if counts is not None:  # generation tasks: how rare the output's tokens are under the training counts
            metrics.update({f"{name}{suffix}": v for name, v in rarity_metrics(raw, tokenizer, counts).items()})
        results[f"{k}shot"] = raw.get("results", {})
        n_samples.update(raw.get("n-samples", {}))
        per_document.update({f"{task}{suffix}": v for task, v in document_scores(raw).items()})
    held_out: dict[str, Any] | None = None
    if val_files:
        held, inputs = held_out_set(ckpt, val_files, tokenizer, model.cfg.max_seq_len, val_sample, val_tokens,
                                    val_records, held_out_set_file)  # fmt: skip
        aggregate, per_doc = run_buckets(model, ckpt, held, inputs, batch_size, shared=shared)
        metrics.update({f"bucket/{k}": v for k, v in aggregate.items()})
        held_out = {"step": None, "files": list(val_files), "set": held_out_record(held),
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
        "seconds": round(time.perf_counter() - started, 3),
    }
    if shared:  # how the work was shared: requests of each type scored by each rank
        summary["shared"] = {"world_size": world()[1], "requests": lm.requests, "seconds": lm.seconds,
                             "cpu_seconds": lm.cpu_seconds}  # fmt: skip
        if world()[0] != 0:
            return summary
    # replaced whole (a reader, or a watcher killed mid-write, never sees half a file): evals/watch.py
    write_atomic(ckpt / RESULTS_FILE, json.dumps(summary, indent=2, default=str))
    if per_document:
        write_atomic(ckpt / SAMPLES_FILE, json.dumps(per_document) + "\n")
    if held_out is not None:
        held_out["step"] = meta.get("step")  # a later evaluation of another checkpoint cannot be mistaken for it
        write_atomic(ckpt / HELD_OUT_FILE, json.dumps(held_out) + "\n")
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
        if isinstance(samples[0].get("distinct1"), str):  # a generation task: its outputs, for per-prompt intervals
            out[task]["output"] = [s["distinct1"] for s in samples]
    return out
