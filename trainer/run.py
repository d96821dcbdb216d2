"""Everything a training run holds, built once: process group, run directory, data, model, engine, callbacks,
and — when resuming — the restored state. Errors in config, data or tokenizer surface here, before the
model is built.

``build_run`` is a sequence of named steps, each a small function: check the inputs (choosing what to resume
first), prepare the run directory, build the data's derived state, build the model and its engine, restore a
checkpoint, record the launch. What the steps hand each other is ``Inputs``; what the loop gets is ``Run``."""

from __future__ import annotations

import dataclasses
import itertools
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from data.files import git_commit
from data.mixture import MixtureReport
from data.mixture import describe as describe_mixture
from data.shards import DataError, resolve_files
from data.source import BatchSource, build_source, token_counts
from data.tokenizer import Tokenizer
from evals.domains import DomainSet, build_domain_set
from evals.heldout import SET_FILE, load_or_sample, pack
from evals.task_sets import check_tasks
from losslab.losses import build_loss
from losslab.losses.weighting import resolve_loss
from models import GPT, GPTConfig
from models.checkpoint import META, check_model_fits, load_model, read_meta
from models.checkpoint_files import CheckpointError, load_json
from trainer import parallelize
from trainer.callbacks import Callback, build_callbacks, require_wandb, sample_spec
from trainer.checkpoint import choose_resume, restore, start_space_check
from trainer.config import ConfigError, RunConfig, grad_accum_steps, model_config, to_dict, to_yaml
from trainer.data_guard import CHANGES, FINGERPRINT, check_data
from trainer.engine import (
    accelerator_device,
    build_engine,
    build_optimizer,
    init_distributed,
    loop_clips_gradients,
)
from trainer.init_from import InitSource, init_source, init_weights, model_from_init
from trainer.objective import CausalLMObjective
from trainer.optim import build_scheduler, param_groups
from trainer.perf import flops_per_token, peak_flops
from trainer.plugins import load_callbacks
from trainer.resume_check import Plan, plan_launch
from trainer.run_dir import METRICS, finished, prepare_run_dir, truncate_metrics
from trainer.run_record import announce, launch_entry, launches
from trainer.signals import Preemption

STEP_METRICS = ("loss", "ce", "entropy", "weight", "z_loss")
"""Per-step metrics of the objective, averaged over micro-steps, ranks and the logging interval."""


# --- what the loop needs ---------------------------------------------------------------------------------------


@dataclass
class StepShape:
    """How one optimizer step is laid out and what it yields: fixed for the launch."""

    world_size: int
    grad_accum: int
    tokens_per_step: int
    flops_per_token: float
    peak_flops: float | None
    loop_clips: bool
    """The loop clips gradients itself (``engine.loop_clips_gradients``); ``grad_norm`` is then its norm."""
    logs_entropy: bool
    """The loss computes the entropy (it uses it, or ``loss.log_entropy``): else ``entropy`` is not logged."""


@dataclass
class CheckpointRecord:
    """What every checkpoint of the run carries besides DeepSpeed's state and the loop's position."""

    config_yaml: str
    tokenizer_files: dict[str, str]
    tokenizer_sha256: str
    token_counts: torch.Tensor | None
    data: dict[str, Any]
    """What the run trains on, compared on resume (``trainer/data_guard.py``): the data's fingerprint and the
    changes let through; rank 0's (which writes ``meta.json``)."""


@dataclass
class Tally:
    """The loop's running numbers, on the device (read at logging steps only: no host sync in between)."""

    interval: torch.Tensor
    """[len(STEP_METRICS) + 1]: sums of the step metrics over the finite steps since the last log, and their count."""
    nonfinite_total: torch.Tensor
    nonfinite_run: torch.Tensor
    nonfinite_max_run: torch.Tensor
    last_nonfinite_step: torch.Tensor
    nonfinite_reported: int = 0
    grad_norm: torch.Tensor | None = None

    @classmethod
    def on(cls, device: torch.device, interval: list[float] | None) -> Tally:
        """Zero counters, and the logging interval in progress (restored from a checkpoint, else zero)."""
        n = len(STEP_METRICS) + 1
        if interval is None or len(interval) != n:
            interval = [0.0] * n
        counters = [torch.zeros((), dtype=torch.int32, device=device) for _ in range(4)]
        return cls(torch.tensor(interval, dtype=torch.float32, device=device), *counters)


