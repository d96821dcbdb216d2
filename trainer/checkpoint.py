"""Checkpoints: DeepSpeed's own state (for resuming) plus, beside it, everything needed to use or reproduce
the model without DeepSpeed: consolidated weights (safetensors, no pickle), the resolved run config, the
model config, the tokenizer, and provenance (git SHA, step, tokens, data state).

Layout: ``RUN_DIR/checkpoints/step_0000300/{model.safetensors, config.yaml, model_config.json, tokenizer.model,
meta.json, <DeepSpeed files>}``. ``meta.json`` is written last: a directory without it is incomplete.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from models import GPT, GPTConfig
from trainer.engine import consolidated_state_dict
from trainer.run_info import git_sha

CHECKPOINTS = "checkpoints"
META = "meta.json"


def step_tag(step: int) -> str:
    return f"step_{step:07d}"


def save_checkpoint(
    engine: Any,
    run_dir: Path,
    step: int,
    *,
    meta: dict[str, Any],
    config_yaml: str,
    model_cfg: GPTConfig,
    tokenizer_path: str,
    keep: int,
) -> Path:
    """Collective: every rank calls it. Returns the checkpoint directory."""
    root = run_dir / CHECKPOINTS
    tag = step_tag(step)
    engine.save_checkpoint(str(root), tag=tag, client_state={"losslab": meta})
    state = consolidated_state_dict(engine, engine.module)
    ckpt = root / tag
    if dist.get_rank() == 0:
        assert state is not None
        # the trained module is the objective (model + loss); keep only the model's weights
        weights = {
            k.removeprefix("model."): v.detach().cpu().contiguous() for k, v in state.items() if k.startswith("model.")
        }
        save_file(weights, str(ckpt / "model.safetensors"))
        (ckpt / "config.yaml").write_text(config_yaml)
        (ckpt / "model_config.json").write_text(json.dumps(asdict(model_cfg), indent=2))
        shutil.copyfile(tokenizer_path, ckpt / "tokenizer.model")
        (ckpt / META).write_text(json.dumps({**meta, "step": step, "git_sha": git_sha()}, indent=2))
        _prune(root, keep)
    dist.barrier()
    return ckpt


def _complete(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("step_*") if (p / META).is_file())


def _prune(root: Path, keep: int) -> None:
    if keep > 0:
        for old in _complete(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory (its latest complete checkpoint)."""
    p = Path(path)
    if (p / META).is_file():
        return p
    for root in (p / CHECKPOINTS, p):
        found = _complete(root) if root.is_dir() else []
        if found:
            return found[-1]
    raise FileNotFoundError(f"no complete checkpoint at {str(p)!r} (expected {META} in a step_* directory)")


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, Path]:
    """Rebuild the model of a checkpoint from its own files (safetensors: no pickled code runs)."""
    ckpt = resolve_checkpoint(path)
    cfg = GPTConfig(**json.loads((ckpt / "model_config.json").read_text()))
    model = GPT(cfg)
    state = load_file(str(ckpt / "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {ckpt} does not match its model config: missing {missing}, unexpected {unexpected}"
        )
    return model.to(device=device, dtype=torch.float32).eval(), ckpt
