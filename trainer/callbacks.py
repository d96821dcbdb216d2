"""Side concerns of the training loop, each in its own small callback: metrics file, W&B, in-loop eval."""

from __future__ import annotations

import importlib.util
import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.distributed as dist

from trainer.config import ConfigError, EvalSection, RunConfig, WandbSection

Emit = Callable[[int, dict[str, float]], None]

# metrics.jsonl keeps flat names; W&B groups them by namespace
WANDB_NAMESPACE = {"eval", "eval_bucket", "data", "perf"}


class Callback:
    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        pass

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
        self, cfg: WandbSection, run_dir: Path, name: str, group: str, tags: list[str], config: dict[str, Any]
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
    """lm-eval on the saved checkpoint (the exact weights a user would evaluate later), on rank 0 while the
    other ranks wait at a barrier. Runs after the final checkpoint, and after each one if configured."""

    def __init__(self, cfg: EvalSection, val_files: list[str]) -> None:
        self.cfg = cfg
        self.val_files = val_files if cfg.buckets else []
        self.last: dict[str, Any] | None = None

    def on_checkpoint(self, step: int, ckpt: Path, *, final: bool, emit: Emit) -> None:
        if not (self.cfg.tasks or self.val_files) or not (final or self.cfg.every_checkpoint):
            return
        if dist.get_rank() == 0:
            from evals.runner import evaluate_checkpoint
            from trainer.engine import accelerator_device

            self.last = evaluate_checkpoint(
                ckpt,
                self.cfg.tasks,
                task_dir=self.cfg.task_dir,
                num_fewshot=self.cfg.num_fewshot,
                limit=self.cfg.limit,
                batch_size=self.cfg.batch_size,
                device=str(accelerator_device()),
                val_files=self.val_files,
                val_tokens=self.cfg.val_tokens,
            )
            emit(step, {_namespaced(k): v for k, v in self.last["metrics"].items()})
        dist.barrier()


def _namespaced(key: str) -> str:
    return f"eval_bucket/{key.removeprefix('bucket/')}" if key.startswith("bucket/") else f"eval/{key}"


def run_names(cfg: RunConfig) -> tuple[str, str, list[str]]:
    """W&B (name, group, tags): runs of one model shape share a group, so a group's workspace compares losses;
    the name says size, block, loss and seed (e.g. ``468m-neox-mile-s1``). Explicit names win."""
    m = cfg.model
    shape = f"{m.preset}-{m.block}"
    name = cfg.run.name or f"{shape}-{cfg.loss.name}-s{cfg.train.seed}"
    return name, cfg.wandb.group or shape, [f"loss:{cfg.loss.name}", f"size:{m.preset}", f"block:{m.block}"]


def build_callbacks(cfg: RunConfig, run_dir: Path, config_dict: dict[str, Any]) -> list[Callback]:
    callbacks: list[Callback] = []
    if dist.get_rank() == 0:
        callbacks.append(MetricsJsonl(run_dir / "metrics.jsonl"))
        if cfg.wandb.mode != "disabled":
            name, group, tags = run_names(cfg)
            callbacks.append(WandbLogger(cfg.wandb, run_dir, name, group, tags, config_dict))
    callbacks.append(EvalCallback(cfg.eval, cfg.data.val_files))
    return callbacks
