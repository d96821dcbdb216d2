"""The run directory: what a run leaves in it, and what a launch does with a directory that already holds one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch.distributed as dist

from data.files import write_atomic
from models.checkpoint import CHECKPOINTS, PUBLISHED_RECORD
from trainer.config import RunConfig

METRICS = "metrics.jsonl"
RESULT = "result.json"
"""Written in the run directory when training stops (``loop.py``): ``complete`` tells a finished run from a
pre-empted one (both exit 0), so a driver such as ``scripts/run_grid.sh`` skips finished runs and resumes the
others."""

# What a run leaves in its directory; a run started again from its first step replaces all of it (and the mark of a
# run restored from a published record: the new run has its weights)
RUN_FILES = (METRICS, CHECKPOINTS, RESULT, "wandb_id", PUBLISHED_RECORD)


def prepare_run_dir(run_dir: Path, cfg: RunConfig, resume_ckpt: Path | None) -> None:
    """Decide from the directory's state what this launch does, and clear what a fresh start replaces.

    empty -> start. Holds a run, with a checkpoint to continue from -> (resume=auto) continue it. Holds a run
    that never completed a checkpoint (killed early, or while writing the first) -> resume=auto starts it again
    from step 1: nothing of it can be continued, and a pre-empted job relaunched with the same command must
    not fail. A run that finished without a checkpoint to continue from, or resume=none over any run, needs
    run.overwrite=true (or another run.dir)."""
    previous = [run_dir / name for name in RUN_FILES]
    started = any(p.exists() for p in previous)
    if resume_ckpt is None and started:
        done = finished(run_dir)
        if cfg.train.resume == "auto" and not done:
            if dist.get_rank() == 0:
                print(f"{run_dir}: no complete checkpoint to continue from; starting the run again", flush=True)
        elif not cfg.run.overwrite:
            what = "a finished run with no checkpoint to continue" if done else "a run"
            advice = "" if done else "continue it with train.resume=auto, "
            raise FileExistsError(
                f"run directory {str(run_dir)!r} already holds {what}; {advice}choose another run.dir, "
                "or set run.overwrite=true to replace it"
            )
        dist.barrier()  # every rank has looked before rank 0 removes anything
        if dist.get_rank() == 0:
            for p in previous:
                if p.is_dir():
                    shutil.rmtree(p)
                else:
                    p.unlink(missing_ok=True)
    dist.barrier()
    run_dir.mkdir(parents=True, exist_ok=True)


def finished(run_dir: Path) -> bool:
    try:
        return bool(json.loads((run_dir / RESULT).read_text()).get("complete"))
    except (OSError, ValueError, AttributeError):
        return False


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop rows logged after the checkpoint a run resumes from (they will be logged again), and a torn last
    line (a crash mid-write)."""
    if not path.is_file():
        return
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= last_step:
            rows.append(line)
    write_atomic(path, "".join(r + "\n" for r in rows))
