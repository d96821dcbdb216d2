"""Checkpoints: DeepSpeed's state (model, optimizer, LR scheduler) for resuming, plus everything needed to use
or reproduce the model without DeepSpeed: consolidated weights (safetensors), the resolved run config, the
model config, the tokenizer, provenance and the loop's own state (step, tokens, data position, RNG states).

Layout: ``RUN_DIR/checkpoints/step_0000300/{model.safetensors, config.yaml, model_config.json, tokenizer files,
meta.json, rng_rank<r>.json, <DeepSpeed files>}`` and ``RUN_DIR/checkpoints/latest`` (the newest tag).

Crash safety: a checkpoint is written into ``.tmp-step_N``, renamed to ``step_N`` only once every rank has
finished and ``meta.json`` (written last, with every file's size and checksum) is in place; ``latest`` is
replaced atomically just before the rename. A process killed at any point leaves the previous checkpoint
untouched; a partial one is never picked up. A write that fails (a full disk) removes the partial checkpoint and
stops every rank with one line (``CheckpointWriteError``).

Resuming (``choose_resume``) checks every file of the checkpoint against its checksum first, the files shared out
among the ranks; ``train.resume=auto`` passes over a damaged checkpoint (moved aside to ``damaged-step_N``) to the
newest intact one.
Loading never unpickles arbitrary objects: weights come from safetensors, DeepSpeed's files are read with
``torch.load(weights_only=True)`` (see ``engine.safe_checkpoint_loading``).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import save_file

from data.files import DIGEST, file_digest, follow_umask, git_commit, write_atomic
from losslab.log import get_logger
from models.checkpoint import (
    CHECKPOINTS,
    COUNTS_FILE,
    DIGESTS,
    LATEST,
    META,
    PORTABLE_FILE,
    complete_checkpoints,
    file_problems,
    latest_checkpoint,
    read_meta,
    resolve_checkpoint,
    seal,
    step_tag,
    verified,
    warn_unverified,
)
from models.checkpoint_files import CheckpointError, load_json, load_safetensors, reading
from models.config import GPTConfig
from trainer.checkpoint_io import (
    CheckpointWriteError,
    FileDigests,
    HashingCheckpointEngine,
    WriteErrors,
    dir_size,
    failure_message,
    space_warning,
)
from trainer.collectives import first_failure, from_rank0, gathered
from trainer.engine import consolidated_state_dict, gather_portable_state, scatter_portable_state

log = get_logger(__name__)


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
    before_commit: Callable[[Path], None] | None = None,
) -> Path:
    """Collective: every rank calls it. ``meta`` (the loop's state, with ``step``) goes into DeepSpeed's
    client state and ``meta.json``. Returns the checkpoint directory.

    Every file is checksummed as it is completed (``checkpoint_io``). A write that fails on any rank (a full
    disk) raises ``CheckpointWriteError`` on every rank, after the partial checkpoint is removed; the previous
    one and ``latest`` are untouched. ``before_commit(tmp)`` runs on every rank once its files are in ``tmp``,
    before the checkpoint is committed (the loop's ``Callback.pre_checkpoint_commit``)."""
    rank = dist.get_rank()
    root = run_dir / CHECKPOINTS
    tag = step_tag(step)
    tmp, final = root / f".tmp-{tag}", root / tag
    errors = WriteErrors()
    if rank == 0:
        warning = space_warning(root, f"the checkpoint at step {step}")
        if warning:
            log.warning(warning)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a process killed while writing
        errors.attempt(tmp, lambda: tmp.mkdir(parents=True))
    _agree(errors, step, tmp, root)
    digests = FileDigests(tmp)
    # The model's own files first: their hashes (in the background) then overlap DeepSpeed's larger writes.
    state = consolidated_state_dict(engine)
    if rank == 0:
        assert state is not None
        # the trained module is the objective (model + loss); keep only the model's weights
        weights = {
            k.removeprefix("model."): v.detach().cpu().contiguous() for k, v in state.items() if k.startswith("model.")
        }
        _write(errors, digests, tmp / "model.safetensors", lambda p: save_file(weights, str(p)))
        _write(errors, digests, tmp / "config.yaml", lambda p: p.write_text(config_yaml))
        model_json = json.dumps(asdict(model_cfg), indent=2)
        _write(errors, digests, tmp / "model_config.json", lambda p: p.write_text(model_json))
        for name, src in tokenizer_files.items():  # the tokenizer travels with the model
            _write(errors, digests, tmp / name, lambda p, src=src: shutil.copyfile(src, p))
        if token_counts is not None:  # training-data frequencies: PDL's weights and the eval's buckets
            counts = {"token_counts": token_counts.cpu().contiguous()}
            _write(errors, digests, tmp / COUNTS_FILE, lambda p: save_file(counts, str(p)))
    del state
    meta = {**meta, "lr_scheduler": engine.lr_scheduler.state_dict(), "zero_stage": engine.zero_optimization_stage()}
    if portable:
        full, meta["adam_step"] = gather_portable_state(engine)
        if rank == 0:
            _write(errors, digests, tmp / PORTABLE_FILE, lambda p: save_file(full, str(p)))
        del full
    deepspeed_writer = engine.checkpoint_engine
    engine.checkpoint_engine = HashingCheckpointEngine(deepspeed_writer, errors, digests)
    try:
        engine.save_checkpoint(str(root), tag=tmp.name, client_state={"losslab": meta}, save_latest=False)
    finally:
        engine.checkpoint_engine = deepspeed_writer
    _write(errors, digests, tmp / f"rng_rank{rank}.json", lambda p: p.write_text(json.dumps(rng_state())))
    if before_commit is not None:
        before_commit(tmp)
    every_rank = gathered(digests.result(errors))
    if rank == 0 and errors.first is None:
        # every file with its size and checksum, so that a loader names a missing, torn or corrupted file
        files = {str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
        sums = {name: digest for mine in every_rank for name, digest in mine.items()}
        for name in files.keys() - sums.keys():  # written past the hooks (a decoupled DeepSpeed writer)
            errors.attempt(tmp / name, lambda name=name: sums.__setitem__(name, file_digest(tmp / name)))
        body = seal({**meta, "files": files, DIGESTS: {k: sums[k] for k in files if k in sums}, "digest": DIGEST,
                     "git_sha": git_commit()})  # fmt: skip
        errors.attempt(tmp / META, lambda: (tmp / META).write_text(json.dumps(body, indent=2)))
        # `latest` before the rename: until the rename it names no complete checkpoint, and readers then take
        # the newest complete one, which is still the previous checkpoint
        errors.attempt(root / LATEST, lambda: write_atomic(root / LATEST, tag))
    _agree(errors, step, tmp, root)  # every rank's files are in place
    if rank == 0:
        follow_umask(tmp)  # safetensors writes 0600 whatever the umask
        if final.exists():  # the same step saved again (a resumed run that had not got further)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _prune(root, keep)
    dist.barrier()
    return final


def start_space_check(run_dir: Path) -> None:
    """Warn at start-up, not hours later at the next save, when the run's next checkpoint will not fit."""
    if dist.get_rank() == 0:
        warning = space_warning(run_dir / CHECKPOINTS, "this run's next checkpoint")
        if warning:
            log.warning(warning)


def _write(errors: WriteErrors, digests: FileDigests, path: Path, write: Callable[[Path], Any]) -> None:
    if errors.attempt(path, lambda: write(path)):
        digests.add(path)


def _agree(errors: WriteErrors, step: int, tmp: Path, root: Path) -> None:
    """Collective, in place of a barrier: if a write failed on any rank, every rank raises the same one-line
    ``CheckpointWriteError`` once rank 0 has removed the partial checkpoint (nothing writes to it any more)."""
    world = dist.get_world_size()
    mine = None if errors.first is None else errors.first + (f" on rank {dist.get_rank()}" if world > 1 else "")
    failure = first_failure(mine)
    if failure is None:
        return
    message = None
    if dist.get_rank() == 0:
        partial = dir_size(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        message = failure_message(step, tmp, root, failure, partial)
    raise CheckpointWriteError(from_rank0(message))


def _prune(root: Path, keep: int) -> None:
    if keep > 0:
        for old in complete_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


def restore(engine: Any, ckpt: Path) -> dict[str, Any]:
    """Load DeepSpeed's state and this rank's RNG state; returns the checkpoint's loop state (meta).

    A ZeRO checkpoint's optimizer state is partitioned by rank: on another number of ranks it is rebuilt from
    the layout-free ``optimizer_full.safetensors`` (written with ``checkpoint.portable_optimizer=true``)."""
    meta = read_meta(ckpt)  # its files were checked when it was chosen (choose_resume)
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


def choose_resume(resume: str, run_dir: Path) -> Path | None:
    """The checkpoint a run continues from (collective), its files checked against their checksums first.

    ``none``: None. A path: that checkpoint (or a run's latest), and a damaged file is one ``CheckpointError``
    line. ``auto``: the run directory's ``latest``, or — when a file of it is damaged — the newest intact
    checkpoint before it, with one warning naming the file, the damaged one moved aside to ``damaged-step_N``
    so that nothing picks it up again; None when there is none at all; ``CheckpointError`` when there are
    checkpoints but none is intact (nothing is removed: ``run.overwrite=true`` starts again)."""
    if resume == "none":
        return None
    if resume != "auto":
        ckpt = resolve_checkpoint(resume)
        problem = _damage(ckpt)
        if problem is not None:
            raise CheckpointError(f"train.resume: {problem}")
        return ckpt
    damaged: list[tuple[Path, str]] = []
    for ckpt in _candidates(run_dir):
        problem = _damage(ckpt)
        if problem is None:
            if damaged:
                _set_aside(damaged, ckpt)
            return ckpt
        damaged.append((ckpt, problem))
    if damaged:
        more = f" (and {len(damaged) - 1} older checkpoint(s) damaged too)" if len(damaged) > 1 else ""
        raise CheckpointError(
            f"no intact checkpoint to resume from in {run_dir / CHECKPOINTS}: {damaged[0][1]}{more}; "
            "`losslab verify` lists every damaged file; run.overwrite=true starts the run again"
        )
    return None


def _candidates(run_dir: Path) -> list[Path]:
    """``latest`` first, then the complete checkpoints before it, newest first (those after it belong to a
    trajectory that a resume from an earlier checkpoint has since replaced)."""
    latest = latest_checkpoint(run_dir)
    if latest is None:
        return []
    earlier = [c for c in complete_checkpoints(run_dir / CHECKPOINTS) if c.name < latest.name]
    return [latest, *reversed(earlier)]


def _damage(ckpt: Path) -> str | None:
    """Collective: the first damaged file of ``ckpt`` (one line), or None. The files are shared out among the
    ranks by size, so a large checkpoint is read back in parallel."""
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        meta = read_meta(ckpt)
        problems = file_problems(ckpt, meta, _share(meta.get("files") or {}, rank, world))
        mine = problems[0] if problems else None
    except CheckpointError as e:
        meta, mine = {}, str(e)
    found = first_failure(mine)
    if found is None and rank == 0 and not verified(meta):
        warn_unverified(ckpt, meta)
    return found


def _share(sizes: dict[str, int], rank: int, world: int) -> list[str]:
    """This rank's part of the files: largest first, each to the rank with the fewest bytes so far."""
    load = [0] * world
    mine = []
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        r = load.index(min(load))
        load[r] += sizes[name]
        if r == rank:
            mine.append(name)
    return mine


def _set_aside(damaged: list[tuple[Path, str]], intact: Path) -> None:
    """Rank 0 moves the damaged checkpoints out of the way and says so, one warning each."""
    if dist.get_rank() == 0:
        for ckpt, problem in damaged:
            aside = ckpt.with_name(f"damaged-{ckpt.name}")
            n = 1
            while aside.exists():
                n += 1
                aside = ckpt.with_name(f"damaged{n}-{ckpt.name}")
            os.replace(ckpt, aside)
            log.warning(
                f"warning: {problem}: checkpoint {ckpt.name} skipped (moved to {aside.name}); resuming from the "
                f"newest intact one, {intact}"
            )
    dist.barrier()
