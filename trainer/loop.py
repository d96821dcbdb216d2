"""``train(cfg)``: the training loop. Set-up lives in ``run.py``, side concerns in callbacks, DeepSpeed in
``engine.py``; this file is the loop itself."""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from models import GPT
from trainer.callbacks import EvalCallback
from trainer.checkpoint import save_checkpoint
from trainer.config import RunConfig
from trainer.losses import IGNORE_INDEX
from trainer.perf import memory_metrics
from trainer.run import RESULT, Run, build_run

# summed over micro-steps and averaged over ranks at logging steps
STEP_METRICS = ("loss", "ce", "entropy", "weight")


class NonFiniteLossError(FloatingPointError):
    pass


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    tokens: int
    final_loss: float
    checkpoint: Path | None
    """The last checkpoint written (None when checkpoint.at_end=false and none was due)."""
    eval: dict[str, Any] | None
    model: GPT
    """The trained model as held by this rank (partitioned under ZeRO-3)."""
    preempted: bool = False


def train(cfg: RunConfig) -> TrainResult:
    run = build_run(cfg)
    step, last_loss, preempted = run.start_step - 1, float("nan"), False
    resumed = run.info["resumed_from"]
    ckpt = Path(resumed) if resumed else None  # a run resumed at its last step has nothing left to do
    clock = _Clock(run.tokens_per_step * step)
    for step in range(run.start_step, cfg.train.max_steps + 1):
        if cfg.debug.sigterm_at_step == step:
            os.kill(os.getpid(), signal.SIGTERM)
        sums = _train_step(run, step)
        final = step == cfg.train.max_steps
        log_step = step % cfg.train.log_every == 0
        # Ranks agree on a signal with a collective (a host sync), so several ranks check at logging steps only;
        # a single process checks its flag every step.
        preempted = (run.world_size == 1 or log_step) and run.preemption.requested()
        if log_step or final or preempted:
            last_loss = _log(run, step, sums, clock)
        if (
            (final and cfg.checkpoint.at_end)
            or preempted
            or (cfg.checkpoint.every and step % cfg.checkpoint.every == 0)
        ):
            ckpt = _checkpoint(run, step, final=final)
        if preempted:
            print(f"pre-empted: stopped after step {step}, checkpoint {ckpt}", file=sys.stderr, flush=True)
            break
    for cb in run.callbacks:
        cb.on_end()
    run.preemption.restore()
    if torch.distributed.get_rank() == 0:
        result = {"complete": not preempted and step == cfg.train.max_steps, "steps": step,
                  "tokens": step * run.tokens_per_step, "final_loss": last_loss if math.isfinite(last_loss) else None,
                  "checkpoint": str(ckpt) if ckpt else None}  # fmt: skip
        (run.run_dir / RESULT).write_text(json.dumps(result, indent=2) + "\n")
    return TrainResult(
        run_dir=run.run_dir,
        steps=step,
        tokens=step * run.tokens_per_step,
        final_loss=last_loss,
        checkpoint=ckpt,
        eval=next(cb for cb in run.callbacks if isinstance(cb, EvalCallback)).last,
        model=run.model,
        preempted=preempted,
    )


def _train_step(run: Run, step: int) -> torch.Tensor:
    """One optimizer step over ``grad_accum`` micro-batches; returns the summed metrics (on device).

    A non-finite loss is caught on the device: the fused AdamW reads ``found_inf`` and leaves parameters and
    moments untouched, so the step is skipped without a host sync; the count is checked at logging steps.
    """
    engine, optimizer = run.engine, run.optimizer
    sums = torch.zeros(len(STEP_METRICS), device=engine.device, dtype=torch.float32)
    micro_batches = [run.next_batch().to(engine.device) for _ in range(run.grad_accum)]  # [B, T+1] each
    # Token-mean losses divide by the step's global count of valid tokens (DeepSpeed then averages over
    # micro-steps and ranks, hence the factor): exact even when batches hold different numbers of them.
    valid = sum((w[:, 1:] != IGNORE_INDEX).sum() for w in micro_batches).float()
    if run.world_size > 1:
        torch.distributed.all_reduce(valid)
    denominator = valid / (run.grad_accum * run.world_size)
    for micro, windows in enumerate(micro_batches):
        out = engine(windows, denominator=denominator)
        loss = out.loss
        if run.cfg.debug.nan_at_step == step:
            loss = loss * float("nan")
        engine.backward(loss)
        sums += torch.stack([loss.detach().float()] + [out.metrics[k].float() for k in STEP_METRICS[1:]])
        if micro == run.grad_accum - 1:
            bad = (~torch.isfinite(sums[0])).int()
            if run.world_size > 1:  # every rank must skip together (a device collective, not a host sync)
                torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
            optimizer.found_inf = bad.float()
            run.nonfinite_total += bad
            run.nonfinite_run = (run.nonfinite_run + 1) * bad
            run.nonfinite_max_run = torch.maximum(run.nonfinite_max_run, run.nonfinite_run)
            run.last_nonfinite_step = torch.where(bad.bool(), step, run.last_nonfinite_step)
        engine.step()
    optimizer.found_inf = None
    return sums / run.grad_accum


