"""The run config: typed dataclasses composed from each component's own config, loaded from layered YAML.

Load order (later wins): the schema's defaults -> ``configs/base.yaml`` -> the files an experiment lists under
``includes:`` (relative to ``configs/``, e.g. ``model/tiny.yaml``, ``loss/mile.yaml``) -> the experiment file ->
``key=value`` overrides from the command line. Unknown keys and wrong types are errors naming the key.

The ``loss`` section is written flat (``loss.gamma: 2``): ``name``, the selected loss's own parameters (declared
with its class) and the modifiers of every loss. A layer that changes ``loss.name`` starts the loss from its
declared defaults: the parameters set by the layers below it belonged to the loss it replaces and are dropped
(so ``demo.yaml loss.name=pdl`` does not carry MiLe's ``gamma`` along). A parameter the selected loss does not
declare, set in the same layer as the name or above it, is an error (``docs/losses.md``).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from data.config import MIX_MISSING, DataConfig
from losslab.losses.config import (
    AT_LEAST_ONE,
    FRACTION,
    MODIFIER_NAMES,
    NON_NEGATIVE,
    OPEN_FRACTION,
    POSITIVE,
    Bound,
    LossConfig,
    SettingError,
)
from losslab.losses.kernels import resolve as resolve_kernel
from losslab.losses.settings import resolve as resolve_loss_config
from losslab.losses.weighting import LOSSES, resolve_loss
from models.config import BLOCKS, GPTConfig
from models.presets import BLOCK_DEFAULTS, PRESETS, get_preset
from trainer.config_lists import scalars_to_lists

CONFIG_ROOT = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A config that cannot run; the message names the offending key."""


