"""Side concerns of the training loop, each in its own small callback: metrics file, W&B, in-loop eval."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from evals.heldout import SET_FILE, SampleSpec
from losslab.losses import loss_columns, loss_tag
from trainer.config import ConfigError, EvalSection, RunConfig, WandbSection

Emit = Callable[[int, dict[str, float]], None]

# metrics.jsonl keeps flat names; W&B groups them by namespace
WANDB_NAMESPACE = {"eval", "eval_bucket", "eval_domain", "data", "perf", "launch"}


class Callback:
    """A side concern of the training loop, which calls each hook of every callback in turn (OLMo-core's
    pattern). The built-in callbacks below; plug-ins from ``run.callbacks`` (``trainer/plugins.py``), built on
    every rank, come last."""

    changes_training: bool = False
    """True for a callback that changes what a step computes (``micro_loss`` returning another loss): a
    relaunch that adds, removes or changes one is refused like a change of the experiment
    (``trainer/resume_check.py``). Callbacks that only observe, or stop the process, leave it False."""

    def pre_step(self, step: int) -> None:
        """Before step ``step`` draws its micro-batches."""

    def micro_loss(self, step: int, micro: int, loss: torch.Tensor) -> torch.Tensor:
        """The loss of micro-batch ``micro`` of ``step``, before its backward pass: returns the loss that is
        back-propagated and logged."""
        return loss

    def post_step(self, step: int) -> None:
        """After the optimizer step, before logging, evaluation and checkpointing."""

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def pre_checkpoint_commit(self, step: int, tmp: Path) -> None:
        """This rank's files of the checkpoint of ``step`` are written into ``tmp``, which is not yet committed
        (checksums gathered, ``meta.json`` written, renamed into place)."""

    def on_checkpoint(self, step: int, ckpt: Path, *, final: bool, emit: Emit) -> None:
        pass

    def on_end(self) -> None:
        pass


class MetricsJsonl(Callback):
    """One JSON object per logged step in ``RUN_DIR/metrics.jsonl`` (rank 0)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps({"step": step, **metrics}) + "\n")


def require_wandb(cfg: WandbSection) -> None:
    """Fail before any heavy set-up when W&B logging is asked for and the package is missing."""
    if cfg.mode != "disabled" and importlib.util.find_spec("wandb") is None:
        raise ConfigError(
            f"wandb.mode={cfg.mode} needs the wandb package (pip install wandb); or set wandb.mode=disabled"
        )


class WandbLogger(Callback):
    """W&B run in ``RUN_DIR/wandb`` (offline by default: ``wandb sync RUN_DIR/wandb/offline-run-*`` later).
    The run id is kept in ``RUN_DIR/wandb_id`` so a resumed run continues the same W&B run."""

    def __init__(
        self,
        cfg: WandbSection,
        run_dir: Path,
        name: str,
        group: str,
        tags: list[str],
        config: dict[str, Any],
        job_type: str | None = None,
    ) -> None:
        import wandb

        id_file = run_dir / "wandb_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:8]
        id_file.write_text(run_id)
        self.run = wandb.init(
            mode=cfg.mode,
            dir=str(run_dir),
            project=cfg.project,
            entity=cfg.entity or None,
            group=group,
            job_type=job_type,
            name=name,
            tags=tags,
            id=run_id,
            resume="allow",
            config=config,
            settings=wandb.Settings(quiet=True, console="off"),
        )

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        named = {}
        for key, value in metrics.items():
            head = key.split("/", 1)[0]
            named[key if head in WANDB_NAMESPACE else f"train/{key}"] = value
        self.run.log(named, step=step)

    def on_end(self) -> None:
        self.run.finish()


