"""Everything DeepSpeed: process-group set-up, the DeepSpeed config built from losslab's config, and the
engine. No other module imports deepspeed."""

from __future__ import annotations

import atexit
import contextlib
import importlib
import os
import socket
import sys
from typing import Any, NoReturn

import deepspeed
import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import _CHECKPOINT_PREFIX

from models.checkpoint_files import load_torch
from trainer.config import DistributedSection, TrainSection


class EngineSetupError(RuntimeError):
    """What this machine lacks for the asked-for DeepSpeed layout (reported without a traceback)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def skip_cpu_shm_build() -> None:
    """Keep DeepSpeed from JIT-compiling its shared-memory CPU all-reduce when its communication layer starts
    (60-85 s of compiling on 2 cores, again for every Python environment that shares the extension cache).
    Returning None is DeepSpeed's own "op unavailable" path: collectives fall back to gloo. ``LOSSLAB_CPU_SHM=1``
    lets it build. Called by ``init_distributed`` and by anything that starts DeepSpeed's communication layer
    another way (transformers' Trainer: tests/dist/hf_zero3.py)."""
    if os.environ.get("LOSSLAB_CPU_SHM", "0") != "1":
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def init_distributed() -> tuple[int, int]:
    """Join (or create) the process group; works under the deepspeed/torchrun launchers and as a plain
    ``python`` process (a world of one). Idempotent. Returns (rank, world_size)."""
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        backend = "nccl" if cuda else "gloo"
        if not cuda:
            skip_cpu_shm_build()
        if "RANK" not in os.environ:  # no launcher: a world of one, whose store needs no port (none to race for)
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))  # read by libraries; nothing binds it
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        deepspeed.init_distributed(dist_backend=backend)
    return dist.get_rank(), dist.get_world_size()


def exit_process(code: int) -> NoReturn:
    """End a training process that joined a process group: leave the group, run the interpreter's exit handlers
    (W&B, logging) while it is fully alive, flush, and exit without the C++ teardown that follows.

    Left to ``sys.exit``, a gloo rank sometimes aborts *after* a run that succeeded and wrote everything ("terminate
    called without an active exception", SIGABRT, no Python frame: a thread of the c10d/gloo runtime still
    joinable while the interpreter's static objects are destroyed), and the launcher then kills its peers and
    reports the run as failed — seen in 1 of 47 two-rank runs on 2 loaded cores, with or without
    ``destroy_process_group``. Nothing of the run is left to that teardown, so it is skipped. Every program that
    builds the engine ends here: ``scripts/train.py``, ``scripts/bench_checkpoint.py`` and the tests' own
    multi-rank scripts (``tests/dist``)."""
    if dist.is_initialized():
        dist.destroy_process_group()
    atexit._run_exitfuncs()  # what the interpreter would run at exit: W&B's and logging's flushes among them
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def accelerator_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def use_bf16(precision: str) -> bool:
    return precision == "bf16" or (precision == "auto" and torch.cuda.is_available())


def loop_clips_gradients(train: TrainSection, distributed: DistributedSection) -> bool:
    """True where DeepSpeed keeps no gradient norm (ZeRO-0 in fp32): the loop then clips (or, with
    ``grad_clip=0``, only measures) and logs the norm it gets. Every other layout (ZeRO-1/2/3, bf16) computes
    and keeps the global norm itself."""
    return distributed.zero_stage == 0 and not use_bf16(train.precision)


