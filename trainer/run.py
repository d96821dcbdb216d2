"""Everything a training run holds, built once: process group, run directory, data, model, engine, callbacks,
and — when resuming — the restored state. Errors in config, data or tokenizer surface here, before the
model is built."""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from data.files import write_atomic
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
from models.checkpoint import (
    CHECKPOINTS,
    META,
    check_model_fits,
    load_model,
    read_meta,
    resolve_checkpoint,
    saved_model_config,
    verify_model_files,
)
from models.checkpoint_files import CheckpointError, load_json, load_safetensors
from trainer import parallelize
from trainer.callbacks import Callback, build_callbacks, require_wandb, sample_spec
from trainer.checkpoint import choose_resume, restore, start_space_check
from trainer.config import ConfigError, RunConfig, grad_accum_steps, model_config, to_dict, to_yaml
from trainer.data_guard import check_data
from trainer.engine import (
    accelerator_device,
    build_engine,
    build_optimizer,
    init_distributed,
    loop_clips_gradients,
)
from trainer.objective import CausalLMObjective
from trainer.optim import build_scheduler, param_groups
from trainer.perf import flops_per_token, peak_flops
from trainer.resume_check import plan_launch
from trainer.run_info import git_sha
from trainer.run_record import announce, launch_entry, launches
from trainer.signals import Preemption

METRICS = "metrics.jsonl"
STEP_METRICS = ("loss", "ce", "entropy", "weight", "z_loss")
"""Per-step metrics of the objective, averaged over micro-steps, ranks and the logging interval."""
RESULT = "result.json"
"""Written in the run directory when training stops (``loop.py``): ``complete`` tells a finished run from a
pre-empted one (both exit 0), so a driver such as ``scripts/run_grid.sh`` skips finished runs and resumes the
others."""


@dataclass
class Run:
    cfg: RunConfig
    run_dir: Path
    world_size: int
    grad_accum: int
    tokens_per_step: int
    flops_per_token: float
    peak_flops: float | None
    source: BatchSource
    model: GPT
    engine: Any
    optimizer: torch.optim.Optimizer
    callbacks: list[Callback]
    info: dict[str, Any]
    config_yaml: str
    start_step: int
    preemption: Preemption
    batches: Any = None
    pending: torch.Tensor | None = None
    token_counts: torch.Tensor | None = None
    tokenizer: Tokenizer | None = None
    # non-finite loss bookkeeping, on the device (read at logging steps only)
    nonfinite_total: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.int32))
    nonfinite_run: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.int32))
    nonfinite_max_run: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.int32))
    last_nonfinite_step: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.int32))
    nonfinite_reported: int = 0
    interval: torch.Tensor | None = None
    """[len(STEP_METRICS) + 1]: sums of the step metrics over the finite steps since the last log, and their count."""
    loop_clips: bool = False
    """The loop clips gradients itself (``engine.loop_clips_gradients``); ``grad_norm`` is then its norm."""
    grad_norm: torch.Tensor | None = None
    held_out: DomainSet | None = None
    """The held-out set's windows with each token's domain (``eval.val_every``)."""
    logs_entropy: bool = True
    """The loss computes the entropy (it uses it, or ``loss.log_entropy``): else ``entropy`` is not logged."""

    def next_batch(self) -> torch.Tensor:
        if self.pending is not None:
            batch, self.pending = self.pending, None
            return batch
        return next(self.batches)

    def emit(self, step: int, metrics: dict[str, float]) -> None:
        for cb in self.callbacks:
            cb.on_log(step, metrics)

    def reduce_mean(self, values: torch.Tensor) -> list[float]:
        if self.world_size > 1:
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
            values = values / self.world_size
        return values.tolist()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _resume_from(cfg: RunConfig, run_dir: Path) -> Path | None:
    return choose_resume(cfg.train.resume, run_dir)  # its files checked against their checksums


