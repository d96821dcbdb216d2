"""``train(cfg)``: the training loop. Set-up lives in ``run.py``, side concerns in callbacks, DeepSpeed in
``engine.py``; this file is the loop itself."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from data.batch import labels, model_inputs, to_device
from data.files import write_atomic
from evals.domains import domain_losses
from losslab.log import get_logger
from losslab.losses import IGNORE_INDEX
from models import GPT
from trainer.callbacks import EvalCallback
from trainer.checkpoint import save_checkpoint
from trainer.config import RunConfig
from trainer.engine import gathered, init_distributed, use_bf16
from trainer.lock import hold_run_dir
from trainer.perf import memory_metrics
from trainer.run import STEP_METRICS, Run, build_run
from trainer.run_dir import METRICS, RESULT
from trainer.run_record import last_logged_loss
from trainer.signals import Preempted

log = get_logger(__name__)


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
    """Train, holding the run directory for this launch alone (``trainer/lock.py``) from before anything in it is
    read until the run ends."""
    init_distributed()
    with hold_run_dir(Path(cfg.run.dir)):
        return _train(cfg)


def _train(cfg: RunConfig) -> TrainResult:
    run = build_run(cfg)
    cfg = run.cfg  # the run it trains: train.extend_to is its max_steps
    # result.json never says less than it held: until this launch logs, the run's last logged loss
    last_loss = last_logged_loss(run.run_dir / METRICS) if run.resumed_from else float("nan")
    step, preempted = run.start_step - 1, False
    ckpt = run.resumed_from  # the checkpoint it resumed from, until this launch writes one
    clock = _Clock(run.shape.tokens_per_step * step)
    try:
        if ckpt is not None:
            preempted = not _evaluate_if_owed(run, step, ckpt, final=step == cfg.train.max_steps)
        steps = range(run.start_step, cfg.train.max_steps + 1) if not preempted else range(0)  # pre-empted: none
        for step in steps:
            for cb in run.callbacks:
                cb.pre_step(step)
            _train_step(run, step)
            for cb in run.callbacks:
                cb.post_step(step)
            final = step == cfg.train.max_steps
            # Every step: the flag is reduced over a host group, so this costs no device synchronisation.
            preempted = run.preemption.requested()
            if step % cfg.train.log_every == 0 or final:
                last_loss = _log(run, step, clock)
            save = (
                (final and cfg.checkpoint.at_end)
                or preempted
                or bool(cfg.checkpoint.every and step % cfg.checkpoint.every == 0)
            )
            if run.held_out is not None and (save or step % cfg.eval.val_every == 0):
                _validate(run, step)
            if save:
                ckpt = _checkpoint(run, step)  # set first: a failing evaluation still reports the checkpoint
                preempted = not _on_checkpoint(run, step, ckpt, final=final, preempted=preempted)
            if preempted:
                log.warning(f"pre-empted: stopped after step {step}, checkpoint {ckpt}")
                break
    except BaseException as e:  # the run stops here: say so in result.json, whatever stopped it
        _write_result(run, complete=False, step=step, loss=last_loss, ckpt=ckpt, error=f"{type(e).__name__}: {e}")
        _end_callbacks(run, failed=True)
        raise
    _end_callbacks(run, failed=False)
    run.preemption.restore()
    _write_result(run, complete=not preempted and step == cfg.train.max_steps, step=step, loss=last_loss, ckpt=ckpt)
    return TrainResult(
        run_dir=run.run_dir,
        steps=step,
        tokens=step * run.shape.tokens_per_step,
        final_loss=last_loss,
        checkpoint=ckpt,
        eval=next(cb for cb in run.callbacks if isinstance(cb, EvalCallback)).last,
        model=run.model,
        preempted=preempted,
    )


def _on_checkpoint(run: Run, step: int, ckpt: Path, *, final: bool, preempted: bool) -> bool:
    """Every callback's ``on_checkpoint``, the evaluation's interruptible (``_evaluate``); False when a pre-emption
    signal, received during the step (``preempted``) or during the evaluation, left the evaluation undone."""
    evaluated = True
    for cb in run.callbacks:
        if isinstance(cb, EvalCallback):
            evaluated = not preempted and _evaluate(run, cb, step, ckpt, final=final)
        else:
            cb.on_checkpoint(step, ckpt, final=final, emit=run.emit)
    return evaluated


def _evaluate(run: Run, evaluation: EvalCallback, step: int, ckpt: Path, *, final: bool) -> bool:
    """The evaluation of checkpoint ``ckpt``, stopped at once by a pre-emption signal (False then): it can outlast
    any notice a scheduler gives, and the relaunch makes it before anything else (``_evaluate_if_owed``), from
    the checkpoint already on disk. Ranks evaluating together each get the signal (a job's process group, or the
    launcher forwarding it); one waiting in a collective for a rank that stopped is released by that rank's exit
    (tests/test_operator.py: two ZeRO-3 ranks under the deepspeed launcher end within seconds)."""
    try:
        with run.preemption.interruptible(f"the evaluation of {ckpt}"):
            evaluation.on_checkpoint(step, ckpt, final=final, emit=run.emit)
    except Preempted:
        log.warning(f"pre-empted during the evaluation of {ckpt}: the relaunch (train.resume=auto) makes it")
        return False
    return True


def _evaluate_if_owed(run: Run, step: int, ckpt: Path, *, final: bool) -> bool:
    """The in-loop evaluation of the checkpoint this launch resumed from, where the launch that wrote it stopped
    before that evaluation ended (killed or pre-empted while it ran): made now, before any step, so that no
    evaluation the run's settings ask for is silently missing. From the run's final checkpoint
    (``trainer/resume_check.py``) this is all a relaunch does before the run ends. False when pre-empted again."""
    evaluation = next(cb for cb in run.callbacks if isinstance(cb, EvalCallback))
    if not evaluation.owed(ckpt, final=final):
        return True
    if torch.distributed.get_rank() == 0:
        print(f"evaluating {ckpt}: its evaluation did not finish before the last launch stopped", flush=True)
    return _evaluate(run, evaluation, step, ckpt, final=final)


def _write_result(
    run: Run, *, complete: bool, step: int, loss: float, ckpt: Path | None, error: str | None = None
) -> None:
    """``result.json``, written at every stop (finished, pre-empted, or stopped by an error)."""
    if torch.distributed.get_rank() != 0:
        return
    result = {
        "complete": complete,
        "steps": step,
        "tokens": step * run.shape.tokens_per_step,
        "final_loss": loss if math.isfinite(loss) else None,
        "checkpoint": str(ckpt) if ckpt else None,
    }
    if error is not None:
        result["error"] = error.splitlines()[0] if error else error
    try:
        write_atomic(run.run_dir / RESULT, json.dumps(result, indent=2) + "\n")
    except OSError as e:  # a full disk: say so, and let the error that stopped the run be the one reported
        log.warning(f"warning: {run.run_dir / RESULT} could not be written: {e}")
        if error is None:
            raise


def _end_callbacks(run: Run, *, failed: bool) -> None:
    for cb in run.callbacks:
        try:
            cb.on_end()
        except Exception as e:  # a logger that cannot close must not hide why the run stopped
            if not failed:
                raise
            log.warning(f"warning: {type(cb).__name__} did not close: {e}")


def _train_step(run: Run, step: int) -> None:
    """One optimizer step over ``grad_accum`` micro-batches; adds its metrics to the logging interval (on device).

    A non-finite loss is caught on the device: the fused AdamW reads ``found_inf`` and leaves parameters and
    moments untouched, so the step is skipped without a host sync; the count is checked at logging steps.
    (With the optimizer offloaded, or under ZeRO in fp32, DeepSpeed's own overflow check skips it instead.)
    """
    engine, optimizer, shape, tally = run.engine, run.optimizer, run.shape, run.tally
    sums = torch.zeros(len(STEP_METRICS), device=engine.device, dtype=torch.float32)
    zero = sums[0].clone()
    micro_batches = [to_device(next(run.batches), engine.device) for _ in range(shape.grad_accum)]  # [B, T+1] each
    # Token-mean losses divide by the step's global count of valid tokens (DeepSpeed then averages over
    # micro-steps and ranks, hence the factor): exact even when batches hold different numbers of them.
    valid = sum((labels(w) != IGNORE_INDEX).sum() for w in micro_batches).float()
    if shape.world_size > 1:
        torch.distributed.all_reduce(valid)
    denominator = valid / (shape.grad_accum * shape.world_size)
    for micro, windows in enumerate(micro_batches):
        out = engine(**model_inputs(windows), denominator=denominator)
        loss = out.loss
        for cb in run.callbacks:
            loss = cb.micro_loss(step, micro, loss)
        engine.backward(loss)
        # a metric the loss does not compute (entropy, unless asked for) adds 0 here and is not logged (_log)
        sums += torch.stack([loss.detach().float()] + [out.metrics.get(k, zero).float() for k in STEP_METRICS[1:]])
        if micro == shape.grad_accum - 1:
            bad = (~torch.isfinite(sums[0])).int()
            if shape.world_size > 1:  # every rank must skip together (a device collective, not a host sync)
                torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
            optimizer.found_inf = bad.float()
            tally.nonfinite_total += bad
            tally.nonfinite_run = (tally.nonfinite_run + 1) * bad
            tally.nonfinite_max_run = torch.maximum(tally.nonfinite_max_run, tally.nonfinite_run)
            tally.last_nonfinite_step = torch.where(bad.bool(), step, tally.last_nonfinite_step)
            if shape.loop_clips:  # after the last backward, where the gradients are complete (and all-reduced)
                max_norm = run.cfg.train.grad_clip or math.inf  # 0: measure only (a factor of exactly 1)
                tally.grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), max_norm)
        engine.step()
    optimizer.found_inf = None
    # the interval's metrics are means over its finite steps (a skipped step changed nothing)
    good = (1 - bad).float()
    tally.interval[:-1] += torch.nan_to_num(sums / shape.grad_accum) * good
    tally.interval[-1] += good


class _Clock:
    def __init__(self, tokens: int) -> None:
        self.time, self.tokens = time.perf_counter(), tokens

    def rate(self, tokens: int) -> float:
        now = time.perf_counter()
        rate = (tokens - self.tokens) / max(now - self.time, 1e-9)
        self.time, self.tokens = now, tokens
        return rate


def _log(run: Run, step: int, clock: _Clock) -> float:
    """The loop's only host sync: one all-reduce of every logged scalar, on logging steps. ``loss`` and the
    other step metrics are means over the interval since the last logging step."""
    tally, shape = run.tally, run.shape
    finite_steps = tally.interval[-1].clamp(min=1)
    means = torch.where(tally.interval[-1] > 0, tally.interval[:-1] / finite_steps, torch.nan)
    counters = torch.stack([tally.nonfinite_total, tally.nonfinite_max_run, tally.last_nonfinite_step]).float()
    values = run.reduce_mean(torch.cat([means, counters]))  # counters are equal on all ranks (the loss is global)
    tally.interval.zero_()
    metrics = dict(zip(STEP_METRICS, values[: len(STEP_METRICS)], strict=True))
    if not shape.logs_entropy:
        del metrics["entropy"]  # not computed (loss.log_entropy): no number rather than a made-up one
    nonfinite_total, max_run, last_bad = (round(v) for v in values[len(STEP_METRICS) :])
    tally.nonfinite_max_run.zero_()
    limit = run.cfg.train.max_nonfinite_in_a_row
    if limit and max_run >= limit:
        raise NonFiniteLossError(
            f"the loss was not finite for {max_run} steps in a row (the last at step {last_bad}); stopping "
            f"(train.max_nonfinite_in_a_row={limit})"
        )
    if nonfinite_total and nonfinite_total > tally.nonfinite_reported:
        log.warning(f"warning: non-finite loss at step {last_bad}; {nonfinite_total} step(s) skipped so far")
        tally.nonfinite_reported = nonfinite_total
    tokens = step * shape.tokens_per_step
    tokens_per_s = clock.rate(tokens)
    flops_per_device = tokens_per_s / shape.world_size * shape.flops_per_token  # achieved FLOP/s of one rank
    metrics["perf/tflops_per_device"] = flops_per_device / 1e12
    metrics.update(memory_metrics())  # this rank's
    if shape.peak_flops:
        metrics["perf/mfu"] = flops_per_device / shape.peak_flops
    metrics.update(
        lr=run.engine.get_lr()[0],
        tokens=tokens,
        tokens_per_s=tokens_per_s,
        skipped_nonfinite_steps=nonfinite_total,
        **{f"data/{k}": v for k, v in run.source.stats.as_dict().items()},
    )
    grad_norm = tally.grad_norm if shape.loop_clips else run.engine.get_global_grad_norm()
    if grad_norm is not None and math.isfinite(float(grad_norm)):
        metrics["grad_norm"] = float(grad_norm)
    run.emit(step, metrics)
    return metrics["loss"]


def _validate(run: Run, step: int) -> None:
    """Held-out loss per domain on the fixed set (every rank takes part: the forward may gather weights)."""
    assert run.held_out is not None
    with gathered(run.engine, [run.model.head.weight]):
        metrics = domain_losses(run.model, run.held_out, batch_size=run.cfg.eval.batch_size)
    run.emit(step, {f"eval_domain/{k}": v for k, v in metrics.items()})


def _checkpoint(run: Run, step: int) -> Path:
    def before_commit(tmp: Path) -> None:
        for cb in run.callbacks:
            cb.pre_checkpoint_commit(step, tmp)

    meta = {
        "step": step,
        "tokens": step * run.shape.tokens_per_step,
        "data_state": run.source.state_dict(),
        "data_stats": run.source.stats.as_dict(),
        # the logging interval in progress, so a run resumed mid-interval logs what an uninterrupted one would
        "log_interval": run.tally.interval.tolist(),
        "tokenizer_sha256": run.saved.tokenizer_sha256,
        "world_size": run.shape.world_size,
        "precision": "bf16" if use_bf16(run.cfg.train.precision) else "fp32",  # what "auto" was, for a resume
        **run.saved.data,  # the data's fingerprint and changes, compared on resume
    }
    ckpt = save_checkpoint(
        run.engine,
        run.run_dir,
        step,
        meta=meta,
        config_yaml=run.saved.config_yaml,
        model_cfg=run.model.cfg,
        tokenizer_files=run.saved.tokenizer_files,
        keep=run.cfg.checkpoint.keep,
        token_counts=run.saved.token_counts,
        portable=run.cfg.checkpoint.portable_optimizer,
        before_commit=before_commit,
    )
    return ckpt