@dataclass
class Run:
    """What the training loop needs (``loop.py``): the run's config and directory, the step's shape, the data,
    the model with its engine, the callbacks, and the running tally."""

    cfg: RunConfig
    run_dir: Path
    shape: StepShape
    source: BatchSource
    batches: Iterator[Any]
    """The micro-batches to train on, from the data position the run starts at."""
    model: GPT
    engine: Any
    optimizer: torch.optim.Optimizer
    callbacks: list[Callback]
    preemption: Preemption
    saved: CheckpointRecord
    tally: Tally
    start_step: int
    resumed_from: Path | None = None
    held_out: DomainSet | None = None
    """The held-out set's windows with each token's domain (``eval.val_every``)."""

    def emit(self, step: int, metrics: dict[str, float]) -> None:
        for cb in self.callbacks:
            cb.on_log(step, metrics)

    def reduce_mean(self, values: torch.Tensor) -> list[float]:
        if self.shape.world_size > 1:
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
            values = values / self.shape.world_size
        return values.tolist()


# --- what set-up needs -----------------------------------------------------------------------------------------


@dataclass
class Inputs:
    """What the set-up steps hand each other: the inputs, checked before anything heavy is built or the run
    directory is touched."""

    cfg: RunConfig
    """The run this launch trains (``train.extend_to`` is its max_steps)."""
    rank: int
    world: int
    grad_accum: int
    plugins: list[Callback]
    resume_ckpt: Path | None
    tokenizer: Tokenizer
    source: BatchSource
    probe: Iterator[Any]
    first: Any
    """The first batch [B, T+1], drawn from ``probe`` to check that the corpus yields one."""
    mixture: MixtureReport | None
    data_record: dict[str, Any]
    """The data's fingerprint, and the changes that data.allow_changed let through."""
    init: InitSource | None
    model_cfg: GPTConfig
    plan: Plan


@dataclass
class Start:
    """Where the loop starts: the step, the logging interval in progress, the micro-batches from there on."""

    step: int
    interval: list[float] | None
    batches: Iterator[Any]


def build_run(cfg: RunConfig) -> Run:
    """Check the inputs (the checkpoint to resume chosen first), prepare the run directory, build the data's
    derived state, the model and its engine, restore the checkpoint, record the launch; the run the loop gets."""
    inputs = _check_inputs(cfg)
    run_dir = Path(inputs.cfg.run.dir)
    prepare_run_dir(run_dir, inputs.cfg, inputs.resume_ckpt)
    start_space_check(run_dir)
    counts = _build_data(inputs)
    objective, optimizer, engine = _build_model_and_engine(inputs, counts)
    start = _restore(inputs, engine, run_dir)
    saved, info = _record_launch(inputs, run_dir, objective.model, counts, start.step)
    run = _assemble(inputs, run_dir, objective, optimizer, engine, start, saved, info)
    announce(inputs.plan, run.emit, rank=inputs.rank)
    return run


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _check_inputs(cfg: RunConfig) -> Inputs:
    """Everything that can be checked is checked before any heavy work and before the run directory is touched:
    plug-in callbacks, the checkpoint to resume (chosen first, its files checked against their checksums), data
    files, tokenizer, the corpus yielding a batch, the checkpoint to start from, the relaunch against the run
    it continues, eval tasks."""
    require_wandb(cfg.wandb)
    rank, world = init_distributed()
    plugins = load_callbacks(cfg.run.callbacks)  # before the seed: whatever they draw moves no run's RNG
    grad_accum = grad_accum_steps(cfg.train, world, cfg.data.seq_len)  # impossible batch arithmetic fails here
    seed_everything(cfg.train.seed)
    run_dir = Path(cfg.run.dir)
    resume_ckpt = choose_resume(cfg.train.resume, run_dir)  # its files checked against their checksums

    tokenizer = Tokenizer(cfg.data.tokenizer)
    micro = cfg.train.micro_batch_size
    source = build_source(cfg.data, tokenizer, batch_size=micro, seed=cfg.train.seed, rank=rank, world_size=world)
    resolve_files(cfg.data.val_files)  # held-out files are checked now, not when the first evaluation runs
    planned = cfg.train.max_steps * micro * grad_accum * world * cfg.data.seq_len
    mixture = describe_mixture(cfg.data, planned_tokens=planned) if rank == 0 else None  # what the run will get
    if mixture is not None:
        print(mixture.render(), flush=True)
    probe = iter(source)
    first = next(probe)  # [B, T+1]
    data_record = check_data(cfg.data, source.files, resume_ckpt, read_meta(resume_ckpt) if resume_ckpt else None)
    init = init_source(cfg.model.init_from, tokenizer) if cfg.model.init_from else None
    model_cfg = model_from_init(cfg, init) if init else model_config(cfg, tokenizer.vocab_size)
    if resume_ckpt is not None:
        _check_resume(resume_ckpt, model_cfg, tokenizer)
    # the relaunch is the run it continues (or refused); cfg becomes the run it trains (train.extend_to)
    plan = plan_launch(cfg, resume_ckpt, finished=finished(run_dir), world_size=world)
    cfg = plan.cfg
    if cfg.eval.tasks:
        try:
            check_tasks(cfg.eval.tasks, cfg.eval.task_dir)
        except ValueError as e:
            raise ConfigError(f"eval.tasks: {e}") from None
    return Inputs(cfg, rank, world, grad_accum, plugins, resume_ckpt, tokenizer, source, probe, first, mixture,
                  data_record, init, model_cfg, plan)  # fmt: skip


