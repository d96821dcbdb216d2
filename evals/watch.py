"""Evaluate a run's checkpoints as they land, in a process of its own (``losslab eval --watch RUN_DIR``): on
other GPUs or another node, so that training never waits for evaluation.

Each complete checkpoint (``meta.json`` committed, the model's files matching their checksums) is evaluated
once with the watcher's settings, oldest first. What is done is recorded per checkpoint in
``RUN_DIR/eval_watch/step_N.json`` (``done`` / ``mark_done``), written only after the checkpoint's results,
``RUN_DIR/eval_metrics.jsonl`` and the W&B log: a watcher killed at any point and started again re-evaluates at
most the checkpoint it was working on, whose line in ``eval_metrics.jsonl`` is then replaced, never doubled.
The marker is for the watcher's own settings: it names them (``requested``) and the settings key of the results
they gave (``evals/results_store.py``); a checkpoint counts as done only when both match and that evaluation's
results are still there and complete, so a watcher started with other settings (other tasks, a limit, other
held-out files) evaluates every checkpoint again, into that setting's own folder, never over another's. The
watcher stops once the run's ``result.json`` says it finished and every checkpoint is evaluated.

``eval_metrics.jsonl`` has ``metrics.jsonl``'s form (one object per step: ``step``, ``tokens``, ``eval/...``,
``eval_bucket/...``), plus ``eval_setting`` (the settings key), so the curves line up with training's and a
reader can keep one setting's; on W&B the metrics go to the run's own W&B run (its id in ``RUN_DIR/wandb_id``,
``resume="allow"``) against its ``step``."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from data.files import file_digest, write_atomic
from evals.results_store import find_results
from losslab.log import get_logger
from models.checkpoint import CHECKPOINTS, META, complete_checkpoints, verify_model_files
from models.checkpoint_files import CheckpointError

log = get_logger(__name__)

DONE_DIR = "eval_watch"
EVAL_METRICS = "eval_metrics.jsonl"
RESULT = "result.json"


@dataclass
class WatchSettings:
    """What to evaluate (as ``evals.runner.evaluate_checkpoint`` takes it); ``from_run`` fills what is not given
    from the run's own ``eval`` section."""

    tasks: list[str] = field(default_factory=list)
    task_dir: str = ""
    num_fewshot: list[int] = field(default_factory=lambda: [0])
    limit: int = 0
    batch_size: int = 16
    device: str = "cpu"
    precision: str = "auto"
    val_files: list[str] = field(default_factory=list)
    val_tokens: int = 200_000
    val_records: bool = False
    bucket_files: list[str] = field(default_factory=list)
    """Files whose token counts define the frequency buckets (``evaluate_checkpoint``'s ``bucket_files``)."""
    interval: float = 60.0
    """Seconds between looks at the run directory when nothing is left to evaluate."""
    wandb: str = ""
    """W&B mode (online, offline, disabled); empty: the run's own ``wandb.mode``."""
    run_eval: bool = True
    """Take tasks, task directory, shots, limit, batch size and held-out files from the run's ``eval`` section
    (``from_run``): the command gave no tasks of its own."""


def run_config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "config.yaml"
    try:
        cfg = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: not a run directory (no config.yaml)") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not readable YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: not a run's config")
    return cfg


def from_run(run_dir: Path, given: WatchSettings) -> WatchSettings:
    """``given`` with the run's ``eval`` settings (tasks, task directory, shots, limit, batch size, held-out
    files when ``eval.buckets``) when ``given.run_eval``."""
    if not given.run_eval:
        return given
    cfg = run_config(run_dir)
    ev, data = cfg.get("eval") or {}, cfg.get("data") or {}
    shots = ev.get("num_fewshot", 0)
    given.tasks = list(ev.get("tasks") or [])
    given.task_dir = ev.get("task_dir") or ""
    given.num_fewshot = [shots] if isinstance(shots, int) else list(shots)
    given.limit = int(ev.get("limit") or 0)
    given.batch_size = int(ev.get("batch_size") or given.batch_size)
    if ev.get("buckets", True) and not given.val_files:
        given.val_files = list(data.get("val_files") or [])
        given.val_records = bool(data.get("sft_files"))
    if not given.tasks and not given.val_files:
        raise ValueError(f"{run_dir}/config.yaml: eval.tasks is empty and there are no held-out files: give --tasks")
    return given


def checkpoints(run_dir: Path) -> list[Path]:
    """The run's committed checkpoints, oldest first (a ``.tmp-step_N`` being written is not one yet)."""
    root = run_dir / CHECKPOINTS
    return complete_checkpoints(root) if root.is_dir() else []


def _marker(run_dir: Path, ckpt: Path) -> Path:
    return run_dir / DONE_DIR / f"{ckpt.name}.json"


