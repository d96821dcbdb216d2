"""Run lm-eval on a losslab checkpoint, and held-out loss by frequency bucket, and write the results beside it in
a folder keyed by the evaluation's settings (``evals/results_store.py``)."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from data.files import git_commit, write_atomic
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
from evals.results_store import HELD_OUT_FILE, RESULTS_FILE, SAMPLES_FILE, EvalSettings, results_dir
from evals.task_sets import check_tasks, resolve_tasks
from evals.tasks import relocate_tasks
from losslab.log import get_logger
from models.checkpoint import COUNTS_FILE, META, checkpoint_tokenizer, load_model, resolve_checkpoint
from models.checkpoint_files import load_json, load_safetensors

log = get_logger(__name__)
__all__ = ["HELD_OUT_FILE", "RESULTS_FILE", "SAMPLES_FILE", "evaluate_checkpoint"]
# RESULTS_FILE, SAMPLES_FILE (per-document scores of each task, ``document_scores``) and HELD_OUT_FILE (per
# held-out document summed loss and token count, overall and per frequency bucket, with each document's key,
# text hash and domain, and the held-out set's summary) live in each evaluation's folder (results_store).


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


def held_out_losses(
    model: Any, held: HeldOutSet, inputs: HeldOut, batch_size: int, buckets: torch.Tensor | None, shared: bool = False
) -> tuple[dict[str, float], dict[str, list[Any]]]:
    """(aggregate held-out metrics: loss, ppl, tokens, and per frequency bucket given ``buckets``; per-document sums
    of the same tokens: ``document_losses`` with each document's key, hash and domain) over the held-out set
    ``held`` (``inputs``: its windows). ``shared``: every rank scores a block of the windows and receives all
    (``evals/distributed.py``)."""
    lengths = None
    if inputs.scored is not None:  # right-padded rows: score each up to its last real token only
        lengths = (inputs.document >= 0).sum(1)  # [n]: a row's tokens, then only padding
    if shared:
        from evals.distributed import shared_per_token_loss

        loss, targets, _ = shared_per_token_loss(model, inputs.windows, batch_size, lengths=lengths,
                                                 progress="held-out loss")  # fmt: skip  # [n * (width - 1)] each
    else:
        loss, targets = per_token_loss(model, inputs.windows, batch_size=batch_size, lengths=lengths,
                                       progress="held-out loss")  # fmt: skip  # [n * (width - 1)] each
    document = inputs.document[:, 1:].reshape(-1)
    if inputs.scored is not None:  # only the tokens that carry loss in training, never padding
        keep = inputs.scored[:, 1:].reshape(-1)
        loss, targets, document = loss[keep], targets[keep], document[keep]
    per_doc: dict[str, list[Any]] = dict(document_losses(loss, targets, document, buckets))
    docs = [held.documents[i] for i in per_doc["doc_id"]]
    per_doc.update(key=[d.key for d in docs], sha=[d.sha for d in docs], domain=[d.domain for d in docs])
    return bucket_metrics(loss, targets, buckets), per_doc


def bucket_counts(
    ckpt: Path, tokenizer: Any, bucket_files: list[str] | None, records: bool
) -> tuple[torch.Tensor | None, str]:
    """(token counts [V] that define the frequency buckets, where they come from: ``EvalSettings.buckets``): the
    counts of ``bucket_files`` when given, else the checkpoint's training counts, else none (held-out loss alone:
    an imported model, say)."""
    if bucket_files:
        from data.counts import count_tokens
        from data.sft import FineTuningRecords
        from data.shards import resolve_files

        files = resolve_files(bucket_files)  # a missing file fails here, before anything runs
        counts = count_tokens(files, tokenizer, byte_budget=1 << 62,
                              document_format=FineTuningRecords() if records else None)  # fmt: skip
        if not int(counts.sum()):
            raise ValueError(f"--bucket-files {bucket_files} hold no token to count")
        return counts, "files-" + hashlib.sha256(counts.numpy().tobytes()).hexdigest()[:8]
    if (ckpt / COUNTS_FILE).is_file():
        return load_safetensors(ckpt / COUNTS_FILE)["token_counts"], "training"
    log.warning(f"{ckpt} holds no training token counts ({COUNTS_FILE}): held-out loss without frequency buckets "
                "(give files to count with --bucket-files for buckets)")  # fmt: skip
    return None, "none"


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
    bucket_files: list[str] | None = None,
    source: str = "evaluate",
) -> dict[str, Any]:
    """Evaluate the model saved in ``checkpoint`` (a checkpoint dir or a run dir: its latest checkpoint) with
    lm-eval on ``tasks`` (names or sets; k-shot metrics get an ``@kshot`` suffix for k > 0) and, given
    ``val_files``, held-out loss (``bucket/loss``, ``bucket/ppl``, ``bucket/tokens``) and, where token counts
    define them (``bucket_counts``), per token-frequency bucket (``bucket/high_loss``, ...); with ``val_records``
    the files hold fine-tuning records and the loss is over their response tokens (response perplexity). The
    held-out documents are a held-out set (``evals/heldout.py``; see ``held_out_set`` for which one): the run's
    own when evaluating a run's checkpoint, else a sample by ``val_sample`` (default: ``val_tokens``).

    Everything that can fail on the inputs — tasks, task directory, checkpoint files, token counts, held-out and
    bucket files, the held-out set — is checked before lm-eval starts. The results go to
    ``CKPT/evals/<settings key>/`` (``evals/results_store.py``), rewritten as each part finishes (each few-shot
    setting of lm-eval, then the held-out loss), ``complete`` false until the last: an error later keeps what
    was done. The same settings evaluated again replace that folder; other settings never touch it.
    ``source``: ``training`` for the in-loop evaluation, ``evaluate`` otherwise.

    With local tasks (``task_dir``) the Hugging Face libraries are put in offline mode before lm-eval is
    imported, so nothing reaches for the hub. ``precision`` ``auto`` evaluates in bf16 on CUDA (weights as
    trained, half the memory of fp32 beside a training run) and fp32 elsewhere. Returns the summary written to
    ``eval_results.json`` (with ``path``: where).

    In a training run (``trainer/callbacks.py``): ``model`` is the model in memory (the engine's module, whose
    weights are the checkpoint's), evaluated as it is rather than loaded again; ``shared``: every rank of the
    process group calls this together, scores its share of the requests and held-out windows and receives all
    the results (``evals/distributed.py``); rank 0 writes the files; ``lockstep``: the model is partitioned
    (ZeRO-3), its forward passes are collectives that the ranks must enter together.
    """
    if not tasks and not val_files:
        raise ValueError("nothing to evaluate: give tasks and/or held-out files")
    if bucket_files and not val_files:
        raise ValueError("--bucket-files define frequency buckets of the held-out loss: give --val-files too")
    check_tasks(tasks, task_dir)  # a typo fails now, not after the model is loaded
    if offline if offline is not None else bool(task_dir):
        os.environ["HF_DATASETS_OFFLINE"] = "1"
        os.environ["HF_HUB_OFFLINE"] = "1"
    from evals.lm import LosslabLM, uses_bf16

    started = time.perf_counter()
    bf16 = uses_bf16(precision, device)  # decided here too: the weights are loaded in that dtype
    owned = model is None  # a model handed in (training's) is evaluated as it is, never moved or re-laid out
    if owned:
        model, ckpt = load_model(checkpoint, device=device, dtype=torch.bfloat16 if bf16 else torch.float32)
    else:
        ckpt = resolve_checkpoint(checkpoint)
    tokenizer = checkpoint_tokenizer(ckpt, model.cfg)
    lm_args = {"batch_size": batch_size, "device": device, "precision": "bf16" if bf16 else "fp32"}
    if shared:
        from evals.distributed import SharedLM, world

        lm = SharedLM(model, tokenizer, lockstep=lockstep, **lm_args)
        rank = world()[0]
    else:
        lm = LosslabLM(model, tokenizer, move=owned, **lm_args)
        rank = 0
    shots = [num_fewshot] if isinstance(num_fewshot, int) else list(num_fewshot)
    # rarity of generated tokens under the training counts (generation tasks); read now: a torn file fails now
    counts = load_safetensors(ckpt / COUNTS_FILE)["token_counts"] if (ckpt / COUNTS_FILE).is_file() else None
    held: HeldOutSet | None = None
    buckets_from = ""
    if val_files:
        held, inputs = held_out_set(ckpt, val_files, tokenizer, model.cfg.max_seq_len, val_sample, val_tokens,
                                    val_records, held_out_set_file)  # fmt: skip
        bucket_source, buckets_from = bucket_counts(ckpt, tokenizer, bucket_files, val_records)
    settings = EvalSettings.of(list(tasks), shots, limit, held_out=held.identity if held else "",
                               buckets=buckets_from)  # fmt: skip
    meta = load_json(ckpt / META)
    out = results_dir(ckpt, settings)
    summary: dict[str, Any] = {
        "checkpoint": str(ckpt),
        "step": meta.get("step"),
        "tokens": meta.get("tokens"),
        "git_sha": meta.get("git_sha"),  # the commit that trained the checkpoint
        "evaluated_at": git_commit(),  # the commit of the code evaluating it (a relaunch's may differ)
        "tasks": list(tasks),
        "num_fewshot": shots,
        "limit": limit,
        "key": settings.key(),
        "settings": settings.to_json(),
        "source": source,
        "complete": False,
        "parts": [],
        "metrics": {},
        "results": {},
        "n_samples": {},
    }
    if held is not None and buckets_from == "none":
        summary["note"] = f"no frequency buckets: the checkpoint holds no training token counts ({COUNTS_FILE})"
    per_document: dict[str, Any] = {}
    cleared = False

    def save(part: str, files: dict[str, str]) -> None:
        """Write the results so far (rank 0 only, in a shared evaluation): the first write of this evaluation
        clears the folder of an earlier one with the same settings, so its files are never mixed with this
        one's. Each file is replaced whole (a reader, or a watcher killed mid-write, never sees half a file)."""
        nonlocal cleared
        summary["parts"].append(part)
        summary["complete"] = part == "done"
        summary["seconds"] = round(time.perf_counter() - started, 3)
        if shared:  # how the work was shared: requests of each type scored by each rank
            summary["shared"] = {"world_size": world()[1], "requests": lm.requests, "seconds": lm.seconds,
                                 "cpu_seconds": lm.cpu_seconds}  # fmt: skip
        if rank != 0:
            return
        if not cleared:
            for name in (RESULTS_FILE, SAMPLES_FILE, HELD_OUT_FILE):
                (out / name).unlink(missing_ok=True)
            cleared = True
        out.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            write_atomic(out / name, text)
        write_atomic(out / RESULTS_FILE, json.dumps(summary, indent=2, default=str) + "\n")

    for k in shots if tasks else []:
        raw = run_lm_eval(lm, tasks, task_dir=task_dir, num_fewshot=k, limit=limit)
        if raw is None:  # lm-eval reports on the process of LOCAL_RANK 0 only: a shared evaluation's other ranks
            continue
        suffix = f"@{k}shot" if k else ""
        summary["metrics"].update({f"{name}{suffix}": v for name, v in flat_metrics(raw).items()})
        if counts is not None:  # generation tasks: how rare the output's tokens are under the training counts
            rarity = rarity_metrics(raw, tokenizer, counts)
            summary["metrics"].update({f"{name}{suffix}": v for name, v in rarity.items()})
        summary["results"][f"{k}shot"] = raw.get("results", {})
        summary["n_samples"].update(raw.get("n-samples", {}))
        per_document.update({f"{task}{suffix}": v for task, v in document_scores(raw).items()})
        save(f"lm-eval {k}-shot", {SAMPLES_FILE: json.dumps(per_document) + "\n"} if per_document else {})
    if held is not None:
        buckets = frequency_buckets(bucket_source) if bucket_source is not None else None
        aggregate, per_doc = held_out_losses(model, held, inputs, batch_size, buckets, shared=shared)
        summary["metrics"].update({f"bucket/{k}": v for k, v in aggregate.items()})
        held_out = {"step": meta.get("step"), "files": list(val_files or []), "set": held_out_record(held),
                    "scored": "responses" if val_records else "all tokens", "buckets": buckets_from,
                    **per_doc}  # fmt: skip
        save("held-out loss", {HELD_OUT_FILE: json.dumps(held_out) + "\n"})
    save("done", {})
    return {**summary, "path": str(out / RESULTS_FILE)}


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