@dataclass
class RunSection:
    dir: str = "runs/default"
    """Where the run writes everything: checkpoints, metrics.jsonl, resolved config, W&B files."""
    name: str = ""
    """Run name in W&B; default ``<preset>-<block>-<loss>-s<seed>``."""
    overwrite: bool = False
    """Allow training into a run directory that already holds metrics or checkpoints (they are replaced)."""
    callbacks: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Plug-in callbacks of the loop: name -> {target: package.module:Class, and its keyword arguments}, built
    on every rank (``trainer/plugins.py``; the tests' fault injection is ``tests/faults.py``)."""


@dataclass
class ModelSection:
    preset: str = "debug"
    """A named shape from ``models/presets.py`` (debug, tiny, 468m, 1.2b, 6.7b)."""
    block: str = "neox"
    """neox (LayerNorm, GELU, parallel residual, partial rotary) | llama (RMSNorm, SwiGLU, sequential, full rotary)."""
    n_layers: int | None = None
    d_model: int | None = None
    n_heads: int | None = None
    d_mlp: int | None = None
    max_seq_len: int | None = None
    init_std: float | None = None
    """Shape fields left null take the preset's value (d_mlp: the block family's width for the preset)."""
    rotary_pct: float | None = None
    parallel_residual: bool | None = None
    """Left null: the block family's default (neox 0.25 / parallel, llama 1.0 / sequential)."""
    n_kv_heads: int = 0
    """Key/value heads for grouped-query attention (0: one per query head)."""
    tie_embeddings: bool = False
    """The output head reuses the input embedding matrix."""
    rotary_base: float = 10000.0
    """RoPE base (HF ``rope_theta``)."""
    norm_eps: float = 1e-5
    """Epsilon of every LayerNorm / RMSNorm."""
    scaled_init: bool = True
    """Residual output projections start at init_std / sqrt(2 n_layers); false: every matrix at init_std (the
    MiLe official code)."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass (less memory, ~30% more compute)."""
    compile: bool = False
    """torch.compile each block (CUDA)."""
    init_from: str = ""
    """Start from the weights of a checkpoint (or run) directory's ``model.safetensors`` — another run, any
    parallel layout, or an HF import — with a fresh optimizer. The shapes must match."""


@dataclass
class TrainSection:
    max_steps: int = 100
    micro_batch_size: int = 8
    """Sequences per rank per micro-step."""
    grad_accum: int = 1
    """Micro-steps per optimizer step (derived from ``global_batch_size`` when that is set)."""
    global_batch_size: int = 0
    """Sequences per optimizer step over all ranks; 0 means micro_batch_size x grad_accum x world size.
    When set it must be a multiple of micro_batch_size x world size, and grad_accum follows from it."""
    global_batch_tokens: int = 0
    """The same in tokens (global_batch_size x data.seq_len), as papers state it (~1.05M for the MiLe 468M)."""
    seed: int = 0
    lr: float = 3e-4
    min_lr_ratio: float = 0.0
    """Cosine decays to lr * min_lr_ratio (the MiLe paper decays to 0)."""
    warmup_steps: int = 10
    weight_decay: float = 0.1
    decay_final_norm: bool = False
    """Also decay the final norm's weight, as the MiLe official code does (its no-decay name filter misses it);
    every other norm and bias is never decayed."""
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    precision: str = "auto"
    """auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32."""
    log_every: int = 10
    peak_tflops: float = 0.0
    """Device peak (dense bf16 TFLOP/s) for MFU; 0 detects H100/H200/A100, else MFU is not logged."""
    resume: str = "none"
    """none: start fresh | auto: continue from the latest complete checkpoint in run.dir (fresh if there is
    none; a checkpoint whose files fail their checksums is passed over for the newest intact one) | a
    checkpoint directory (refused if damaged). The relaunch must not change the experiment
    (``trainer/resume_check.py``)."""
    extend_to: int = 0
    """With train.resume: continue the run to this many steps (more than its max_steps); the LR schedule
    becomes that of a run of extend_to steps from the next step on. 0: no extension."""
    max_nonfinite_in_a_row: int = 5
    """A step whose loss is not finite is skipped (no parameter update) and counted; after this many in a row
    training stops with an error naming the steps (0: never stop)."""


@dataclass
class DistributedSection:
    """How DeepSpeed lays the run out (``trainer/engine.py`` turns this into DeepSpeed's own config)."""

    preset: str = ""
    """A layout from ``configs/deepspeed/`` (zero1, zero2, zero3, zero3_offload), applied as a config layer
    before the experiment file, so the experiment and the command line can still override its keys."""
    zero_stage: int = 0
    offload_optimizer: bool = False
    """Optimizer state and step on the CPU (DeepSpeedCPUAdam); needs zero_stage >= 1."""
    offload_ratio: float = 1.0
    """With offload_optimizer under ZeRO-3: the fraction of the optimizer state (and of its step) held on the
    CPU; the rest stays on the GPU (DeepSpeed's partial offload). Below 1 where GPU memory is left over: less
    host memory and a shorter CPU step."""
    offload_params: bool = False
    """Parameters on the CPU between uses; needs zero_stage = 3."""
    overlap_comm: bool = True
    raw: dict[str, Any] = field(default_factory=dict)
    """Any DeepSpeed config keys, deep-merged over what losslab generates (the escape hatch)."""


@dataclass
class CheckpointSection:
    every: int = 0
    """Save every N steps (0: only at the end)."""
    keep: int = 2
    """Keep the last K checkpoints (0 keeps all)."""
    at_end: bool = True
    """Save after the last step. Throughput benchmarks turn it off: a 6.7B run would write ~80 GB of
    optimizer state. A pre-empted run saves regardless."""
    portable_optimizer: bool = False
    """Also write the full fp32 weights and Adam moments independent of ZeRO partitioning, so the checkpoint
    resumes on a different number of ranks (costs a gather of the full optimizer state to rank 0's memory)."""


@dataclass
class EvalSection:
    tasks: list[str] = field(default_factory=list)
    """lm-eval task names or sets (paper, quick), run after the final checkpoint (and with each checkpoint when
    ``every_checkpoint``)."""
    task_dir: str = ""
    """Directory of local lm-eval task YAMLs (offline); empty uses only lm-eval's stock tasks."""
    every_checkpoint: bool = False
    """Evaluate after every checkpoint, not only the final one; every rank scores a share (evals/distributed.py)."""
    num_fewshot: int = 0
    limit: int = 0
    """Documents per task (0: all)."""
    batch_size: int = 16
    buckets: bool = True
    """Held-out loss by token-frequency bucket (80/15/5% of training occurrences) on data.val_files."""
    val_tokens: int = 200_000
    """Token budget of the held-out set: one fixed, seeded sample of data.val_files stratified by domain
    (``evals/heldout.py``), written beside the run (``held_out_set.json``) and scored by both the bucket
    evaluation and ``val_every``; every run with the same held-out files, tokenizer and these settings draws the
    identical set."""
    val_every: int = 0
    """Held-out loss per domain of the held-out set (``eval_domain/...``) every N steps and at each checkpoint;
    0: off (``evals/domains.py``)."""
    val_tokens_per_domain: int = 20_000
    """Each domain's floor in the held-out set (all its tokens when it has fewer); the rest of ``val_tokens`` is
    shared equally among the domains that have more."""
    val_seed: int = 0
    """Seed of the held-out sample (a document's rank is a hash of this seed and its text)."""
    val_domains: list[str] = field(default_factory=list)
    """Domains the held-out set must cover (e.g. the training data's): one without a held-out document is a
    warning naming it, recorded in the set. A ``manifest.json`` with a ``domains`` table beside the held-out
    files (``scripts/split_corpus.py``) adds its domains."""


@dataclass
class WandbSection:
    mode: str = "offline"
    """offline (default; sync later with ``wandb sync``) | online | disabled."""
    project: str = "losslab"
    entity: str = ""
    group: str = ""
    """W&B group; default ``<preset>-<block>``, so the runs of one size compare losses side by side."""


@dataclass
class RunConfig:
    run: RunSection = field(default_factory=RunSection)
    model: ModelSection = field(default_factory=ModelSection)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainSection = field(default_factory=TrainSection)
    distributed: DistributedSection = field(default_factory=DistributedSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    eval: EvalSection = field(default_factory=EvalSection)
    wandb: WandbSection = field(default_factory=WandbSection)


def _merge(base: DictConfig, layer: DictConfig | dict, origin: str) -> DictConfig:
    layer = scalars_to_lists(base, layer)  # data.train_files=x.jsonl.zst: the list of that one file
    try:
        return OmegaConf.merge(base, layer)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        node = OmegaConf.select(base, parent) if parent else base
        valid = sorted(node.keys()) if isinstance(node, DictConfig) else []
        msg = str(e).splitlines()[0]
        raise ConfigError(
            f"{origin}: bad config key {key!r}: {msg}" + (f"; valid keys: {valid}" if valid else "")
        ) from None


def _load_yaml(path: Path) -> DictConfig:
    if not path.is_file():
        raise ConfigError(f"config file not found: {str(path)!r}")
    try:
        cfg = OmegaConf.load(path)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}:{where}: not valid YAML ({problem})") from None
    except (OmegaConfBaseException, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot be read as a config ({str(e).splitlines()[0]})") from None
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{path}: a config file must be a mapping")
    return cfg


def _includes(exp: DictConfig, path: str | os.PathLike) -> list[str]:
    includes = exp.pop("includes", [])
    if not OmegaConf.is_list(includes) and not isinstance(includes, list):
        raise ConfigError(f"{path}: includes must be a list of config files, e.g. [loss/mile.yaml], not {includes!r}")
    names = list(includes)
    bad = [x for x in names if not isinstance(x, str)]
    if bad:
        raise ConfigError(f"{path}: includes must name config files (strings); got {bad}")
    return names


def _loss_layer(layer: DictConfig, origin: str) -> DictConfig:
    """The layer with its flat loss parameters (``loss.gamma``) moved under ``loss.params``, where the schema
    keeps the selected loss's own settings (the modifiers and ``name`` are typed fields of their own)."""
    loss = layer.get("loss")
    if loss is None:
        return layer
    if not isinstance(loss, DictConfig):
        raise ConfigError(f"{origin}: loss must be a mapping of settings, e.g. {{name: mile, gamma: 1.0}}")
    flat = OmegaConf.to_container(loss)
    assert isinstance(flat, dict)
    if "params" in flat:
        raise ConfigError(f"{origin}: write a loss's parameters flat (loss.gamma: 2.0), not under loss.params")
    if "options" in flat:  # a config saved before losses declared their parameters
        flat = LossConfig.from_mapping(flat).to_mapping()
    own = {k: v for k, v in flat.items() if k != "name" and k not in MODIFIER_NAMES}
    general = {k: v for k, v in flat.items() if k not in own}
    out = layer.copy()
    out.loss = {**general, **({"params": own} if own else {})}
    return out


Origins = dict[str, str]
"""Loss key -> the layer that set it (a file, or ``override 'loss.gamma=3'``), for error messages."""


def _merge_layer(cfg: DictConfig, layer: DictConfig, origin: str, origins: Origins, switch: bool = True) -> DictConfig:
    """Merge one config layer; if it chooses another loss, the parameters below it are dropped first."""
    name = OmegaConf.select(layer, "loss.name", default=None)
    if switch and name is not None and name != cfg.loss.name:
        _drop_params(cfg, origins)
    layer = _loss_layer(layer, origin)
    loss = layer.get("loss")
    if isinstance(loss, DictConfig):
        origins.update({k: origin for k in loss if k != "params"})
        origins.update({k: origin for k in loss.get("params", {})})
    return _merge(cfg, layer, origin)


def _drop_params(cfg: DictConfig, origins: Origins) -> None:
    for key in cfg.loss.params:
        origins.pop(key, None)
    cfg.loss.params = {}


def _compose(
    path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...], preset: str, origins: Origins
) -> DictConfig:
    cfg = OmegaConf.structured(RunConfig)
    cfg = _merge_layer(cfg, _load_yaml(CONFIG_ROOT / "base.yaml"), "configs/base.yaml", origins)
    exp = _load_yaml(Path(path)) if path is not None else OmegaConf.create({})
    for inc in _includes(exp, path) if path is not None else []:
        inc_path = Path(inc) if os.path.isabs(inc) else CONFIG_ROOT / inc
        cfg = _merge_layer(cfg, _load_yaml(inc_path), str(inc_path), origins)
    if preset:
        layer = CONFIG_ROOT / "deepspeed" / f"{preset}.yaml"
        if not layer.is_file():
            valid = sorted(p.stem for p in (CONFIG_ROOT / "deepspeed").glob("*.yaml"))
            raise ConfigError(f"distributed.preset={preset!r} is not valid; choose one of {valid}")
        cfg = _merge_layer(cfg, _load_yaml(layer), str(layer), origins)
    if path is not None:
        cfg = _merge_layer(cfg, exp, str(path), origins)
    items = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        items.append((OmegaConf.from_dotlist([item]), f"override {item!r}"))
    # the command line is one layer: its loss.name (the last one) decides, wherever it stands among the overrides
    names = [n for layer, _ in items if (n := OmegaConf.select(layer, "loss.name", default=None)) is not None]
    if names and names[-1] != cfg.loss.name:
        _drop_params(cfg, origins)
    for layer, origin in items:
        cfg = _merge_layer(cfg, layer, origin, origins, switch=False)
    return cfg


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Compose and validate a run config; raises ConfigError with the offending key."""
    origins: Origins = {}
    cfg = _compose(path, overrides, preset="", origins=origins)
    preset = cfg.distributed.preset
    if preset:  # the chosen DeepSpeed layout is a layer of its own, below the experiment and the overrides
        origins.clear()
        cfg = _compose(path, overrides, preset=preset, origins=origins)
    try:
        run_cfg: RunConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    except OmegaConfBaseException as e:
        raise ConfigError(f"invalid config: {e}") from None
    validate(run_cfg, origins)
    run_cfg.loss = resolve_loss_config(run_cfg.loss)  # the loss's parameters with their defaults, for the record
    return run_cfg


def _check_plugin(key: str, value: str, valid: list[str], resolve: Any) -> None:
    """One of ``valid``, or a ``package.module:Class`` plug-in that ``resolve`` can load."""
    if ":" not in value:
        _choice(key, value, valid)
        return
    try:
        resolve(value)
    except ValueError as e:
        raise ConfigError(f"{key}={value!r}: {e}") from None


def _choice(key: str, value: str, valid: list[str]) -> None:
    if value not in valid:
        raise ConfigError(f"{key}={value!r} is not valid; choose one of {valid}")


BOUNDS: dict[str, Bound] = {
    # One table for every numeric key with a range: validate() checks them all, before anything is built.
    "model.n_layers": AT_LEAST_ONE,
    "model.d_model": AT_LEAST_ONE,
    "model.n_heads": AT_LEAST_ONE,
    "model.d_mlp": AT_LEAST_ONE,
    "model.max_seq_len": AT_LEAST_ONE,
    "model.init_std": POSITIVE,
    "model.rotary_pct": FRACTION,
    "model.n_kv_heads": NON_NEGATIVE,
    "model.rotary_base": POSITIVE,
    "model.norm_eps": POSITIVE,
    # loss.*: declared with each loss (losslab/losses), checked by validate() through losslab.losses.resolve
    "data.seq_len": AT_LEAST_ONE,
    "data.num_workers": NON_NEGATIVE,
    "data.count_bytes": NON_NEGATIVE,
    "data.shuffle_buffer": NON_NEGATIVE,
    "train.max_steps": AT_LEAST_ONE,
    "train.micro_batch_size": AT_LEAST_ONE,
    "train.grad_accum": AT_LEAST_ONE,
    "train.global_batch_size": NON_NEGATIVE,
    "train.global_batch_tokens": NON_NEGATIVE,
    # lr may be inf: that is a run the non-finite-loss guard stops, with its own message
    "train.lr": Bound(0.0, lo_open=True, inf_ok=True),
    "train.min_lr_ratio": FRACTION,
    "train.warmup_steps": NON_NEGATIVE,
    "train.weight_decay": NON_NEGATIVE,
    "train.beta1": OPEN_FRACTION,
    "train.beta2": OPEN_FRACTION,
    "train.grad_clip": NON_NEGATIVE,
    "train.log_every": AT_LEAST_ONE,
    "train.peak_tflops": NON_NEGATIVE,
    "train.max_nonfinite_in_a_row": NON_NEGATIVE,
    "train.extend_to": NON_NEGATIVE,
    "distributed.offload_ratio": FRACTION,
    "checkpoint.every": NON_NEGATIVE,
    "checkpoint.keep": NON_NEGATIVE,
    "eval.num_fewshot": NON_NEGATIVE,
    "eval.limit": NON_NEGATIVE,
    "eval.batch_size": AT_LEAST_ONE,
    "eval.val_tokens": AT_LEAST_ONE,
    "eval.val_every": NON_NEGATIVE,
    "eval.val_tokens_per_domain": AT_LEAST_ONE,
}


def _check_bounds(cfg: RunConfig) -> None:
    for key, bound in BOUNDS.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value is not None and not bound.holds(float(value)):
            raise ConfigError(f"{key}={value} is out of range: it must be {bound}")


def validate(cfg: RunConfig, origins: Origins | None = None) -> None:
    """Cheap, pure checks of values (no I/O): choices, the ``BOUNDS`` table, the loss's declared settings, and
    how keys fit together. ``origins``: which layer set each loss key, named in the error."""
    _check_bounds(cfg)
    _choice("model.preset", cfg.model.preset, sorted(PRESETS))
    _choice("model.block", cfg.model.block, list(BLOCKS))
    _check_plugin("loss.name", cfg.loss.name, sorted(LOSSES), resolve_loss)
    _check_plugin("loss.kernel", cfg.loss.kernel, ["auto", "torch", "triton"], resolve_kernel)
    try:  # every loss setting against its declaration: bounds, types, and none that belongs to another loss
        resolve_loss_config(cfg.loss)
    except SettingError as e:
        where = (origins or {}).get(e.key)
        raise ConfigError(f"{where}: {e}" if where else str(e)) from None
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _choice("train.precision", cfg.train.precision, ["auto", "bf16", "fp32"])
    _choice("wandb.mode", cfg.wandb.mode, ["disabled", "offline", "online"])
    _choice("data.count_over", cfg.data.count_over, ["all", "targets"])
    _choice("data.mix_missing", cfg.data.mix_missing, list(MIX_MISSING))
    d = cfg.distributed
    if d.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"distributed.zero_stage={d.zero_stage} is not valid; choose one of [0, 1, 2, 3]")
    if d.offload_optimizer and d.zero_stage < 1:
        raise ConfigError("distributed.offload_optimizer needs distributed.zero_stage >= 1")
    if d.offload_ratio < 1.0 and not (d.offload_optimizer and d.zero_stage == 3):
        raise ConfigError(
            "distributed.offload_ratio < 1 (partial optimizer offload) needs distributed.offload_optimizer=true "
            "and distributed.zero_stage=3"
        )
    if d.offload_params and d.zero_stage != 3:
        raise ConfigError("distributed.offload_params needs distributed.zero_stage=3")
    if cfg.data.sft_files and cfg.data.train_files:
        raise ConfigError("set data.train_files (pretraining text) or data.sft_files (fine-tuning records), not both")
    if cfg.data.sft_files and cfg.eval.val_every:
        raise ConfigError("eval.val_every (held-out loss per domain of pretraining text) is for data.train_files; "
                          "a fine-tuning run's data.val_files are records, scored at checkpoints")  # fmt: skip
    if cfg.train.global_batch_size and cfg.train.global_batch_tokens:
        raise ConfigError("set train.global_batch_size or train.global_batch_tokens, not both")
    if cfg.train.global_batch_tokens % cfg.data.seq_len:
        raise ConfigError(
            f"train.global_batch_tokens={cfg.train.global_batch_tokens} is not a multiple of "
            f"data.seq_len={cfg.data.seq_len}"
        )
    if cfg.train.resume not in ("none", "auto") and not os.path.isdir(cfg.train.resume):
        raise ConfigError(f"train.resume={cfg.train.resume!r}: choose none, auto, or an existing checkpoint directory")
    max_len = cfg.model.max_seq_len or get_preset(cfg.model.preset).max_seq_len
    if cfg.data.seq_len > max_len:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} exceeds model.max_seq_len={max_len}")
    try:  # the architecture's own rules (heads divide the width, rotary dims even, ...), with a stand-in vocab
        model_config(cfg, vocab_size=1)
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None


def grad_accum_steps(train: TrainSection, world_size: int, seq_len: int) -> int:
    """Micro-steps per optimizer step, checked against the global batch (known once the world size is)."""
    if train.global_batch_tokens:
        key, value, per_micro = "train.global_batch_tokens", train.global_batch_tokens, seq_len
    elif train.global_batch_size:
        key, value, per_micro = "train.global_batch_size", train.global_batch_size, 1
    else:
        return train.grad_accum
    per_micro *= train.micro_batch_size * world_size
    if value % per_micro:
        unit = " x data.seq_len" if key.endswith("tokens") else ""
        raise ConfigError(
            f"{key}={value} is not a multiple of train.micro_batch_size ({train.micro_batch_size}) x world size "
            f"({world_size}){unit} = {per_micro}"
        )
    return value // per_micro


def model_config(cfg: RunConfig, vocab_size: int) -> GPTConfig:
    """Resolve the model section against its preset; the vocabulary comes from the tokenizer."""
    preset = get_preset(cfg.model.preset)
    m = cfg.model
    defaults = {**preset.__dict__, "d_mlp": preset.d_mlp(m.block), **BLOCK_DEFAULTS[m.block]}
    defaults.pop("d_swiglu")

    def pick(name: str):
        value = getattr(m, name)
        return defaults[name] if value is None else value

    return GPTConfig(
        vocab_size=vocab_size,
        block=m.block,
        bias=defaults["bias"],
        n_kv_heads=m.n_kv_heads,
        tie_embeddings=m.tie_embeddings,
        rotary_base=m.rotary_base,
        norm_eps=m.norm_eps,
        scaled_init=m.scaled_init,
        **{
            name: pick(name)
            for name in (
                "n_layers",
                "d_model",
                "n_heads",
                "d_mlp",
                "max_seq_len",
                "init_std",
                "rotary_pct",
                "parallel_residual",
            )
        },
    )


def resolved(cfg: RunConfig, world_size: int = 1) -> RunConfig:
    """The config with what is derived filled in: the model's shape from its preset and block family, and the
    gradient accumulation that the global batch implies on ``world_size`` ranks. Loading it back gives itself."""
    out = dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model), train=dataclasses.replace(cfg.train, grad_accum=0)
    )
    shape = model_config(cfg, vocab_size=1)
    for name in ("n_layers", "d_model", "n_heads", "d_mlp", "max_seq_len", "init_std", "rotary_pct"):
        setattr(out.model, name, getattr(shape, name))
    out.model.parallel_residual = shape.parallel_residual
    out.train.grad_accum = grad_accum_steps(cfg.train, world_size, cfg.data.seq_len)
    return out


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    """The config as plain nested dicts, its loss section flat as a user writes it (``loss.gamma``)."""
    container = OmegaConf.to_container(OmegaConf.structured(cfg))
    assert isinstance(container, dict)
    container["loss"] = cfg.loss.to_mapping()
    return container


def to_yaml(cfg: RunConfig) -> str:
    """The config as YAML that loads back to itself."""
    return OmegaConf.to_yaml(OmegaConf.create(to_dict(cfg)))