class EvalCallback(Callback):
    """lm-eval (and the held-out buckets) on the weights of the checkpoint just saved, after the final checkpoint
    and after each one if configured. Given the training ``model`` (the engine's module, on every rank), every
    rank scores a share of the requests with it as it is — its shard under ZeRO-3 (``lockstep``), gathered
    layer by layer as in training — and rank 0 writes the results (``evals/distributed.py``); without it, rank 0
    loads the saved checkpoint and evaluates it alone while the other ranks wait."""

    def __init__(self, cfg: EvalSection, val_files: list[str], val_records: bool = False,
                 held_out_set: Path | None = None, model: Any = None, lockstep: bool = False) -> None:  # fmt: skip
        self.cfg = cfg
        self.val_files = val_files if cfg.buckets else []
        self.val_records = val_records
        """The held-out files are fine-tuning records (a fine-tuning run): the buckets score their responses."""
        self.held_out_set = held_out_set
        """The run's held-out set file (``evals/heldout.py``): every evaluation scores that set."""
        self.model, self.lockstep = model, lockstep
        self.last: dict[str, Any] | None = None

    def due(self, *, final: bool) -> bool:
        """Whether this run evaluates a checkpoint it writes (the final one, or each with ``every_checkpoint``)."""
        return bool(self.cfg.tasks or self.val_files) and (final or self.cfg.every_checkpoint)

    def owed(self, ckpt: Path, *, final: bool) -> bool:
        """A checkpoint this run evaluates that holds no finished in-loop evaluation: the launch that wrote it stopped
        before its evaluation ended (decided on rank 0, for every rank: they evaluate together)."""
        from evals.results_store import find_results

        owed = [self.due(final=final) and not any(
            e.complete and e.summary.get("source") == "training" for e in find_results(ckpt))]  # fmt: skip
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast_object_list(owed, src=0)
        return owed[0]

    def on_checkpoint(self, step: int, ckpt: Path, *, final: bool, emit: Emit) -> None:
        if not self.due(final=final):
            return
        from evals.runner import evaluate_checkpoint
        from trainer.engine import accelerator_device

        shared = self.model is not None
        if shared or dist.get_rank() == 0:
            training = shared and self.model.training
            try:
                summary = evaluate_checkpoint(
                    ckpt,
                    self.cfg.tasks,
                    task_dir=self.cfg.task_dir,
                    num_fewshot=self.cfg.num_fewshot,
                    limit=self.cfg.limit,
                    batch_size=self.cfg.batch_size,
                    device=str(accelerator_device()),
                    val_files=self.val_files,
                    val_tokens=self.cfg.val_tokens,
                    val_records=self.val_records,
                    val_sample=sample_spec(self.cfg),
                    held_out_set_file=self.held_out_set,
                    model=self.model,
                    shared=shared,
                    lockstep=self.lockstep,
                    source="training",
                )
            finally:
                if training:
                    self.model.train()  # evaluation put it in eval mode
            if dist.get_rank() == 0:
                self.last = summary
                emit(step, {_namespaced(k): v for k, v in summary["metrics"].items()})
        dist.barrier()


def sample_spec(cfg: EvalSection) -> SampleSpec:
    """The held-out sample's settings (``evals/heldout.py``) from the eval section."""
    return SampleSpec(tokens=cfg.val_tokens, tokens_per_domain=cfg.val_tokens_per_domain, seed=cfg.val_seed,
                      domains=tuple(cfg.val_domains))  # fmt: skip


def _namespaced(key: str) -> str:
    return f"eval_bucket/{key.removeprefix('bucket/')}" if key.startswith("bucket/") else f"eval/{key}"


def run_names(cfg: RunConfig, experiment: str = "") -> tuple[str, str, list[str]]:
    """W&B (name, group, tags): runs of one model shape share a group, so a group's workspace compares losses.
    The name is derived from what the run is, never pinned by a config file that an override could contradict:
    ``[experiment-]size-block-loss[-params]-sSEED`` (e.g. ``468m-llama-mile-g1-s1``); ``run.name`` wins."""
    m = cfg.model
    shape = f"{m.preset}-{m.block}"
    derived = f"{shape}-{loss_tag(cfg.loss)}-s{cfg.train.seed}"
    name = cfg.run.name or (f"{experiment}-{derived}" if experiment else derived)
    return name, cfg.wandb.group or shape, [f"loss:{cfg.loss.name}", f"size:{m.preset}", f"block:{m.block}"]


def wandb_config(cfg: RunConfig, config: dict[str, Any], group: str) -> dict[str, Any]:
    """The run's config for W&B with flat columns on top, so a study's runs table and report panels can group
    and filter by them without digging into nested sections: ``experiment`` (the W&B group: one study),
    ``loss/name``, ``loss/tag`` (the loss with the parameters that change its math, as in run names and
    scripts/compare_runs.py's groups), ``loss/<param>`` for each parameter the loss declares and each modifier
    that changes its math (``losslab.losses.loss_columns``), and ``seed``."""
    flat: dict[str, Any] = {"experiment": group, **loss_columns(cfg.loss), "seed": cfg.train.seed}
    return {**config, **flat}


def _human(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.1f}{unit}"
    return f"{x:.0f}"


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = round(seconds)
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


# eval keys that are bookkeeping, not results
_EVAL_SKIP = ("_stderr", "sample_len", "_tokens", "/tokens", "_loss")


