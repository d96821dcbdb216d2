"""``model.init_from``: the weights a run starts from — a losslab checkpoint or run directory (an
``import_hf.py`` output included), or a Hugging Face model folder — and the model they define."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from data.tokenizer import Tokenizer
from models import GPT, GPTConfig
from models.checkpoint import META, resolve_checkpoint, saved_model_config, verify_model_files
from models.checkpoint_files import CheckpointError, load_safetensors
from trainer.config import ConfigError, RunConfig


@dataclass
class InitSource:
    """The weights a run starts from (``model.init_from``): the model they define, and how to read them."""

    path: str
    cfg: GPTConfig
    weights: Callable[[], dict[str, torch.Tensor]]


def init_source(path: str, tokenizer: Tokenizer) -> InitSource:
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


def model_from_init(cfg: RunConfig, source: InitSource) -> GPTConfig:
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


def init_weights(model: GPT, source: InitSource) -> None:
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