# What a run leaves in its directory; a run started again from its first step replaces all of it.
_RUN_FILES = (METRICS, CHECKPOINTS, RESULT, "wandb_id")


def _prepare_run_dir(run_dir: Path, cfg: RunConfig, resume_ckpt: Path | None) -> None:
    """Decide from the directory's state what this launch does, and clear what a fresh start replaces.

    empty -> start. Holds a run, with a checkpoint to continue from -> (resume=auto) continue it. Holds a run
    that never completed a checkpoint (killed early, or while writing the first) -> resume=auto starts it again
    from step 1: nothing of it can be continued, and a pre-empted job relaunched with the same command must
    not fail. A run that finished without a checkpoint to continue from, or resume=none over any run, needs
    run.overwrite=true (or another run.dir)."""
    previous = [run_dir / name for name in _RUN_FILES]
    started = any(p.exists() for p in previous)
    if resume_ckpt is None and started:
        finished = _finished(run_dir)
        if cfg.train.resume == "auto" and not finished:
            if dist.get_rank() == 0:
                print(f"{run_dir}: no complete checkpoint to continue from; starting the run again", flush=True)
        elif not cfg.run.overwrite:
            what = "a finished run with no checkpoint to continue" if finished else "a run"
            advice = "" if finished else "continue it with train.resume=auto, "
            raise FileExistsError(
                f"run directory {str(run_dir)!r} already holds {what}; {advice}choose another run.dir, "
                "or set run.overwrite=true to replace it"
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


def _finished(run_dir: Path) -> bool:
    try:
        return bool(json.loads((run_dir / RESULT).read_text()).get("complete"))
    except (OSError, ValueError, AttributeError):
        return False


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Drop rows logged after the checkpoint a run resumes from (they will be logged again), and a torn last
    line (a crash mid-write)."""
    if not path.is_file():
        return
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= last_step:
            rows.append(line)
    write_atomic(path, "".join(r + "\n" for r in rows))


def _check_resume(ckpt: Path, model_cfg: GPTConfig, tokenizer: Tokenizer) -> None:
    """The checkpoint a run resumes from holds this run's model and was trained with this tokenizer."""
    check_model_fits(ckpt, model_cfg, "train.resume: the checkpoint")
    saved = load_json(ckpt / META).get("tokenizer_sha256")
    if saved and saved != tokenizer.sha256:
        raise CheckpointError(
            f"data.tokenizer={tokenizer.path!r} is not the tokenizer the checkpoint {ckpt} was trained with"
        )


@dataclass
class InitSource:
    """The weights a run starts from (``model.init_from``): the model they define, and how to read them."""

    path: str
    cfg: GPTConfig
    weights: Callable[[], dict[str, torch.Tensor]]


def _init_source(path: str, tokenizer: Tokenizer) -> InitSource:
    """A losslab checkpoint or run directory (an ``import_hf.py`` output included), or a Hugging Face model
    folder (``config.json`` + safetensors), converted here. Its vocabulary must be the tokenizer's."""
    folder = Path(path)
    if (folder / "config.json").is_file() and not (folder / META).is_file():
        from models.hf import load_hf_folder

        try:
            model = load_hf_folder(folder)
        except (ValueError, ImportError, OSError, KeyError) as e:
            raise CheckpointError(f"model.init_from={path!r}: {e}") from None
        source = InitSource(path, model.cfg, model.state_dict)
    else:
        ckpt = resolve_checkpoint(path)
        try:
            verify_model_files(ckpt)
        except CheckpointError as e:
            raise CheckpointError(f"model.init_from={path!r}: {e}") from None
        source = InitSource(path, saved_model_config(ckpt), lambda: load_safetensors(ckpt / "model.safetensors"))
    if source.cfg.vocab_size != tokenizer.vocab_size:
        raise CheckpointError(
            f"model.init_from={path!r} has a vocabulary of {source.cfg.vocab_size} tokens, data.tokenizer="
            f"{tokenizer.path!r} has {tokenizer.vocab_size}: they must be the same tokenizer"
        )
    return source


def _model_from_init(cfg: RunConfig, source: InitSource) -> GPTConfig:
    """The run's model is the one it starts from; a shape key the run sets must agree with it."""
    m = cfg.model
    for name in ("n_layers", "d_model", "n_heads", "d_mlp", "max_seq_len", "rotary_pct", "parallel_residual"):
        if getattr(m, name) is not None and getattr(m, name) != getattr(source.cfg, name):
            raise ConfigError(
                f"model.{name}={getattr(m, name)} disagrees with model.init_from={source.path!r} "
                f"({getattr(source.cfg, name)}); the model is the one it starts from"
            )
    if cfg.data.seq_len > source.cfg.max_seq_len:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} exceeds model.init_from's context {source.cfg.max_seq_len}")
    return source.cfg


