"""Everything DeepSpeed: process-group set-up, the DeepSpeed config built from losslab's config, and the
engine. No other module imports deepspeed."""

from __future__ import annotations

import importlib
import os
import socket
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from torch import nn

from trainer.config import TrainSection


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> tuple[int, int]:
    """Join (or create) the process group; works under the deepspeed/torchrun launchers and as a plain
    ``python`` process (a world of one). Idempotent. Returns (rank, world_size)."""
    if not dist.is_initialized():
        if "RANK" not in os.environ:  # no launcher: a single process
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        cuda = torch.cuda.is_available()
        if not cuda and os.environ.get("LOSSLAB_CPU_SHM", "0") != "1":
            # DeepSpeed JIT-compiles a shared-memory all-reduce for CPU at every start (60-85 s on 2 cores);
            # returning None is its own "op unavailable" path, which falls back to gloo collectives.
            importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size()


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def use_bf16(precision: str) -> bool:
    return precision == "bf16" or (precision == "auto" and torch.cuda.is_available())


def deepspeed_config(train: TrainSection) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "gradient_clipping": train.grad_clip,
        "bf16": {"enabled": use_bf16(train.precision)},
        "zero_optimization": {"stage": train.zero_stage},
        # losslab passes a torch optimizer; DeepSpeed only vouches for its own under ZeRO
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def build_engine(module: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, train: TrainSection) -> Any:
    engine, _, _, _ = deepspeed.initialize(
        model=module, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(train)
    )
    return engine


def consolidated_state_dict(engine: Any, module: nn.Module) -> dict[str, torch.Tensor] | None:
    """Full model weights on rank 0 (a collective under ZeRO-3: every rank must call it)."""
    if engine.zero_optimization_stage() == 3:
        return engine._zero3_consolidated_16bit_state_dict()
    return module.state_dict() if dist.get_rank() == 0 else None
