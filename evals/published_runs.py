"""Finished runs published beside a study's report — everything the report reads, without the weights.

A study's report is computed from its runs' files: each run's config, ``run_info.json`` (commit, launches, data
state), ``result.json``, ``metrics.jsonl`` and, in its final checkpoint, ``meta.json``, the tokenizer, the
training token counts and the evaluations (``evals/<settings>/``: per-prompt replies and scores, per-document
held-out losses). Those are a few hundred KB a run; the weights and the optimizer state (2 GB a run in the
fine-tuning study) are not what the report reads. A *published record* of a run is that run directory with the
weights, the training state and W&B's offline log left out, so that

- a reviewer can recompute every number of the report from the repository, without training anything;
- a study that takes longer than one sitting (the fine-tuning study: about 6.5 core-hours) keeps its finished
  runs where a new machine finds them: its driver restores a published record instead of training the run again
  (``--retrain`` trains it anyway).

Layout of a folder of records (``OUT``, e.g. ``docs/results/finetune/runs``): ``OUT/<run>/`` holds the run's small
files as they were and ``RECORD`` (``published_record.json``: every kept file with its size and sha256, and what
was left out); files of ``BLOB_MIN`` bytes or more (the tokenizer, the token counts, replies of a few hundred
prompts) are kept once for all runs in ``OUT/_blobs/<sha256>.gz`` (gzip, no timestamp: packing the same run again
writes the same bytes). Restoring checks every file against its sha256, and writes ``RECORD`` into the restored
run directory: a checkpoint there holds ``meta.json`` (so it is found and its evaluations read) but not its
weights, and a reader that asks for them is told why (``models/checkpoint.file_problems``).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from data.files import write_atomic
from models.checkpoint import CHECKPOINTS, META, PUBLISHED_RECORD, training_state

RECORD = PUBLISHED_RECORD
BLOBS = "_blobs"
BLOB_MIN = 64 << 10
"""Files this size or larger are kept gzipped and once for all runs (the same tokenizer in every run)."""
FORMAT = 1
LEFT_OUT_DIRS = ("wandb",)
"""W&B's offline log: its content is in ``metrics.jsonl``; its files carry machine paths and timestamps."""
LEFT_OUT_FILES = ("run.lock", "wandb_id")
"""Which process holds the run, and the W&B run it resumes: state of the machine that ran it."""
_WEIGHTS = re.compile(r"model(-\d+-of-\d+)?\.safetensors")


class RecordError(Exception):
    """A record that cannot be written or restored as asked; one line naming the file."""


@dataclass(frozen=True)
class Packed:
    name: str
    kept: int
    """Files kept (in the record's folder or as blobs)."""
    kept_bytes: int
    left_out_bytes: int


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _checkpoint_file(run_dir: Path, rel: PurePosixPath) -> tuple[Path, str] | None:
    """(checkpoint directory, name inside it) for a file of ``RUN/checkpoints/<tag>/...``."""
    if len(rel.parts) >= 3 and rel.parts[0] == CHECKPOINTS:
        return run_dir / CHECKPOINTS / rel.parts[1], "/".join(rel.parts[2:])
    return None


def _left_out(run_dir: Path, rel: PurePosixPath) -> str:
    """Why a file of the run is not published ("" when it is)."""
    if rel.parts[0] in LEFT_OUT_DIRS:
        return "W&B's offline log"
    if rel.name in LEFT_OUT_FILES or rel.name.startswith(".") or rel.name.endswith(".tmp"):
        return "state of the machine that ran it"
    inside = _checkpoint_file(run_dir, rel)
    if inside is not None:
        ckpt, name = inside
        if not (ckpt / META).is_file():
            return "an incomplete checkpoint (its save never finished)"
        if _WEIGHTS.fullmatch(name):
            return "weights"
        if training_state(name):
            return "training state (read only to resume)"
    return ""


def finished(run_dir: Path) -> bool:
    """A trained run whose ``result.json`` says it completed, or a model evaluated and not trained here (no
    ``result.json``; the model before fine-tuning) whose checkpoint holds a complete evaluation."""
    from evals.results_store import find_results
    from evals.watch import RESULT
    from evals.watch import finished as trained
    from models.checkpoint import latest_checkpoint

    if (run_dir / RESULT).is_file():
        return trained(run_dir)
    ckpt = latest_checkpoint(run_dir)
    return ckpt is not None and any(s.complete for s in find_results(ckpt))