def _check_resume(ckpt: Path, model_cfg: GPTConfig, tokenizer: Tokenizer) -> None:
    """The checkpoint a run resumes from holds this run's model and was trained with this tokenizer."""
    check_model_fits(ckpt, model_cfg, "train.resume: the checkpoint")
    saved = load_json(ckpt / META).get("tokenizer_sha256")
    if saved and saved != tokenizer.sha256:
        raise CheckpointError(
            f"data.tokenizer={tokenizer.path!r} is not the tokenizer the checkpoint {ckpt} was trained with"
        )


def _build_data(inputs: Inputs) -> torch.Tensor | None:
    """The per-token streams the loss needs are in the data; the training data's token counts, where the loss
    (PDL) or the frequency-bucket evaluation uses them."""
    cfg, source = inputs.cfg, inputs.source
    loss_cls = resolve_loss(cfg.loss.name)
    online = {"ref_ce"} if cfg.loss.reference else set()  # scored each micro-batch by the reference model
    missing = [k for k in loss_cls.token_inputs if k not in source.streams and k not in online]
    if missing:
        raise DataError(
            f"loss.name={cfg.loss.name} needs the per-token stream(s) {missing} with the data, and "
            f"{source.files} carry none: prepared data with {missing[0]}.bin beside the tokens "
            "(scripts/score_reference.py writes ref_ce)"
        )
    needs_counts = loss_cls.needs_token_counts or (cfg.eval.buckets and bool(cfg.data.val_files))
    return token_counts(cfg.data, source, inputs.tokenizer, cfg.train.seed) if needs_counts else None


def _build_model_and_engine(inputs: Inputs, counts: torch.Tensor | None) -> tuple[CausalLMObjective, Any, Any]:
    """The model (from ``model.init_from``'s weights if set), the objective with its loss (and reference model),
    the optimizer and the DeepSpeed engine."""
    cfg = inputs.cfg
    # Built where it trains: on the CPU a 6.7B model in fp32 would take 27 GB of host memory and minutes to
    # initialise before DeepSpeed moved it.
    with torch.device(accelerator_device()):
        model = GPT(inputs.model_cfg)
    if inputs.init is not None:
        init_weights(model, inputs.init)
    parallelize.apply(model, activation_checkpointing=cfg.model.activation_checkpointing, compile=cfg.model.compile)
    loss_counts = counts if resolve_loss(cfg.loss.name).needs_token_counts else None
    reference = None
    if cfg.loss.reference:
        reference, _ = load_model(cfg.loss.reference, device=accelerator_device())
        if reference.cfg.vocab_size != inputs.tokenizer.vocab_size:
            raise CheckpointError(f"loss.reference={cfg.loss.reference!r} was trained with another vocabulary")
        reference.requires_grad_(False)
    objective = CausalLMObjective(model, build_loss(cfg.loss, token_counts=loss_counts), reference=reference)
    optimizer = build_optimizer(param_groups(model, cfg.train), cfg.train, cfg.distributed)
    train_cfg = dataclasses.replace(cfg.train, grad_accum=inputs.grad_accum)
    engine = build_engine(objective, optimizer, build_scheduler(optimizer, train_cfg), train_cfg, cfg.distributed)
    return objective, optimizer, engine


def _restore(inputs: Inputs, engine: Any, run_dir: Path) -> Start:
    """From the checkpoint resumed: DeepSpeed's state, the RNG states, the data position and the logging
    interval in progress (``metrics.jsonl`` cut back to its step). A fresh run starts at its first batch."""
    ckpt = inputs.resume_ckpt
    if ckpt is None:
        return Start(1, None, itertools.chain([inputs.first], inputs.probe))
    meta = restore(engine, ckpt)
    inputs.source.load_state_dict(meta["data_state"])
    start_step = meta["step"] + 1
    if inputs.rank == 0:
        truncate_metrics(run_dir / METRICS, meta["step"])
        if start_step > inputs.cfg.train.max_steps:
            print(f"resumed from {ckpt}, the run's final checkpoint: no step left to train; finishing the run",
                  flush=True)  # fmt: skip
        else:
            print(f"resumed from {ckpt} at step {start_step}", flush=True)
    return Start(start_step, meta.get("log_interval"), iter(inputs.source))


