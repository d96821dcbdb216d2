"""What a run directory records about its launches, so that it never says what did not happen.

``run_info.json`` keeps ``launches``: one entry per launch of the run (its start, what it resumed from, the
settings it changed that change no math, an extension of the run), appended on each resume. An extension is
also logged in ``metrics.jsonl`` and W&B at its first step (``launch/...``), and said on the console."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trainer.resume_check import Plan


def launch_entry(plan: Plan, *, start_step: int, resumed_from: Path | None, world_size: int, git_sha: str) -> dict:
    entry: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "git_sha": git_sha,
        "world_size": world_size,
        "precision": plan.precision,
        "start_step": start_step,
        "max_steps": plan.cfg.train.max_steps,
        "resumed_from": str(resumed_from) if resumed_from else None,
        "changed": {key: [old, new] for key, (old, new) in plan.changed.items()},
    }
    if plan.extension is not None:
        entry["extended"] = plan.extension.record()
    if plan.unknown_saved_keys:
        entry["unknown_saved_keys"] = plan.unknown_saved_keys
    return entry


def launches(run_dir: Path, entry: dict, *, resumed: bool) -> list[dict]:
    """The run's launches with this one appended; a run that starts at step 1 starts a new list."""
    previous: list[dict] = []
    if resumed:
        try:
            info = json.loads((run_dir / "run_info.json").read_text())
            previous = list(info.get("launches") or []) if isinstance(info, dict) else []
        except (OSError, ValueError):
            previous = []
    return [*previous, entry]


def announce(plan: Plan, emit: Callable[[int, dict[str, float]], None], *, rank: int) -> None:
    """Say on the console what this launch changed, and log an extension at its first step."""
    if rank == 0 and plan.changed:
        changes = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in plan.changed.items())
        print(f"resuming with changed settings that change no math (recorded in run_info.json): {changes}", flush=True)
    if plan.extension is not None:
        if rank == 0:
            print(plan.extension.describe(), flush=True)
        emit(plan.extension.step + 1, plan.extension.metrics())


def last_logged_loss(metrics_file: Path) -> float:
    """The last ``loss`` in metrics.jsonl (NaN if none): a resumed launch that stops before it logs still reports
    the run's latest loss in result.json, never less than the file held."""
    try:
        lines = metrics_file.read_text(errors="replace").splitlines()
    except OSError:
        return math.nan
    for line in reversed(lines):
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("loss"), (int, float)):
            return float(row["loss"])
    return math.nan