class ConsoleProgress(Callback):
    """What a user sees while training (rank 0): at every logging step the step, the interval-mean loss and
    ``ce``, lr, throughput, MFU where known and the time left; evaluations and checkpoints on lines of their
    own. A tqdm bar on a terminal; plain lines (one per logging step) when stdout is a file or a pipe, as under
    a cluster scheduler."""

    def __init__(self, max_steps: int, start_step: int = 1, *, bar: bool | None = None) -> None:
        self.max_steps, self.start_step = max_steps, start_step
        self.width = len(str(max_steps))
        self.t0 = time.perf_counter()
        self.use_bar = sys.stdout.isatty() if bar is None else bar
        self.bar: Any = None
        if self.use_bar:  # started now, so that tqdm's rate and time left count from the first step
            from tqdm import tqdm

            self.bar = tqdm(total=max_steps, initial=start_step - 1, unit="step", file=sys.stdout, dynamic_ncols=True,
                            desc="train")  # fmt: skip

    def _write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=sys.stdout)
        else:
            print(line, file=sys.stdout, flush=True)

    def eta(self, step: int) -> float:
        done = step - self.start_step + 1
        return (time.perf_counter() - self.t0) / done * (self.max_steps - step) if done > 0 else math.inf

    def describe(self, metrics: dict[str, float]) -> list[str]:
        fields = [f"loss {metrics['loss']:.4f}"]
        if "ce" in metrics:
            fields.append(f"ce {metrics['ce']:.4f}")
        fields.append(f"lr {metrics['lr']:.2e}")
        if "grad_norm" in metrics:
            fields.append(f"gnorm {metrics['grad_norm']:.3g}")
        fields.append(f"{_human(metrics['tokens_per_s'])} tok/s")
        if "perf/mfu" in metrics:
            fields.append(f"mfu {100 * metrics['perf/mfu']:.1f}%")
        return fields

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        if any(k.startswith(("eval/", "eval_bucket/")) for k in metrics):
            self._write(_eval_line(step, metrics))
        if "loss" not in metrics or "tokens_per_s" not in metrics:
            return
        fields = self.describe(metrics)
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix_str(" | ".join(fields), refresh=True)
            return
        pct = 100 * step / self.max_steps
        head = f"step {step:>{self.width}}/{self.max_steps} ({pct:3.0f}%)"
        self._write(" | ".join([head, *fields, f"eta {_duration(self.eta(step))}"]))

    def on_checkpoint(self, step: int, ckpt: Path, *, final: bool, emit: Emit) -> None:
        self._write(f"checkpoint step {step}{' (final)' if final else ''}: {ckpt}")

    def on_end(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _eval_line(step: int, metrics: dict[str, float]) -> str:
    """``eval step 250: task/acc 0.3100 ± 0.0207 | held-out loss 5.12 (ppl 168) | ppl by frequency high 95 ...``"""
    parts = []
    for key, value in sorted(metrics.items()):
        base, at, shots = key.partition("@")  # k-shot results: task/acc@5shot, task/acc_stderr@5shot
        if key.startswith("eval/") and not base.endswith(_EVAL_SKIP):
            name = key.removeprefix("eval/")
            stderr = metrics.get(f"{base}_stderr{at}{shots}")
            parts.append(f"{name} {value:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else ""))
    if "eval_bucket/loss" in metrics:
        parts.append(f"held-out loss {metrics['eval_bucket/loss']:.4f} (ppl {metrics['eval_bucket/ppl']:.1f})")
    buckets = [(k.split("/", 1)[1].removesuffix("_ppl"), v) for k, v in metrics.items()
               if k.startswith("eval_bucket/") and k.endswith("_ppl")]  # fmt: skip
    if buckets:
        parts.append("ppl by frequency " + ", ".join(f"{name} {value:.1f}" for name, value in buckets))
    return f"eval step {step}: " + " | ".join(parts)


def build_callbacks(
    cfg: RunConfig,
    run_dir: Path,
    config_dict: dict[str, Any],
    start_step: int = 1,
    experiment: str = "",
    model: Any = None,
) -> list[Callback]:
    """``start_step``: the first step this process trains (after a resume, the checkpoint's step + 1), for the
    console's ETA. ``experiment``: a prefix for the derived W&B run name (e.g. the experiment file's stem).
    ``model``: the model as the engine holds it, which the in-loop evaluation shares out among the ranks."""
    callbacks: list[Callback] = []
    if dist.get_rank() == 0:
        callbacks.append(MetricsJsonl(run_dir / "metrics.jsonl"))
        if cfg.wandb.mode != "disabled":
            name, group, tags = run_names(cfg, experiment)
            config = wandb_config(cfg, config_dict, group)
            callbacks.append(WandbLogger(cfg.wandb, run_dir, name, group, tags, config, job_type=config["loss/tag"]))
        # before the eval callback: a checkpoint's line comes before the evaluation that follows it
        callbacks.append(ConsoleProgress(cfg.train.max_steps, start_step))
    callbacks.append(EvalCallback(cfg.eval, cfg.data.val_files, val_records=bool(cfg.data.sft_files),
                                  held_out_set=run_dir / SET_FILE, model=model,
                                  lockstep=cfg.distributed.zero_stage == 3))  # fmt: skip
    return callbacks
