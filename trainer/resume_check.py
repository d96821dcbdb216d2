"""What a relaunch may change about the run it continues (``train.resume``), and how a run is extended.

A resumed run must be the run its outputs say it is. The resolved config saved with the checkpoint and the
relaunch's are compared key by key, and every key of the schema has one class in ``KEY_CLASSES`` (a test fails
on a key without one):

- ``experiment``: changes what is trained — the model, the loss and its parameters, the data and its order, the
  optimizer, the schedule, the seed, a plug-in callback that changes what a step computes. A relaunch that
  changes one is refused: one line listing each such key, old -> new.
- ``free``: changes no math — logging, evaluation, checkpoint cadence, how the batch is laid out over ranks and
  micro-steps, workers, W&B, plug-in callbacks that observe or stop the run. It may change; the change is
  recorded in ``run_info.json``'s ``launches``.
- ``launch``: says how this launch starts (``train.resume``, ``train.extend_to``, ``run.dir``,
  ``run.overwrite``, ``data.allow_changed``): not compared.

Some settings are compared as what they resolve to rather than as spelled (``DERIVED``): the global batch
(micro batch x accumulation x ranks, whichever keys set it), the precision (``auto`` is bf16 on CUDA, fp32
elsewhere), and the plug-in callbacks that change training (``run.callbacks`` entries whose class sets
``changes_training``, compared by target and arguments; one that cannot be imported counts as changing it).
The tokenizer is compared by the hash of its file (``run.py``'s ``_check_resume``), so its path may move.

Running more steps is an explicit act: ``train.extend_to=N``. From the step after the checkpoint on, the LR
schedule is that of a run of N steps (warmup unchanged): the cosine is not re-stretched from where the old
schedule was, it jumps to where an N-step schedule is at that step — up from the old value, as the old cosine
was nearer its end (a finished run's LR, at its minimum, rises again). The launch says both values and records
them (``Extension``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from losslab.losses.config import LossConfig
from models.checkpoint import META
from models.checkpoint_files import CheckpointError, load_json
from trainer.config import ConfigError, RunConfig, grad_accum_steps, resolved
from trainer.optim import lr_factor
from trainer.plugins import training_callbacks

EXPERIMENT, FREE, LAUNCH = "experiment", "free", "launch"


def _each(cls: str, section: str, names: str) -> dict[str, str]:
    return {f"{section}.{name}": cls for name in names.split()}


KEY_CLASSES: dict[str, str] = {
    "run.dir": LAUNCH,  # train.resume=CKPT may continue a run into another directory
    "run.name": FREE,
    "run.overwrite": LAUNCH,
    # plug-ins that observe, or stop the process (pre-emption, a crash mid-save: no step that is kept changes);
    # those that change what a step computes (``Callback.changes_training``: a NaN injected into the loss) are
    # compared as DERIVED[2]
    "run.callbacks": FREE,
    **_each(
        EXPERIMENT,
        "model",
        "preset block n_layers d_model n_heads d_mlp max_seq_len init_std rotary_pct "
        "parallel_residual n_kv_heads tie_embeddings rotary_base norm_eps scaled_init "
        "init_from",
    ),
    "model.activation_checkpointing": FREE,  # the same forward, recomputed
    "model.compile": FREE,
    # the loss and its modifiers; the selected loss's own parameters (loss.gamma, ...: declared with its class,
    # flattened out of loss.params by flatten()) are experiment keys too, as every key missing from this table is
    **_each(
        EXPERIMENT,
        "loss",
        "name reference label_smoothing z_loss entropy_clamp count_ignored normalise",
    ),
    "loss.log_entropy": FREE,  # logged, not trained on
    **_each(FREE, "loss", "fused kernel chunk_size"),  # the same loss by another route (tested against float64)
    **_each(
        EXPERIMENT,
        "data",
        "train_files prepared mix mix_missing seq_len count_bytes count_over sft_files train_on_prompt shuffle_buffer",
    ),
    "data.tokenizer": FREE,  # compared by content (the file's hash), not by path
    "data.val_files": FREE,  # held-out evaluation only
    "data.num_workers": FREE,
    "data.allow_changed": LAUNCH,  # this launch may go on with data that changed (recorded: trainer/data_guard.py)
    "train.max_steps": EXPERIMENT,  # changed only by train.extend_to
    # how the batch is split over micro-steps and ranks: compared as the global batch they resolve to (DERIVED)
    **_each(FREE, "train", "micro_batch_size grad_accum global_batch_size global_batch_tokens"),
    **_each(
        EXPERIMENT, "train", "seed lr min_lr_ratio warmup_steps weight_decay decay_final_norm beta1 beta2 grad_clip"
    ),
    "train.precision": FREE,  # compared as the precision it resolves to (DERIVED)
    **_each(FREE, "train", "log_every peak_tflops"),
    **_each(LAUNCH, "train", "resume extend_to"),
    "train.max_nonfinite_in_a_row": FREE,  # a guard: it stops a run, it changes no step
    **_each(FREE, "distributed", "preset zero_stage offload_optimizer offload_ratio offload_params overlap_comm"),
    "distributed.raw": EXPERIMENT,  # any DeepSpeed key, optimizer and clipping included
    **_each(FREE, "checkpoint", "every keep at_end portable_optimizer"),
    **_each(
        FREE,
        "eval",
        "tasks task_dir every_checkpoint num_fewshot limit batch_size buckets val_tokens "
        "val_every val_tokens_per_domain val_seed val_domains",
    ),
    **_each(FREE, "wandb", "mode project entity group"),
}

DERIVED = (
    "train.global_batch_size (resolved)",
    "train.precision (resolved)",
    "run.callbacks (those that change training)",
)
"""Experiment settings compared as resolved; their spelled keys are ``free``."""


def flatten(cfg: RunConfig) -> dict[str, Any]:
    """``section.key`` -> value for every key of the schema (lists and mappings as one value); the selected loss's
    own parameters (``loss.params``) as the flat keys a config writes (``loss.gamma``), each one experiment key."""
    out = {}
    for section in dataclasses.fields(cfg):
        node = getattr(cfg, section.name)
        for f in dataclasses.fields(node):
            if (section.name, f.name) == ("loss", "params"):
                out.update({f"loss.{k}": v for k, v in node.params.items()})
            else:
                out[f"{section.name}.{f.name}"] = getattr(node, f.name)
    return out


def key_class(key: str) -> str:
    """A key missing from the table (a test fails on it) is treated as changing the experiment."""
    return KEY_CLASSES.get(key, EXPERIMENT)


def effective(cfg: RunConfig) -> RunConfig:
    """The run a launch trains: ``train.extend_to`` is its ``max_steps``."""
    if not cfg.train.extend_to:
        return cfg
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=cfg.train.extend_to, extend_to=0))


def precision(spelled: str) -> str:
    """What ``train.precision`` resolves to on this machine (as ``trainer/engine.py`` uses it)."""
    return "bf16" if spelled == "bf16" or (spelled == "auto" and torch.cuda.is_available()) else "fp32"


@dataclass
class Side:
    """One side of the comparison: a config and what it resolves to on its own number of ranks."""

    cfg: RunConfig
    world_size: int
    precision: str

    def values(self) -> dict[str, Any]:
        try:
            out = resolved(self.cfg, self.world_size)
        except (ConfigError, ValueError):  # a saved config this code cannot resolve: compared as spelled
            out = self.cfg
        values = flatten(out)
        try:
            accum = grad_accum_steps(self.cfg.train, self.world_size, self.cfg.data.seq_len)
            values[DERIVED[0]] = self.cfg.train.micro_batch_size * accum * self.world_size
        except ConfigError as e:  # this world size cannot make this global batch
            values[DERIVED[0]] = f"impossible ({e})"
        values[DERIVED[1]] = self.precision
        values[DERIVED[2]] = training_callbacks(self.cfg.run.callbacks)
        return values


def differences(old: Side, new: Side) -> dict[str, tuple[Any, Any]]:
    a, b = old.values(), new.values()
    return {k: (a.get(k), b.get(k)) for k in b if a.get(k) != b.get(k)}


def saved_config(path: Path) -> tuple[RunConfig, list[str]]:
    """A saved ``config.yaml`` as a RunConfig, and the keys it holds that this code does not know (a config
    written by other code: they are not compared, and the launch records them)."""
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except (OSError, OmegaConfBaseException, ValueError) as e:
        raise CheckpointError(f"{path}: cannot be read as a run config ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: cannot be read as a run config (not a mapping)")
    schema = OmegaConf.structured(RunConfig)
    unknown = []
    # the loss section is flat (loss.gamma): its parameters go where the schema keeps them (loss.params)
    loss = raw.pop("loss", None)
    if isinstance(loss, dict):
        try:
            loss = LossConfig.from_mapping(loss)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: its loss section cannot be read ({e})") from None
    for section, values in list(raw.items()):
        if section not in schema or not isinstance(values, dict):
            unknown.append(section)
            raw.pop(section)
            continue
        for key in list(values):
            if key not in schema[section]:
                unknown.append(f"{section}.{key}")
                values.pop(key)
    try:
        cfg: RunConfig = OmegaConf.to_object(OmegaConf.merge(schema, raw))  # type: ignore[assignment]
    except OmegaConfBaseException as e:
        raise CheckpointError(f"{path}: cannot be read as a run config ({str(e).splitlines()[0]})") from None
    if isinstance(loss, LossConfig):
        cfg.loss = loss
    elif loss is not None:
        unknown.append("loss")
    return cfg, unknown


def _render(diffs: dict[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in diffs.items())


@dataclass
class Extension:
    """The run goes on past the ``max_steps`` it was started with (``train.extend_to``)."""

    step: int
    """The checkpoint's step: steps after it follow the new schedule."""
    old_max_steps: int
    new_max_steps: int
    old_lr: float
    """The LR the old schedule would give step ``step + 1``."""
    new_lr: float
    """The LR the new one gives it."""

    @classmethod
    def of(cls, cfg: RunConfig, step: int, old_max: int) -> Extension:
        t = cfg.train

        def lr(total: int) -> float:  # lr_factor counts optimizer steps taken: ``step`` before step + 1
            return t.lr * lr_factor(step, warmup=t.warmup_steps, total=total, min_ratio=t.min_lr_ratio)

        return cls(step, old_max, t.max_steps, lr(old_max), lr(t.max_steps))

    def describe(self) -> str:
        return (
            f"extending the run: train.max_steps {self.old_max_steps} -> {self.new_max_steps} from step "
            f"{self.step + 1}; the LR schedule is now that of a {self.new_max_steps}-step run (warmup unchanged): "
            f"lr at step {self.step + 1} {self.old_lr:.3e} under the old schedule -> {self.new_lr:.3e}"
        )

    def record(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def metrics(self) -> dict[str, float]:
        """Logged at the first step of the extension (metrics.jsonl and W&B)."""
        return {
            "launch/extended_from_max_steps": self.old_max_steps,
            "launch/extended_to_max_steps": self.new_max_steps,
            "launch/lr_old_schedule": self.old_lr,
            "launch/lr_new_schedule": self.new_lr,
        }


@dataclass
class Plan:
    """What this launch does to the run it continues."""

    cfg: RunConfig
    """The run this launch trains (``effective``: extend_to is its max_steps)."""
    resumed_step: int = 0
    changed: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    """``free`` keys that differ from the checkpoint's config: old, new."""
    extension: Extension | None = None
    unknown_saved_keys: list[str] = field(default_factory=list)
    precision: str = "fp32"


def plan_launch(cfg: RunConfig, ckpt: Path | None, *, finished: bool, world_size: int) -> Plan:
    """Check a launch against the checkpoint it continues (raises ConfigError, one line) and say what it does.
    ``finished``: run.dir's result.json says the run completed."""
    t = cfg.train
    new_precision = precision(t.precision)
    if ckpt is None:
        if t.extend_to:
            raise ConfigError(
                f"train.extend_to={t.extend_to}: there is no checkpoint to extend (train.resume={t.resume!r}, "
                f"run.dir={cfg.run.dir!r}); a new run takes its length from train.max_steps"
            )
        return Plan(cfg, precision=new_precision)
    meta = load_json(ckpt / META)
    step = int(meta.get("step", 0))
    old_cfg, unknown = saved_config(ckpt / "config.yaml")
    old_max = old_cfg.train.max_steps
    if t.extend_to and t.max_steps > t.extend_to:
        raise ConfigError(
            f"train.max_steps={t.max_steps} with train.extend_to={t.extend_to}: keep the run's train.max_steps "
            "and say the new length with train.extend_to alone"
        )
    if t.extend_to and t.extend_to < old_max:
        raise ConfigError(
            f"train.extend_to={t.extend_to} is below the run's train.max_steps={old_max}: a run is extended, "
            "never shortened (start a new run to train fewer steps)"
        )
    new_cfg = effective(cfg)
    old = Side(old_cfg, int(meta.get("world_size", 1)), meta.get("precision") or precision(old_cfg.train.precision))
    diffs = differences(old, Side(new_cfg, world_size, new_precision))
    refused = {k: v for k, v in diffs.items() if k in DERIVED or key_class(k) == EXPERIMENT}
    extending = t.extend_to > old_max
    if extending:
        refused.pop("train.max_steps", None)
    if refused:
        hint = ""
        old_steps, new_max = refused.get("train.max_steps", (0, 0))
        if new_max > old_steps:
            hint = f" To train more steps keep train.max_steps={old_max} and set train.extend_to={new_max}."
        raise ConfigError(
            f"train.resume: {ckpt} was trained with other settings, and continuing it would splice two experiments "
            f"into one run: {_render(refused)}.{hint} To change them, start a new run (another run.dir, or "
            "train.resume=none run.overwrite=true)"
        )
    max_steps = new_cfg.train.max_steps
    # The run's own final checkpoint, and the run never ended (killed during what follows that checkpoint: its
    # final evaluation): resume=auto finishes it — the evaluation if it is owed, result.json — and trains nothing
    # (trainer/loop.py). Named explicitly, or once the run has ended, a last-step checkpoint has nothing to give.
    finishing = step == max_steps and t.resume == "auto" and not finished
    if (step >= max_steps and not finishing) or (finished and not extending and t.resume == "auto"):
        what = f"{ckpt} is the run's last step ({step} of train.max_steps={max_steps})" if step >= max_steps else (
            f"run.dir={cfg.run.dir!r} holds a finished run (result.json)")  # fmt: skip
        raise ConfigError(
            f"train.resume: {what}: nothing left to train. To continue it set train.extend_to=N (N > {max_steps}); "
            "to train it again from step 1, train.resume=none run.overwrite=true"
        )
    changed = {k: v for k, v in diffs.items() if key_class(k) == FREE}
    extension = Extension.of(new_cfg, step, old_max) if extending else None
    return Plan(new_cfg, step, changed, extension, unknown, new_precision)


def finished_run(cfg: RunConfig) -> str | None:
    """For the command line, before anything is built: ``train.resume=auto`` on a run that finished, relaunched
    with its own experiment and no extension, does nothing — the message says so. None: anything else (a
    relaunch that changes the experiment goes on to be refused, with the keys, by ``plan_launch``)."""
    run_dir = Path(cfg.run.dir)
    if cfg.train.resume != "auto" or not (run_dir / "config.yaml").is_file():
        return None
    try:
        result = json.loads((run_dir / "result.json").read_text())
        old_cfg, _ = saved_config(run_dir / "config.yaml")
        info = json.loads((run_dir / "run_info.json").read_text())
    except (OSError, ValueError, CheckpointError):
        return None
    if not (isinstance(result, dict) and result.get("complete")):
        return None
    world = int(os.environ.get("WORLD_SIZE", "1"))
    old_world = int(info.get("world_size", 1)) if isinstance(info, dict) else 1
    last = (info.get("launches") or [{}])[-1] if isinstance(info, dict) else {}
    old = Side(old_cfg, old_world, last.get("precision") or precision(old_cfg.train.precision))
    diffs = differences(old, Side(effective(cfg), world, precision(cfg.train.precision)))
    if any(k in DERIVED or key_class(k) == EXPERIMENT for k in diffs):
        return None
    ignored = {k: v for k, v in diffs.items() if key_class(k) == FREE}
    loss = result.get("final_loss")
    return (
        f"{run_dir} holds a finished run ({result.get('steps')} steps, final loss "
        f"{f'{loss:.4f}' if isinstance(loss, float) else loss}): "
        "nothing to do, every file left as it was"
        + (f" (changed settings not applied: {_render(ignored)})" if ignored else "")
        + ". To continue it: train.extend_to=N; to train it again from step 1: train.resume=none run.overwrite=true"
    )
