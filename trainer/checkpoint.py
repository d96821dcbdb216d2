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

from data.files import follow_umask, write_atomic
from models.checkpoint import (
    CHECKPOINTS,
    COUNTS_FILE,
    LATEST,
    META,
    PORTABLE_FILE,
    complete_checkpoints,
    step_tag,
    verify_files,
)
from models.checkpoint_files import CheckpointError, load_json, load_safetensors, reading
from models.config import GPTConfig
from trainer.engine import consolidated_state_dict, gather_portable_state, scatter_portable_state
from trainer.run_info import git_sha


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
        follow_umask(tmp)  # safetensors writes 0600 whatever the umask
        if final.exists():  # the same step saved again (a resumed run that had not got further)
            shutil.rmtree(final)
        os.replace(tmp, final)
        write_atomic(root / LATEST, tag)
        _prune(root, keep)
    dist.barrier()
    return final


def _prune(root: Path, keep: int) -> None:
    if keep > 0:
        for old in complete_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


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
