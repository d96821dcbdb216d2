"""``train(cfg)``: the training loop. Side concerns live in callbacks; DeepSpeed lives in ``engine.py``."""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from data.source import build_source, token_counts
from data.tokenizer import Tokenizer
from models import GPT
from trainer.callbacks import Callback, EvalCallback, build_callbacks
from trainer.checkpoint import CHECKPOINTS, save_checkpoint
from trainer.config import RunConfig, model_config, to_yaml
from trainer.engine import build_engine, init_distributed
from trainer.losses import LOSSES, build_loss
from trainer.objective import CausalLMObjective
from trainer.optim import build_optimizer, build_scheduler
from trainer.run_info import file_sha256, git_sha

# summed over micro-steps and averaged over ranks at logging steps
STEP_METRICS = ("loss", "ce", "entropy", "weight")


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    tokens: int
    final_loss: float
    checkpoint: Path
    eval: dict[str, Any] | None
    model: GPT
    """The trained model as held by this rank (partitioned under ZeRO-3)."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _reduce_mean(values: torch.Tensor) -> list[float]:
    """One all-reduce for all logged scalars, only on logging steps (the only host sync of the loop)."""
    if dist.get_world_size() > 1:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values = values / dist.get_world_size()
    return values.tolist()


def _prepare_run_dir(run_dir: Path, *, overwrite: bool) -> None:
    previous = [run_dir / "metrics.jsonl", run_dir / CHECKPOINTS]
    if any(p.exists() for p in previous):
        if not overwrite:
            raise FileExistsError(
                f"run directory {str(run_dir)!r} already holds a run; choose another run.dir or set run.overwrite=true"
            )
        dist.barrier()  # every rank has looked before rank 0 removes anything
        if dist.get_rank() == 0:
            for p in previous:
                if p.is_dir():
                    shutil.rmtree(p)
                else:
                    p.unlink(missing_ok=True)
    dist.barrier()
    run_dir.mkdir(parents=True, exist_ok=True)


def train(cfg: RunConfig) -> TrainResult:
    rank, world = init_distributed()
    seed_everything(cfg.train.seed)
    run_dir = Path(cfg.run.dir)
    _prepare_run_dir(run_dir, overwrite=cfg.run.overwrite)

    # Data first: a missing file, tokenizer or empty corpus fails before any heavy work.
    tokenizer = Tokenizer(cfg.data.tokenizer)
    stream = build_source(
        cfg.data, tokenizer, batch_size=cfg.train.micro_batch_size, seed=cfg.train.seed, rank=rank, world_size=world
    )
    batches = iter(stream)
    pending = next(batches)  # [B, T+1]

    counts = None
    if LOSSES[cfg.loss.name].needs_token_counts:
        counts = token_counts(cfg.data, stream, tokenizer, seed=cfg.train.seed)

    model_cfg = model_config(cfg, tokenizer.vocab_size)
    model = GPT(model_cfg)
    objective = CausalLMObjective(model, build_loss(cfg.loss, token_counts=counts))
    optimizer = build_optimizer(model, cfg.train)
    engine = build_engine(objective, optimizer, build_scheduler(optimizer, cfg.train), cfg.train)
    device = engine.device

    config_yaml = to_yaml(cfg)
    config_dict = OmegaConf.to_container(OmegaConf.structured(cfg))
    run_info = {
        "git_sha": git_sha(),
        "world_size": world,
        "num_params": model.num_params(),
        "model": model_cfg.__dict__,
        "tokenizer_sha256": file_sha256(cfg.data.tokenizer),
        "data_files": stream.files,
    }
    if rank == 0:
        (run_dir / "config.yaml").write_text(config_yaml)
        (run_dir / "run_info.json").write_text(json.dumps(run_info, indent=2))
    callbacks: list[Callback] = build_callbacks(cfg, run_dir, {**config_dict, "run_info": run_info})

    def emit(step: int, metrics: dict[str, float]) -> None:
        for cb in callbacks:
            cb.on_log(step, metrics)

    tokens_per_step = cfg.train.micro_batch_size * cfg.train.grad_accum * world * cfg.data.seq_len
    last_time, last_tokens, last_loss = time.perf_counter(), 0, float("nan")
    ckpt: Path | None = None
    for step in range(1, cfg.train.max_steps + 1):
        sums = torch.zeros(len(STEP_METRICS), device=device, dtype=torch.float32)
        for _ in range(cfg.train.grad_accum):
            windows = pending if pending is not None else next(batches)
            pending = None
            out = engine(windows.to(device))
            engine.backward(out.loss)
            engine.step()
            sums += torch.stack([out.loss.detach().float()] + [out.metrics[k].float() for k in STEP_METRICS[1:]])

        if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
            values = dict(zip(STEP_METRICS, _reduce_mean(sums / cfg.train.grad_accum), strict=True))
            last_loss = values["loss"]
            if not math.isfinite(last_loss):
                raise FloatingPointError(f"non-finite training loss {last_loss} at step {step}")
            now, tokens = time.perf_counter(), step * tokens_per_step
            metrics = {
                **values,
                "lr": engine.get_lr()[0],
                "tokens": tokens,
                "tokens_per_s": (tokens - last_tokens) / max(now - last_time, 1e-9),
                **{f"data/{k}": v for k, v in stream.stats.as_dict().items()},
            }
            grad_norm = engine.get_global_grad_norm()
            if grad_norm is not None:
                metrics["grad_norm"] = float(grad_norm)
            emit(step, metrics)
            last_time, last_tokens = now, tokens

        final = step == cfg.train.max_steps
        if final or (cfg.checkpoint.every and step % cfg.checkpoint.every == 0):
            meta = {
                "tokens": step * tokens_per_step,
                "data_state": stream.state_dict(),
                "data_stats": stream.stats.as_dict(),
                "tokenizer_sha256": run_info["tokenizer_sha256"],
            }
            ckpt = save_checkpoint(
                engine,
                run_dir,
                step,
                meta=meta,
                config_yaml=config_yaml,
                model_cfg=model_cfg,
                tokenizer_path=cfg.data.tokenizer,
                keep=cfg.checkpoint.keep,
            )
            for cb in callbacks:
                cb.on_checkpoint(step, ckpt, final=final, emit=emit)

    for cb in callbacks:
        cb.on_end()
    assert ckpt is not None
    eval_cb = next(cb for cb in callbacks if isinstance(cb, EvalCallback))
    return TrainResult(
        run_dir=run_dir,
        steps=cfg.train.max_steps,
        tokens=cfg.train.max_steps * tokens_per_step,
        final_loss=last_loss,
        checkpoint=ckpt,
        eval=eval_cb.last,
        model=model,
    )