class _Clock:
    def __init__(self, tokens: int) -> None:
        self.time, self.tokens = time.perf_counter(), tokens

    def rate(self, tokens: int) -> float:
        now = time.perf_counter()
        rate = (tokens - self.tokens) / max(now - self.time, 1e-9)
        self.time, self.tokens = now, tokens
        return rate


def _log(run: Run, step: int, sums: torch.Tensor, clock: _Clock) -> float:
    """The loop's only host sync: one all-reduce of every logged scalar, on logging steps."""
    counters = torch.stack([run.nonfinite_total, run.nonfinite_max_run, run.last_nonfinite_step]).float()
    values = run.reduce_mean(torch.cat([sums, counters]))  # counters are equal on all ranks (the loss is global)
    metrics = dict(zip(STEP_METRICS, values[: len(STEP_METRICS)], strict=True))
    nonfinite_total, max_run, last_bad = (round(v) for v in values[len(STEP_METRICS) :])
    run.nonfinite_max_run.zero_()
    limit = run.cfg.train.max_nonfinite_in_a_row
    if limit and max_run >= limit:
        raise NonFiniteLossError(
            f"the loss was not finite for {max_run} steps in a row (the last at step {last_bad}); stopping "
            f"(train.max_nonfinite_in_a_row={limit})"
        )
    if nonfinite_total and nonfinite_total > run.nonfinite_reported:
        print(f"warning: non-finite loss at step {last_bad}; {nonfinite_total} step(s) skipped so far", file=sys.stderr)
        run.nonfinite_reported = nonfinite_total
    tokens = step * run.tokens_per_step
    tokens_per_s = clock.rate(tokens)
    flops_per_device = tokens_per_s / run.world_size * run.flops_per_token  # achieved FLOP/s of one rank
    metrics["perf/tflops_per_device"] = flops_per_device / 1e12
    metrics.update(memory_metrics())  # this rank's
    if run.peak_flops:
        metrics["perf/mfu"] = flops_per_device / run.peak_flops
    metrics.update(
        lr=run.engine.get_lr()[0],
        tokens=tokens,
        tokens_per_s=tokens_per_s,
        skipped_nonfinite_steps=nonfinite_total,
        **{f"data/{k}": v for k, v in run.source.stats.as_dict().items()},
    )
    grad_norm = run.engine.get_global_grad_norm()
    if grad_norm is not None and math.isfinite(float(grad_norm)):
        metrics["grad_norm"] = float(grad_norm)
    run.emit(step, metrics)
    return metrics["loss"]


def _checkpoint(run: Run, step: int, *, final: bool) -> Path:
    meta = {
        "step": step,
        "tokens": step * run.tokens_per_step,
        "data_state": run.source.state_dict(),
        "data_stats": run.source.stats.as_dict(),
        "tokenizer_sha256": run.info["tokenizer_sha256"],
        "world_size": run.world_size,
    }
    ckpt = save_checkpoint(
        run.engine,
        run.run_dir,
        step,
        meta=meta,
        config_yaml=run.config_yaml,
        model_cfg=run.model.cfg,
        tokenizer_path=run.cfg.data.tokenizer,
        keep=run.cfg.checkpoint.keep,
        token_counts=run.token_counts,
        portable=run.cfg.checkpoint.portable_optimizer,
        die_midway=run.cfg.debug.kill_in_checkpoint_at_step == step,
    )
    for cb in run.callbacks:
        cb.on_checkpoint(step, ckpt, final=final, emit=run.emit)
    return ckpt