def requested(s: WatchSettings) -> dict[str, Any]:
    """What the watcher was asked to evaluate (what decides which evaluation it writes; not batch size, device or
    precision), as its markers record it."""
    return {"tasks": sorted(s.tasks), "task_dir": s.task_dir, "num_fewshot": list(s.num_fewshot),
            "limit": s.limit, "val_files": list(s.val_files), "val_tokens": s.val_tokens,
            "val_records": s.val_records, "bucket_files": list(s.bucket_files)}  # fmt: skip


def done(run_dir: Path, ckpt: Path, settings: WatchSettings | None = None) -> bool:
    """Whether ``ckpt`` was evaluated with ``settings`` (None: with whatever settings a watcher used): its marker
    names this very checkpoint (the digest of its ``meta.json``; a checkpoint of the same step written again,
    after a resume from an earlier one, is another), these settings, and an evaluation whose complete results
    are still beside the checkpoint (``CKPT/evals/<key>/``)."""
    try:
        marker = json.loads(_marker(run_dir, ckpt).read_text())
        if marker.get("meta") != file_digest(ckpt / META):
            return False
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    if settings is not None and marker.get("requested") != requested(settings):
        return False
    return any(s.complete for s in find_results(ckpt, str(marker.get("key") or "")))


def mark_done(run_dir: Path, ckpt: Path, summary: dict[str, Any], settings: WatchSettings) -> None:
    (run_dir / DONE_DIR).mkdir(exist_ok=True)
    record = {"step": summary.get("step"), "checkpoint": str(ckpt), "meta": file_digest(ckpt / META),
              "key": summary.get("key"), "requested": requested(settings), "seconds": summary.get("seconds"),
              "evaluated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}  # fmt: skip
    write_atomic(_marker(run_dir, ckpt), json.dumps(record) + "\n")


def stopped_early(run_dir: Path) -> str:
    """What ``result.json`` says of a launch that stopped before the run's last step ("" when it says nothing of
    the kind): the run may be resumed, so the watcher waits on."""
    try:
        result = json.loads((run_dir / RESULT).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return ""
    if result.get("complete"):
        return ""
    return f"stopped at step {result.get('steps')}" + (f" ({result['error']})" if result.get("error") else "")


def finished(run_dir: Path) -> bool:
    """The run's ``result.json`` says it trained to its last step (a pre-empted or failed launch may resume)."""
    try:
        return bool(json.loads((run_dir / RESULT).read_text()).get("complete"))
    except (FileNotFoundError, json.JSONDecodeError):  # not written yet, or being replaced
        return False


def namespaced(metrics: dict[str, float]) -> dict[str, float]:
    """Evaluation results under the names training logs them with (``eval/...``, ``eval_bucket/...``)."""
    return {f"eval_bucket/{k.removeprefix('bucket/')}" if k.startswith("bucket/") else f"eval/{k}": v
            for k, v in metrics.items()}  # fmt: skip


def record_metrics(run_dir: Path, row: dict[str, Any]) -> None:
    """Put ``row`` in ``eval_metrics.jsonl`` in step order, replacing a line of the same step (an evaluation that
    was interrupted after writing it and is done again); the file is replaced whole, never half-written."""
    path = run_dir / EVAL_METRICS
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []
    rows = sorted([r for r in rows if r.get("step") != row["step"]] + [row], key=lambda r: r["step"])
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))


class WandbEval:
    """The run's W&B run, resumed by its id: evaluation metrics plotted against the run's ``step``."""

    def __init__(self, run_dir: Path, mode: str) -> None:
        import wandb

        cfg = run_config(run_dir).get("wandb") or {}
        run_id = (run_dir / "wandb_id").read_text().strip()
        # Its own W&B service: one inherited from a parent process (WANDB_SERVICE, set by any wandb.init there)
        # may already hold this run id for the training process, and refuses a second holder ("run ID is in use").
        os.environ.pop("WANDB_SERVICE", None)
        # Online, training may still be writing the run: W&B's shared mode is its way for a second process to
        # write the same run (not the primary writer, labelled). Offline, each process writes its own files.
        shared = {"x_primary": False, "x_label": "eval-watch"} if mode == "online" else {}
        self.run = wandb.init(
            mode="shared" if shared else mode,
            dir=str(run_dir),
            project=cfg.get("project"),
            entity=cfg.get("entity") or None,
            id=run_id,
            resume="allow",
            settings=wandb.Settings(quiet=True, console="off", **shared),
        )
        # training logs at W&B's own step; a second writer's steps may be behind it, so the evaluation's
        # charts take the logged "step" as their x-axis instead
        self.run.define_metric("step")
        for prefix in ("eval/*", "eval_bucket/*", "tokens"):
            self.run.define_metric(prefix, step_metric="step")

    def log(self, row: dict[str, Any]) -> None:
        self.run.log(row)

    def close(self) -> None:
        self.run.finish()


