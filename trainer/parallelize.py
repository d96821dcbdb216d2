"""Memory and speed transforms applied to the model before DeepSpeed wraps it (the model file knows none of
them): activation checkpointing and torch.compile, block by block."""

from __future__ import annotations

from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

from models import GPT


def apply(model: GPT, *, activation_checkpointing: bool, compile: bool) -> GPT:
    for i, block in enumerate(model.blocks):
        if activation_checkpointing:
            # non-reentrant: works with DeepSpeed's hooks and keeps the state-dict names unchanged
            block = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
        if compile:
            block.compile()
        model.blocks[i] = block
    return model