def pack(run_dir: Path, out: Path) -> Packed:
    """Write ``out/<run name>`` (replacing an older record of the run) and the blobs it needs."""
    if not run_dir.is_dir():
        raise RecordError(f"{run_dir}: not a run directory")
    name = run_dir.name
    blobs = out / BLOBS
    blobs.mkdir(parents=True, exist_ok=True)
    stage = out / f".{name}.packing"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    files: list[dict[str, Any]] = []
    left_out: dict[str, dict[str, Any]] = {}
    # a run restored from a record and published again: the same record (what the restoring machine added — a
    # lock, a relaunch's log — is its own state, and what was left out then is still what the record lacks)
    restored = read_record(run_dir) if (run_dir / RECORD).is_file() else None
    for path in sorted(p for p in run_dir.rglob("*") if p.is_file() and not p.is_symlink()):
        rel = PurePosixPath(path.relative_to(run_dir).as_posix())
        if str(rel) == RECORD:
            continue
        why = _left_out(run_dir, rel)
        if why:
            group = left_out.setdefault(why, {"files": 0, "bytes": 0, "examples": []})
            group["files"] += 1
            group["bytes"] += path.stat().st_size
            if len(group["examples"]) < 3:
                group["examples"].append(str(rel))
            continue
        data = path.read_bytes()
        entry: dict[str, Any] = {"path": str(rel), "bytes": len(data), "sha256": _sha256(data)}
        if len(data) >= BLOB_MIN:
            blob = blobs / f"{entry['sha256']}.gz"
            if not blob.is_file():
                write_atomic(blob, gzip.compress(data, compresslevel=9, mtime=0))
            entry["blob"] = True
        else:
            target = stage / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        files.append(entry)
    if not files:
        shutil.rmtree(stage)
        raise RecordError(f"{run_dir}: nothing to publish (no file besides weights and machine state)")
    if restored is not None:
        left_out = restored["left_out"]
    record = {
        "format": FORMAT,
        "run": name,
        "what": "a finished run without its weights, training state or W&B log (evals/published_runs.py)",
        "files": files,
        "left_out": left_out,
    }
    (stage / RECORD).write_text(json.dumps(record, indent=1) + "\n")
    final = out / name
    shutil.rmtree(final, ignore_errors=True)
    os.replace(stage, final)
    return Packed(name, len(files), sum(f["bytes"] for f in files), sum(g["bytes"] for g in left_out.values()))


def prune_blobs(out: Path) -> int:
    """Delete the blobs no record in ``out`` refers to any more (a run packed again after it changed); returns how
    many."""
    wanted = set()
    for record in out.glob(f"*/{RECORD}"):
        wanted |= {f["sha256"] for f in read_record(record.parent)["files"] if f.get("blob")}
    gone = [b for b in (out / BLOBS).glob("*.gz") if b.name[: -len(".gz")] not in wanted]
    for blob in gone:
        blob.unlink()
    return len(gone)


def read_record(record_dir: Path) -> dict[str, Any]:
    path = record_dir / RECORD
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise RecordError(f"{path}: missing (not a published run record)") from None
    except (OSError, ValueError) as e:
        raise RecordError(f"{path}: unreadable: {e}") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT or not isinstance(record.get("files"), list):
        raise RecordError(f"{path}: not a published run record of format {FORMAT}")
    return record


def restore(record_dir: Path, run_dir: Path) -> int:
    """Rebuild ``run_dir`` (which must not exist) from a published record, every file checked against its
    sha256; returns the number of files."""
    record = read_record(record_dir)
    if run_dir.exists():
        raise RecordError(f"{run_dir}: exists already (a record is restored only where the run is missing)")
    stage = run_dir.with_name(f".{run_dir.name}.restoring")
    shutil.rmtree(stage, ignore_errors=True)
    for entry in record["files"]:
        rel = PurePosixPath(str(entry.get("path", "")))
        if rel.is_absolute() or ".." in rel.parts or not rel.parts:
            raise RecordError(f"{record_dir / RECORD}: file path {str(rel)!r} leaves the run directory")
        source = record_dir.parent / BLOBS / f"{entry['sha256']}.gz" if entry.get("blob") else record_dir / rel
        try:
            data = source.read_bytes()
            if entry.get("blob"):
                data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
            shutil.rmtree(stage, ignore_errors=True)
            raise RecordError(f"{source}: unreadable ({e}); it holds {rel} of {record['run']}") from None
        if len(data) != entry["bytes"] or _sha256(data) != entry["sha256"]:
            shutil.rmtree(stage, ignore_errors=True)
            raise RecordError(
                f"{source}: not the published content of {rel} ({len(data)} bytes, sha256 {_sha256(data)[:16]}…; "
                f"the record says {entry['bytes']} bytes, {entry['sha256'][:16]}…)"
            )
        target = stage / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    (stage / RECORD).write_text((record_dir / RECORD).read_text())
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    os.replace(stage, run_dir)
    return len(record["files"])