def open_wandb(run_dir: Path, mode: str) -> WandbEval | None:
    mode = mode or str((run_config(run_dir).get("wandb") or {}).get("mode", "disabled"))
    if mode == "disabled":
        return None
    if not (run_dir / "wandb_id").is_file():
        log.warning(f"{run_dir}/wandb_id not found: the run logged no W&B run, the evaluations go to files only")
        return None
    try:
        return WandbEval(run_dir, mode)
    except Exception as e:  # the dashboard is a copy: the evaluations still go to the run's files
        log.warning(f"W&B run of {run_dir} could not be opened ({type(e).__name__}: {e}); evaluations go to files only")
        return None


def evaluate(ckpt: Path, s: WatchSettings) -> dict[str, Any]:
    from evals.runner import evaluate_checkpoint

    return evaluate_checkpoint(ckpt, s.tasks, task_dir=s.task_dir, num_fewshot=s.num_fewshot, limit=s.limit,
                               batch_size=s.batch_size, device=s.device, val_files=s.val_files,
                               val_tokens=s.val_tokens, val_records=s.val_records, precision=s.precision,
                               bucket_files=s.bucket_files or None)  # fmt: skip


def watch(run_dir: Path, settings: WatchSettings) -> int:
    """Evaluate ``run_dir``'s checkpoints as they land until the run finishes; returns how many this call
    evaluated. A checkpoint whose model files fail their checksums, or removed before its turn
    (``checkpoint.keep``), is reported and passed over."""
    if not run_dir.parent.is_dir():  # a mistyped path, not a run about to start
        raise FileNotFoundError(f"{run_dir}: its parent directory {run_dir.parent} does not exist")
    if not (run_dir / "config.yaml").is_file():  # started beside the training job: its run is not set up yet
        log.info(f"waiting for the run at {run_dir} to start (looking every {settings.interval:g}s)")
        while not (run_dir / "config.yaml").is_file():
            time.sleep(settings.interval)
    settings = from_run(run_dir, settings)
    log.info(f"watching {run_dir}: tasks {','.join(settings.tasks) or '-'}, held-out files {len(settings.val_files)}")
    wandb_run: WandbEval | None = None
    wandb_opened = False  # once a checkpoint exists: by then the training run has written its W&B run id
    evaluated, passed_over, waiting, said = 0, set(), False, ""
    try:
        while True:
            ended = finished(run_dir)  # read first: a finished run has committed every checkpoint already
            todo = [c for c in checkpoints(run_dir) if c.name not in passed_over and not done(run_dir, c, settings)]
            if not todo and ended:
                n = sum(done(run_dir, c, settings) for c in checkpoints(run_dir))
                log.info(f"{run_dir}: the run finished; {n} checkpoint(s) evaluated ({evaluated} by this watcher)")
                return evaluated
            if not todo:
                if not waiting:
                    log.info(f"{run_dir}: waiting for checkpoints (looking every {settings.interval:g}s)")
                if (stop := stopped_early(run_dir)) and stop != said:
                    log.info(f"{run_dir}: the run {stop}; waiting for it to be resumed (Ctrl-C to stop watching)")
                said = stop
                waiting = True
                time.sleep(settings.interval)
                continue
            waiting = False
            ckpt = todo[0]
            try:
                verify_model_files(ckpt)
            except (CheckpointError, FileNotFoundError) as e:
                if ckpt.is_dir():
                    log.warning(f"{ckpt}: passed over, not evaluated: {e}")
                else:
                    log.warning(f"{ckpt} was removed before it could be evaluated (checkpoint.keep?)")
                passed_over.add(ckpt.name)
                continue
            if not wandb_opened:
                wandb_run, wandb_opened = open_wandb(run_dir, settings.wandb), True
            log.info(f"evaluating {ckpt.name} ({len(todo) - 1} more waiting)")
            try:
                summary = evaluate(ckpt, settings)
            except (CheckpointError, FileNotFoundError) as e:
                if ckpt.is_dir():
                    raise
                log.warning(f"{ckpt} was removed while it was evaluated (checkpoint.keep?): {e}")
                passed_over.add(ckpt.name)
                continue
            row = {"step": summary["step"], "tokens": summary["tokens"], **namespaced(summary["metrics"])}
            record_metrics(run_dir, {**row, "eval_setting": summary["key"]})
            if wandb_run is not None:
                wandb_run.log(row)
            mark_done(run_dir, ckpt, summary, settings)
            evaluated += 1
            shown = ", ".join(f"{k} {v:.4f}" for k, v in summary["metrics"].items()
                              if not k.endswith(("_stderr", "sample_len")))  # fmt: skip
            log.info(f"{ckpt.name} evaluated in {summary.get('seconds', 0):.1f}s: {shown}")
    finally:
        if wandb_run is not None:
            wandb_run.close()
