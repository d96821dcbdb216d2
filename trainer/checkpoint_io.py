"""The write side's guards: checksums of every checkpoint file, computed as each file is completed, and I/O errors
(a full disk above all) turned into one error on every rank instead of a traceback on one and a hang on the others.

Checksums: each rank hashes the files it writes (``data.files.DIGEST``) in a background thread, reading each one
back as soon as it is closed, while it is still in the page cache and while the next file is being written; the
save waits only for the last file's hash (``docs/benchmarks.md`` has the cost). DeepSpeed's files are caught as
they are written by wrapping its checkpoint engine's ``save``, the one call through which it writes them.

Failures: a write that raises records the first error on its rank and the rank carries on to the next collective,
where every rank learns of it (``trainer.collectives.first_failure``) and raises ``CheckpointWriteError``."""

from __future__ import annotations

import errno
import shutil
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from data.files import file_digest
from models.checkpoint import complete_checkpoints, read_meta
from models.checkpoint_files import CheckpointError

try:
    from safetensors import SafetensorError
except ImportError:  # older safetensors raise plain exceptions
    SafetensorError = RuntimeError  # type: ignore[misc,assignment]

# What a failed write raises: OSError (ENOSPC, EIO, EDQUOT, ...), torch.save's RuntimeError ("unexpected pos",
# "PytorchStreamWriter failed writing file"), safetensors' own error.
WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)


FULL_BELOW = 1 << 20
"""Free bytes below which a failed write is put down to a full file system."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (the message says which, why, and what space it needs)."""


class WriteErrors:
    """The first write that failed on this rank; later writes are skipped (they would fail the same way)."""

    def __init__(self) -> None:
        self.first: str | None = None

    def attempt(self, path: Path | str, write: Callable[[], Any]) -> bool:
        if self.first is not None:
            return False
        try:
            write()
        except WRITE_ERRORS as e:
            # torch.save says "unexpected pos" where the disk is full: say what it means
            full = getattr(e, "errno", None) != errno.ENOSPC and free_bytes(Path(path)) < FULL_BELOW
            self.first = f"{path}: {_first_line(e)}" + (" (the file system is full)" if full else "")
            return False
        return True


class FileDigests:
    """Checksums of the files this rank writes under ``root``, computed in a background thread."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-digest")
        self._jobs: dict[str, Future[str]] = {}

    def add(self, path: Path | str) -> None:
        self._jobs[str(Path(path).relative_to(self.root))] = self._pool.submit(file_digest, path)

    def result(self, errors: WriteErrors) -> dict[str, str]:
        """{file relative to root: digest}, once every hash is done (a file that cannot be read back is a
        write error)."""
        out = {}
        for name, job in self._jobs.items():
            try:
                out[name] = job.result()
            except OSError as e:
                errors.attempt(self.root / name, lambda e=e: _raise(e))
        self._pool.shutdown()
        return out


class HashingCheckpointEngine:
    """DeepSpeed's checkpoint engine with every ``save`` guarded and its file handed to ``FileDigests``; anything
    else is the wrapped engine's. A save that fails is recorded, not raised: DeepSpeed's own barriers then still
    meet, and the failure is agreed on after ``engine.save_checkpoint`` returns."""

    def __init__(self, inner: Any, errors: WriteErrors, digests: FileDigests) -> None:
        self.inner, self.errors, self.digests = inner, errors, digests

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def save(self, state_dict: Any, path: str) -> None:
        # a writer that returns before the file is complete (DeepSpeed's decoupled engines) is hashed by rank 0
        # after the save instead (save_checkpoint)
        if self.errors.attempt(path, lambda: self.inner.save(state_dict, path)) and not self.inner.is_decoupled():
            self.digests.add(path)

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        self.errors.attempt(path, lambda: self.inner.makedirs(path, exist_ok=exist_ok))


def checkpoint_size(ckpt: Path) -> int:
    """Bytes of a complete checkpoint (its file list; the files on disk for one written before the list)."""
    try:
        listed = read_meta(ckpt).get("files")
    except CheckpointError:
        listed = None
    return sum(listed.values()) if listed else dir_size(ckpt)


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def newest(root: Path) -> Path | None:
    found = complete_checkpoints(root) if root.is_dir() else []
    return found[-1] if found else None


def free_bytes(path: Path) -> int:
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def space_warning(root: Path, what: str) -> str | None:
    """A warning when the file system holding ``root`` has less free space than the last checkpoint took."""
    last = newest(root)
    if last is None:
        return None
    need, free = checkpoint_size(last), free_bytes(root)
    if free >= need:
        return None
    return (
        f"warning: {human(free)} free on the file system of {root}, and the last checkpoint ({last.name}) took "
        f"{human(need)}: {what} may not fit; free space (or lower checkpoint.keep)"
    )


def failure_message(step: int, tmp: Path, root: Path, error: str, partial: int) -> str:
    """One line: which checkpoint, why, the space a checkpoint takes, what is free, and what survives."""
    last = newest(root)
    free = human(free_bytes(root))
    if last is not None:
        space = f"a checkpoint of this run takes {human(checkpoint_size(last))} ({last.name}), {free} is free there"
        after = f"{last} is intact: free space, then continue with train.resume=auto"
    else:
        space = f"it had written {human(partial)} when it failed, {free} is free there"
        after = "there is no earlier checkpoint: free space, then start again"
    return (
        f"checkpoint step {step} could not be written ({error}); {space}; the partial {tmp.name} was removed "
        f"and {after}"
    )


def _raise(e: BaseException) -> None:
    raise e


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__