def _record_launch(
    inputs: Inputs, run_dir: Path, model: GPT, counts: torch.Tensor | None, start_step: int
) -> tuple[CheckpointRecord, dict[str, Any]]:
    """``config.yaml``, ``run_info.json`` (with this launch appended to ``launches``) and ``mixture.json``; and
    what each checkpoint of this launch will carry."""
    cfg, ckpt, mixture = inputs.cfg, inputs.resume_ckpt, inputs.mixture
    config_yaml = to_yaml(cfg)
    info = {
        "git_sha": git_commit(),
        "world_size": inputs.world,
        "grad_accum": inputs.grad_accum,
        "num_params": model.num_params(),
        "model": dataclasses.asdict(inputs.model_cfg),
        "tokenizer_sha256": inputs.tokenizer.sha256,
        "data_files": inputs.source.files,
        **inputs.data_record,  # the data's fingerprint, and the changes that data.allow_changed let through
        "resumed_from": str(ckpt) if ckpt else None,
        "mixture": mixture.as_dict() if mixture else None,
    }
    sha = info["git_sha"]
    entry = launch_entry(inputs.plan, start_step=start_step, resumed_from=ckpt, world_size=inputs.world, git_sha=sha)
    info["launches"] = launches(run_dir, entry, resumed=ckpt is not None)
    if inputs.rank == 0:
        (run_dir / "config.yaml").write_text(config_yaml)
        (run_dir / "run_info.json").write_text(json.dumps(info, indent=2))
        if mixture is not None:
            (run_dir / "mixture.json").write_text(json.dumps(mixture.as_dict(), indent=2))
    data = {k: info[k] for k in (FINGERPRINT, CHANGES) if k in info}
    return CheckpointRecord(config_yaml, inputs.tokenizer.files, inputs.tokenizer.sha256, counts, data), info


def _assemble(
    inputs: Inputs,
    run_dir: Path,
    objective: CausalLMObjective,
    optimizer: Any,
    engine: Any,
    start: Start,
    saved: CheckpointRecord,
    info: dict[str, Any],
) -> Run:
    """The run as the loop sees it: the callbacks built (W&B's run opened), the held-out set, the tally."""
    cfg, model = inputs.cfg, objective.model
    config_dict = to_dict(cfg)
    callbacks = build_callbacks(cfg, run_dir, {**config_dict, "run_info": info}, start_step=start.step, model=model)
    micro, seq_len = cfg.train.micro_batch_size, cfg.data.seq_len
    shape = StepShape(
        world_size=inputs.world,
        grad_accum=inputs.grad_accum,
        tokens_per_step=micro * inputs.grad_accum * inputs.world * seq_len,
        flops_per_token=flops_per_token(inputs.model_cfg, model.num_params(), seq_len),
        peak_flops=peak_flops(cfg.train.peak_tflops),
        loop_clips=loop_clips_gradients(cfg.train, cfg.distributed),
        logs_entropy=objective.loss_fn.computes_entropy,
    )
    preemption = Preemption()  # SIGTERM / SIGINT from here on ask the loop to checkpoint and stop
    held_out = None
    if cfg.data.val_files and (cfg.eval.val_every or cfg.eval.buckets):
        # one held-out set for the run, sampled now (rank 0 writes it beside the run; every rank draws the same)
        held, pieces = load_or_sample(
            run_dir / SET_FILE if inputs.rank == 0 else None,
            list(cfg.data.val_files),
            inputs.tokenizer,
            seq_len,
            sample_spec(cfg.eval),
            records=bool(cfg.data.sft_files),
        )
        if inputs.rank == 0:
            print(f"held-out set: {held.summary()}", flush=True)
        if cfg.eval.val_every:
            held_out = build_domain_set(held, pack(held, pieces, inputs.tokenizer.eos_id))
    return Run(
        cfg=cfg,
        run_dir=run_dir,
        shape=shape,
        source=inputs.source,
        batches=start.batches,
        model=model,
        engine=engine,
        optimizer=optimizer,
        callbacks=[*callbacks, *inputs.plugins],
        preemption=preemption,
        saved=saved,
        tally=Tally.on(engine.device, start.interval),
        start_step=start.step,
        resumed_from=inputs.resume_ckpt,
        held_out=held_out,
    )
