"""The read side of losslab checkpoints, with no DeepSpeed import: layout, file checks, and rebuilding the model and
its tokenizer from a checkpoint's own files. Evaluation, export, import, comparison and ``model.init_from`` read
checkpoints through this module; writing and resuming (DeepSpeed's state) live in ``trainer/checkpoint.py``.

Layout: ``RUN_DIR/checkpoints/step_0000300/{model.safetensors, config.yaml, model_config.json, tokenizer files,
meta.json, rng_rank<r>.json, <DeepSpeed files>}`` and ``RUN_DIR/checkpoints/latest`` (the newest tag). A
checkpoint is complete when its ``meta.json`` (written last) is in place.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from data.tokenizer import Tokenizer
from models.checkpoint_files import CheckpointError, load_json, load_safetensors
from models.config import GPTConfig
from models.gpt import GPT

CHECKPOINTS = "checkpoints"
META = "meta.json"
LATEST = "latest"
COUNTS_FILE = "token_counts.safetensors"
PORTABLE_FILE = "optimizer_full.safetensors"


def step_tag(step: int) -> str:
    return f"step_{step:07d}"


def verify_files(ckpt: Path, names: list[str] | None = None) -> dict[str, Any]:
    """The checkpoint's meta, after checking that its files (all, or ``names``) are there with the sizes they
    were written with. Checkpoints written before the file list existed are not checked."""
    meta = load_json(ckpt / META)
    listed = meta.get("files") or {}
    for name in listed if names is None else [n for n in names if n in listed]:
        path = ckpt / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (the checkpoint was written with it)")
        if path.stat().st_size != listed[name]:
            raise CheckpointError(
                f"{path}: {path.stat().st_size} bytes, but it was written with {listed[name]} (truncated or replaced)"
            )
    return meta


def complete_checkpoints(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("step_*") if (p / META).is_file())


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run directory, or None."""
    root = run_dir / CHECKPOINTS
    if (root / LATEST).is_file():
        named = root / (root / LATEST).read_text().strip()
        if (named / META).is_file():
            return named
    found = complete_checkpoints(root) if root.is_dir() else []
    return found[-1] if found else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory (its latest complete checkpoint)."""
    p = Path(path)
    if (p / META).is_file():
        return p
    found = latest_checkpoint(p)
    if found is None:
        raise CheckpointError(f"no complete checkpoint at {str(p)!r} (expected {META} in a step_* directory)")
    return found


def check_model_fits(ckpt: Path, model_cfg: GPTConfig, what: str) -> None:
    """Refuse, before loading any tensor, a checkpoint whose model is not this run's model."""
    saved = asdict(saved_model_config(ckpt))
    mine = asdict(model_cfg)
    diff = {k: (saved.get(k), v) for k, v in mine.items() if saved.get(k) != v}
    if diff:
        shown = ", ".join(f"{k}: checkpoint {a!r} vs this run {b!r}" for k, (a, b) in sorted(diff.items()))
        raise CheckpointError(f"{what} {ckpt} holds another model ({shown})")


def saved_model_config(ckpt: Path) -> GPTConfig:
    """The checkpoint's model config; fields added since it was written take their defaults."""
    path = ckpt / "model_config.json"
    try:
        return GPTConfig(**load_json(path))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: not a model config this losslab can build: {e}") from None


def checkpoint_tokenizer(ckpt: Path, model_cfg: GPTConfig) -> Tokenizer:
    """The tokenizer saved with a checkpoint, refused when its vocabulary is not the model's (a model read
    with another tokenizer scores at chance, and nothing else would say so)."""
    tokenizer = Tokenizer(ckpt)
    if tokenizer.vocab_size != model_cfg.vocab_size:
        raise CheckpointError(
            f"{tokenizer.path} has {tokenizer.vocab_size} tokens but the model in {ckpt} was trained on "
            f"{model_cfg.vocab_size}: it is not this model's tokenizer"
        )
    return tokenizer


def load_model(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[GPT, Path]:
    """Rebuild the model of a checkpoint from its own files (safetensors: no pickled code runs)."""
    ckpt = resolve_checkpoint(path)
    verify_files(ckpt, ["model_config.json", "model.safetensors"])
    model = GPT(saved_model_config(ckpt))
    state = load_safetensors(ckpt / "model.safetensors")
    wrong = [k for k, v in model.state_dict().items() if k in state and state[k].shape != v.shape]
    missing, unexpected = set(model.state_dict()) - set(state), set(state) - set(model.state_dict())
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{ckpt / 'model.safetensors'} does not match its model config: missing {sorted(missing)}, "
            f"unexpected {sorted(unexpected)}, other shape {wrong}"
        )
    model.load_state_dict(state)
    return model.to(device=device, dtype=dtype).eval(), ckpt