def _init_weights(model: GPT, source: InitSource) -> None:
    path = source.path
    state = source.weights()
    mine = model.state_dict()
    wrong = [k for k in state if k in mine and state[k].shape != mine[k].shape]
    if wrong or set(state) != set(mine):
        raise CheckpointError(
            f"model.init_from={path!r} does not fit this model (shape mismatches: {wrong}; "
            f"missing: {sorted(set(mine) - set(state))}; unexpected: {sorted(set(state) - set(mine))})"
        )
    model.load_state_dict(state)


def build_run(cfg: RunConfig) -> Run:
    require_wandb(cfg.wandb)
    rank, world = init_distributed()
    grad_accum = grad_accum_steps(cfg.train, world, cfg.data.seq_len)  # impossible batch arithmetic fails here
    seed_everything(cfg.train.seed)
    run_dir = Path(cfg.run.dir)
    resume_ckpt = _resume_from(cfg, run_dir)

    # Everything that can be checked is checked before any heavy work and before the run directory is touched:
    # data files, tokenizer, the corpus yielding a batch, the checkpoint to resume or start from, eval tasks.
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
    init = _init_source(cfg.model.init_from, tokenizer) if cfg.model.init_from else None
    model_cfg = _model_from_init(cfg, init) if init else model_config(cfg, tokenizer.vocab_size)
    if resume_ckpt is not None:
        _check_resume(resume_ckpt, model_cfg, tokenizer)
    # the relaunch is the run it continues (or refused); cfg becomes the run it trains (train.extend_to)
    plan = plan_launch(cfg, resume_ckpt, finished=_finished(run_dir), world_size=world)
    cfg = plan.cfg
    if cfg.eval.tasks:
        try:
            check_tasks(cfg.eval.tasks, cfg.eval.task_dir)
        except ValueError as e:
            raise ConfigError(f"eval.tasks: {e}") from None
    _prepare_run_dir(run_dir, cfg, resume_ckpt)
    start_space_check(run_dir)

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
    counts = token_counts(cfg.data, source, tokenizer, cfg.train.seed) if needs_counts else None

    # Built where it trains: on the CPU a 6.7B model in fp32 would take 27 GB of host memory and minutes to
    # initialise before DeepSpeed moved it.
    with torch.device(accelerator_device()):
        model = GPT(model_cfg)
    if init is not None:
        _init_weights(model, init)
    parallelize.apply(model, activation_checkpointing=cfg.model.activation_checkpointing, compile=cfg.model.compile)
    loss_counts = counts if loss_cls.needs_token_counts else None
    reference = None
    if cfg.loss.reference:
        reference, _ = load_model(cfg.loss.reference, device=accelerator_device())
        if reference.cfg.vocab_size != tokenizer.vocab_size:
            raise CheckpointError(f"loss.reference={cfg.loss.reference!r} was trained with another vocabulary")
        reference.requires_grad_(False)
    objective = CausalLMObjective(model, build_loss(cfg.loss, token_counts=loss_counts), reference=reference)
    optimizer = build_optimizer(param_groups(model, cfg.train), cfg.train, cfg.distributed)
    train_cfg = dataclasses.replace(cfg.train, grad_accum=grad_accum)
    engine = build_engine(objective, optimizer, build_scheduler(optimizer, train_cfg), train_cfg, cfg.distributed)

    start_step, interval = 1, None
    if resume_ckpt is not None:
        meta = restore(engine, resume_ckpt)
        interval = meta.get("log_interval")
        source.load_state_dict(meta["data_state"])
        start_step = meta["step"] + 1
        if rank == 0:
            _truncate_metrics(run_dir / METRICS, meta["step"])
        if rank == 0:
            print(f"resumed from {resume_ckpt} at step {start_step}", flush=True)
        batches, pending = iter(source), None
    else:
        batches, pending = probe, first

    config_yaml = to_yaml(cfg)
    info = {
        "git_sha": git_sha(),
        "world_size": world,
        "grad_accum": grad_accum,
        "num_params": model.num_params(),
        "model": dataclasses.asdict(model_cfg),
        "tokenizer_sha256": tokenizer.sha256,
        "data_files": source.files,
        **data_record,  # the data's fingerprint, and the changes that data.allow_changed let through
        "resumed_from": str(resume_ckpt) if resume_ckpt else None,
        "mixture": mixture.as_dict() if mixture else None,
    }
    sha = info["git_sha"]
    entry = launch_entry(plan, start_step=start_step, resumed_from=resume_ckpt, world_size=world, git_sha=sha)
    info["launches"] = launches(run_dir, entry, resumed=resume_ckpt is not None)
    if rank == 0:
        (run_dir / "config.yaml").write_text(config_yaml)
        (run_dir / "run_info.json").write_text(json.dumps(info, indent=2))
        if mixture is not None:
            (run_dir / "mixture.json").write_text(json.dumps(mixture.as_dict(), indent=2))
    config_dict = to_dict(cfg)
    device = engine.device
    run = Run(
        cfg=cfg,
        run_dir=run_dir,
        world_size=world,
        grad_accum=grad_accum,
        tokens_per_step=micro * grad_accum * world * cfg.data.seq_len,
        flops_per_token=flops_per_token(model_cfg, model.num_params(), cfg.data.seq_len),
        peak_flops=peak_flops(cfg.train.peak_tflops),
        source=source,
        model=model,
        engine=engine,
        optimizer=optimizer,
        callbacks=build_callbacks(cfg, run_dir, {**config_dict, "run_info": info}, start_step=start_step),
        info=info,
        config_yaml=config_yaml,
        start_step=start_step,
        preemption=Preemption(),
        batches=batches,
        pending=pending,
        token_counts=counts,
        tokenizer=tokenizer,
        logs_entropy=objective.loss_fn.computes_entropy,
    )
    if cfg.data.val_files and (cfg.eval.val_every or cfg.eval.buckets):
        # one held-out set for the run, sampled now (rank 0 writes it beside the run; every rank draws the same)
        held, pieces = load_or_sample(
            run_dir / SET_FILE if rank == 0 else None,
            list(cfg.data.val_files),
            tokenizer,
            cfg.data.seq_len,
            sample_spec(cfg.eval),
            records=bool(cfg.data.sft_files),
        )
        if rank == 0:
            print(f"held-out set: {held.summary()}", flush=True)
        if cfg.eval.val_every:
            run.held_out = build_domain_set(held, pack(held, pieces, tokenizer.eos_id))
    for name in ("nonfinite_total", "nonfinite_run", "nonfinite_max_run", "last_nonfinite_step"):
        setattr(run, name, getattr(run, name).to(device))
    n_interval = len(STEP_METRICS) + 1
    if interval is None or len(interval) != n_interval:
        interval = [0.0] * n_interval
    run.interval = torch.tensor(interval, dtype=torch.float32, device=device)
    run.loop_clips = loop_clips_gradients(cfg.train, cfg.distributed)
    announce(plan, run.emit, rank=rank)
    return run
