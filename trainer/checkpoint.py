"""Checkpoints: DeepSpeed's state (model, optimizer, LR scheduler) for resuming, plus everything needed to use
or reproduce the model without DeepSpeed: consolidated weights (safetensors), the resolved run config, the
model config, the tokenizer, provenance and the loop's own state (step, tokens, data position, RNG states).

Layout: ``RUN_DIR/checkpoints/step_0000300/{model.safetensors, config.yaml, model_config.json, tokenizer files,
meta.json, rng_rank<r>.json, <DeepSpeed files>}`` and ``RUN_DIR/checkpoints/latest`` (the newest tag).

Crash safety: a checkpoint is written into ``.tmp-step_N``, renamed to ``step_N`` only once every rank has
finished and ``meta.json`` (written last) is in place, and ``latest`` is replaced atomically afterwards. A
process killed at any point leaves the previous checkpoint untouched; a partial one is never picked up.
Loading never unpickles arbitrary objects: weights come from safetensors, DeepSpeed's files are read with
``torch.load(weights_only=True)`` (see ``engine.safe_checkpoint_loading``).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import save_file

from data.tokenizer import Tokenizer
from models import GPT, GPTConfig
from trainer.checkpoint_files import CheckpointError, load_json, load_safetensors, reading
from trainer.engine import consolidated_state_dict, gather_portable_state, scatter_portable_state
from trainer.run_info import git_sha

CHECKPOINTS = "checkpoints"
META = "meta.json"
LATEST = "latest"
COUNTS_FILE = "token_counts.safetensors"
PORTABLE_FILE = "optimizer_full.safetensors"


def step_tag(step: int) -> str:
    return f"step_{step:07d}"


def rng_state() -> dict[str, Any]:
    """This process's RNG states as JSON-able data (no pickle)."""
    version, state, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "python": [version, list(state), gauss],
        "numpy": [np_name, np_keys.tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)],
        "torch": torch.get_rng_state().tolist(),
        "cuda": [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(
    engine: Any,
    run_dir: Path,
    step: int,
    *,
    meta: dict[str, Any],
    config_yaml: str,
    model_cfg: GPTConfig,
    tokenizer_files: dict[str, str],
    keep: int,
    token_counts: torch.Tensor | None = None,
    portable: bool = False,
    die_midway: bool = False,
) -> Path:
    """Collective: every rank calls it. ``meta`` (the loop's state, with ``step``) goes into DeepSpeed's
    client state and ``meta.json``. Returns the checkpoint directory."""
    rank = dist.get_rank()
    root = run_dir / CHECKPOINTS
    tag = step_tag(step)
    tmp, final = root / f".tmp-{tag}", root / tag
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a process killed while writing
    dist.barrier()
    engine.save_checkpoint(str(root), tag=tmp.name, client_state={"losslab": meta}, save_latest=False)
    (tmp / f"rng_rank{rank}.json").write_text(json.dumps(rng_state()))
    state = consolidated_state_dict(engine)
    meta = {**meta, "lr_scheduler": engine.lr_scheduler.state_dict(), "zero_stage": engine.zero_optimization_stage()}
    if portable:
        full, meta["adam_step"] = gather_portable_state(engine)
        if rank == 0:
            save_file(full, str(tmp / PORTABLE_FILE))
    if die_midway:  # fault injection (debug.kill_in_checkpoint_at_step)
        os.kill(os.getpid(), signal.SIGKILL)
    dist.barrier()  # every rank's DeepSpeed and RNG files are in place
    if rank == 0:
        assert state is not None
        # the trained module is the objective (model + loss); keep only the model's weights
        weights = {
            k.removeprefix("model."): v.detach().cpu().contiguous() for k, v in state.items() if k.startswith("model.")
        }
        save_file(weights, str(tmp / "model.safetensors"))
        (tmp / "config.yaml").write_text(config_yaml)
        (tmp / "model_config.json").write_text(json.dumps(asdict(model_cfg), indent=2))
        for name, src in tokenizer_files.items():  # the tokenizer travels with the model
            shutil.copyfile(src, tmp / name)
        if token_counts is not None:  # training-data frequencies: PDL's weights and the eval's buckets
            save_file({"token_counts": token_counts.cpu().contiguous()}, str(tmp / COUNTS_FILE))
        # every file and its size, so that a loader names a missing or torn file before a library trips on it
        files = {str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
        (tmp / META).write_text(json.dumps({**meta, "files": files, "git_sha": git_sha()}, indent=2))
    dist.barrier()  # every rank's files are in place
    if rank == 0:
        if final.exists():  # the same step saved again (a resumed run that had not got further)
            shutil.rmtree(final)
        os.replace(tmp, final)
        write_atomic(root / LATEST, tag)
        _prune(root, keep)
    dist.barrier()
    return final


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


def _complete(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("step_*") if (p / META).is_file())


def _prune(root: Path, keep: int) -> None:
    if keep > 0:
        for old in _complete(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run directory, or None."""
    root = run_dir / CHECKPOINTS
    if (root / LATEST).is_file():
        named = root / (root / LATEST).read_text().strip()
        if (named / META).is_file():
            return named
    found = _complete(root) if root.is_dir() else []
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


def restore(engine: Any, ckpt: Path) -> dict[str, Any]:
    """Load DeepSpeed's state and this rank's RNG state; returns the checkpoint's loop state (meta).

    A ZeRO checkpoint's optimizer state is partitioned by rank: on another number of ranks it is rebuilt from
    the layout-free ``optimizer_full.safetensors`` (written with ``checkpoint.portable_optimizer=true``)."""
    meta = verify_files(ckpt)
    world = dist.get_world_size()
    if meta.get("zero_stage", 0) > 0 and meta.get("world_size", world) != world:
        if not (ckpt / PORTABLE_FILE).is_file():
            raise CheckpointError(
                f"{ckpt} was written by {meta['world_size']} ranks with ZeRO-{meta['zero_stage']}: resume it on "
                f"{meta['world_size']} ranks, write checkpoints with checkpoint.portable_optimizer=true, or start "
                "a new run from its weights with model.init_from"
            )
        scatter_portable_state(engine, load_safetensors(ckpt / PORTABLE_FILE), meta["adam_step"])
        scheduler = engine.lr_scheduler
        scheduler.load_state_dict(meta["lr_scheduler"])
        # a scheduler's state holds the last rates but does not apply them (an optimizer state_dict would)
        for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr(), strict=True):
            group["lr"] = lr
        _restore_rng(ckpt)
        return meta
    path, client = reading(ckpt, lambda: engine.load_checkpoint(str(ckpt.parent), tag=ckpt.name))
    if path is None or not isinstance(client, dict) or "losslab" not in client:
        raise CheckpointError(f"{ckpt}: DeepSpeed found no loadable state in it")
    _restore_rng(ckpt)
    return client["losslab"]


def _restore_rng(ckpt: Path) -> None:
    rng_file = ckpt / f"rng_rank{dist.get_rank()}.json"
    if rng_file.is_file():  # absent when resuming on more ranks than were saved
        set_rng_state(load_json(rng_file))


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