def deepspeed_config(train: TrainSection, distributed: DistributedSection) -> dict[str, Any]:
    """DeepSpeed's config, generated from losslab's (``train.grad_accum`` is the resolved value), with
    ``distributed.raw`` merged over it last."""
    zero: dict[str, Any] = {"stage": distributed.zero_stage}
    if distributed.zero_stage > 0:
        zero["overlap_comm"] = distributed.overlap_comm
    if distributed.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        if distributed.offload_ratio < 1.0:
            zero["offload_optimizer"]["ratio"] = distributed.offload_ratio
    if distributed.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if distributed.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True  # consolidated weights for model.safetensors
    config = {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "gradient_clipping": 0.0 if loop_clips_gradients(train, distributed) else train.grad_clip,
        # with the optimizer on the CPU the device-side skip (found_inf) is unavailable: DeepSpeed's own
        # overflow check skips non-finite steps instead
        "bf16": {"enabled": use_bf16(train.precision), "check_grad_overflow": distributed.offload_optimizer},
        "zero_optimization": zero,
        # losslab passes a torch optimizer; DeepSpeed only vouches for its own under ZeRO
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    # mapping into mapping; a list or a value replaces what was there (OmegaConf's merge, nothing resolved)
    return OmegaConf.to_container(OmegaConf.merge(config, dict(distributed.raw)))  # type: ignore[return-value]


def build_optimizer(groups: list[dict[str, Any]], train: TrainSection, distributed: DistributedSection) -> Any:
    """torch's fused AdamW (GPU and CPU): fast, and it honours ``optimizer.found_inf``, which lets the loop skip
    a non-finite step on the device without a host sync. With the optimizer offloaded to the CPU, DeepSpeed's
    vectorised DeepSpeedCPUAdam (JIT-compiled on first use)."""
    kwargs = {"lr": train.lr, "betas": (train.beta1, train.beta2)}
    if distributed.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        try:
            return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
        except Exception as e:  # its C++ op is built at first use; a machine without a toolchain fails here
            raise EngineSetupError(
                "distributed.offload_optimizer needs DeepSpeed's CPU Adam, which could not be built on this machine "
                f"({type(e).__name__}: {e}). It is compiled at first use and needs a C++ compiler, Python headers "
                "and ninja; or install DeepSpeed with DS_BUILD_CPU_ADAM=1 where they are."
            ) from e
    return torch.optim.AdamW(groups, fused=True, **kwargs)


def _deepspeed_safe_globals() -> list[Any]:
    """The plain-data DeepSpeed classes its optimizer checkpoints hold (allow-listed, nothing else)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def _load_weights_only(path: str, map_location: Any = None) -> Any:
    return load_torch(path, _deepspeed_safe_globals(), map_location=map_location)


def safe_checkpoint_loading(engine: Any) -> None:
    """DeepSpeed reads its checkpoint files with ``torch.load(weights_only=False)``, which runs whatever code a
    tampered file carries; route its loads through ``weights_only=True`` (tensors and plain containers only)."""
    engine.checkpoint_engine.load = _load_weights_only


def build_engine(
    module: nn.Module, optimizer: Any, scheduler: Any, train: TrainSection, distributed: DistributedSection
) -> Any:
    model = getattr(module, "model", None)
    if distributed.zero_stage == 3 and model is not None and model.cfg.tie_embeddings:
        # the head reads the embedding's matrix: say so, rather than rely on DeepSpeed noticing the access
        deepspeed.zero.register_external_parameter(model.head, model.embed.weight)
    engine, _, _, _ = deepspeed.initialize(
        model=module, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(train, distributed)
    )
    safe_checkpoint_loading(engine)
    return engine


def gathered(engine: Any, params: list[nn.Parameter]) -> Any:
    """A context in which ``params`` are whole on every rank (collective under ZeRO-3; nothing to do otherwise)."""
    if engine.zero_optimization_stage() == 3:
        return deepspeed.zero.GatheredParameters(params)
    return contextlib.nullcontext()


PORTABLE_KEYS = ("exp_avg", "exp_avg_sq")


def _adam(engine: Any) -> Any:
    """The torch optimizer under DeepSpeed's ZeRO / bf16 wrapper."""
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def _skipped_step(adam: Any, flats: list[torch.Tensor], step: Any) -> None:
    """Run ``step()`` with zero gradients and ``found_inf`` = 1: Adam creates its state, changes nothing."""
    created = [p for p in flats if p.grad is None]
    for p in created:
        p.grad = torch.zeros_like(p)
    adam.found_inf = torch.ones((), device=flats[0].device)
    step()
    adam.found_inf = None
    for p in created:
        p.grad = None


def _link_optimizer_states(engine: Any) -> None:
    """Make sure Adam's state exists and DeepSpeed's parameter -> state-fragment map is complete.

    Adam's state appears at its first step, so a fresh engine (resuming) has none: a skipped step creates it.
    ZeRO-1/2 link the map lazily after the step of the first parameter group only, leaving later groups
    unlinked (DeepSpeed 0.19): re-link. ZeRO-3 keeps its flat fp32 partitions out of the optimizer's
    parameter groups between steps and steps each sub-group itself."""
    adam, zero = _adam(engine), engine.optimizer
    if hasattr(zero, "fp32_partitioned_groups_flat"):  # ZeRO-3
        for i, flat in enumerate(zero.fp32_partitioned_groups_flat):
            if "exp_avg" not in adam.state.get(flat, {}):
                _skipped_step(adam, [flat], lambda i=i: zero._optimizer_step(i))
        return
    params = [p for group in adam.param_groups for p in group["params"]]
    if any("exp_avg" not in adam.state.get(p, {}) for p in params):
        _skipped_step(adam, params, adam.step)
    if hasattr(zero, "_lazy_init_hp_params_optimizer_state"):
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()


def gather_portable_state(engine: Any) -> tuple[dict[str, torch.Tensor] | None, int]:
    """Full fp32 master weights and Adam moments of every parameter, whatever the ZeRO partitioning, on rank 0
    (a collective: every rank calls it), and Adam's step count. Lets a checkpoint resume on another number of
    ranks without DeepSpeed's universal-checkpoint converter (which unpickles arbitrary objects)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    _link_optimizer_states(engine)
    out: dict[str, torch.Tensor] = {}
    for name, p in engine.module.named_parameters():
        fp32 = safe_get_full_fp32_param(p)
        if fp32 is None:
            raise ValueError("checkpoint.portable_optimizer needs ZeRO (distributed.zero_stage >= 1) or bf16")
        moments = [safe_get_full_optimizer_state(p, k) for k in PORTABLE_KEYS]
        if dist.get_rank() == 0:
            out[f"{name}::fp32"] = fp32.detach().float().cpu()
            out.update({f"{name}::{k}": m.detach().float().cpu() for k, m in zip(PORTABLE_KEYS, moments, strict=True)})
    steps = [s["step"] for s in _adam(engine).state.values() if "step" in s]
    return (out if dist.get_rank() == 0 else None), int(steps[0]) if steps else 0


def scatter_portable_state(engine: Any, tensors: dict[str, torch.Tensor], adam_step: int) -> None:
    """The inverse of ``gather_portable_state`` on the current layout (every rank calls it)."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    _link_optimizer_states(engine)
    for name, p in engine.module.named_parameters():
        full = tensors[f"{name}::fp32"].to(p.device)
        safe_set_full_fp32_param(p, full)
        for k in PORTABLE_KEYS:
            safe_set_full_optimizer_state(p, tensors[f"{name}::{k}"].to(p.device), k)
        # the module's own copy (low precision, or replicated) follows the fp32 master
        if hasattr(p, "ds_id"):  # ZeRO-3: partitioned, gathered to write
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0), torch.no_grad():
                if dist.get_rank() == 0:
                    p.data.copy_(full)
        else:
            with torch.no_grad():
                p.data.copy_(full)
    for state in _adam(engine).state.values():
        if "step" in state:
            state["step"].fill_(adam_step)


def plain_torch_writer(checkpoint_engine: Any) -> bool:
    """DeepSpeed writes its checkpoint files with plain ``torch.save`` (its default checkpoint engine, whose
    ``zipfile_serialization`` says which format), rather than a writer of its own."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    return type(checkpoint_engine) is TorchCheckpointEngine


def consolidated_state_dict(engine: Any) -> dict[str, torch.Tensor] | None:
    """Full weights of the engine's module on rank 0 (a collective under ZeRO-3: every rank must call it)."""
    if engine.zero_optimization_stage() == 3:
        state = engine._zero3_consolidated_16bit_state_dict()
        # DeepSpeed walks the parameters itself, past the hook that keeps activation checkpointing's wrapper
        # out of state-dict names; drop the wrapper's prefix so the names are the model's own.
        return None if state is None else {k.replace(_CHECKPOINT_PREFIX, ""): v for k, v in state.items()}
    return engine.module.state_dict() if dist.get_rank() == 0 else None
