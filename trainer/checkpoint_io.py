"""The write side's guards: checksums of every checkpoint file, computed as each file is completed, and I/O errors
(a full disk above all) turned into one error on every rank instead of a traceback on one and a hang on the others.

Checksums: each rank hashes the files it writes (``data.files.DIGEST``) without waiting for the hash. DeepSpeed's
files (most of a checkpoint's bytes) are hashed while they are written: its checkpoint engine's ``save``, the one
call through which it writes them, is wrapped so that ``torch.save`` writes through ``HashingWriter``, which
hashes each chunk in a helper thread while the chunk goes to the file (no second read). The files losslab writes
itself (``model.safetensors`` first) are hashed in a background thread as soon as each is closed, read back
from the page cache while DeepSpeed's files are being written. ``docs/benchmarks.md`` has the cost.

Failures: a write that raises records the first error on its rank and the rank carries on to the next collective,
where every rank learns of it (``trainer.collectives.first_failure``) and raises ``CheckpointWriteError``."""

from __future__ import annotations

import errno
import io
import shutil
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

import torch
import xxhash

from data.files import file_digest
from models.checkpoint import complete_checkpoints, read_meta
from models.checkpoint_files import CheckpointError
from trainer.engine import plain_torch_writer

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
    """Checksums of the files this rank writes under ``root``: hashed in a background thread once written
    (``add``), or while written (``writer``)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-digest")
        self._chunks = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-digest-chunks")
        self._jobs: dict[str, Future[str]] = {}
        self._done: dict[str, str] = {}

    def add(self, path: Path | str) -> None:
        self._jobs[self._name(path)] = self._pool.submit(file_digest, path)

    def writer(self, fh: BinaryIO) -> HashingWriter:
        return HashingWriter(fh, self._chunks)

    def written(self, path: Path | str, writer: HashingWriter) -> None:
        self._done[self._name(path)] = writer.hexdigest()

    def result(self, errors: WriteErrors) -> dict[str, str]:
        """{file relative to root: digest}, once every hash is done (a file that cannot be read back is a
        write error)."""
        out = dict(self._done)
        for name, job in self._jobs.items():
            try:
                out[name] = job.result()
            except OSError as e:
                errors.attempt(self.root / name, lambda e=e: _raise(e))
        self._pool.shutdown()
        self._chunks.shutdown()
        return out

    def _name(self, path: Path | str) -> str:
        return str(Path(path).relative_to(self.root))


class HashingWriter(io.RawIOBase):
    """A write-only file that hashes what goes through it: each chunk is hashed in a helper thread while it is
    written (both release the GIL), and ``write`` returns once both are done, since the caller may reuse the
    chunk's buffer then. Chunks are hashed in order, so the digest is ``file_digest`` of the file."""

    def __init__(self, fh: BinaryIO, pool: ThreadPoolExecutor) -> None:
        super().__init__()
        self.fh, self.pool, self.hash = fh, pool, xxhash.xxh3_128()

    def writable(self) -> bool:
        return True

    def write(self, chunk: Any) -> int:
        hashed = self.pool.submit(self.hash.update, chunk)
        try:
            n = self.fh.write(chunk)
        finally:
            hashed.result()
        return n

    def hexdigest(self) -> str:
        return self.hash.hexdigest()


class HashingCheckpointEngine:
    """DeepSpeed's checkpoint engine with every ``save`` guarded and its file handed to ``FileDigests``; anything
    else is the wrapped engine's. A save that fails is recorded, not raised: DeepSpeed's own barriers then still
    meet, and the failure is agreed on after ``engine.save_checkpoint`` returns."""

    def __init__(self, inner: Any, errors: WriteErrors, digests: FileDigests) -> None:
        self.inner, self.errors, self.digests = inner, errors, digests

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def save(self, state_dict: Any, path: str) -> None:
        if plain_torch_writer(self.inner):  # DeepSpeed's default: torch.save, which can write through a hasher
            self.errors.attempt(path, lambda: self._save_hashed(state_dict, path))
        # another writer: hashed once written, or where it returns before the file is complete (DeepSpeed's
        # decoupled engines), by rank 0 after the save (save_checkpoint)
        elif self.errors.attempt(path, lambda: self.inner.save(state_dict, path)) and not self.inner.is_decoupled():
            self.digests.add(path)

    def _save_hashed(self, state_dict: Any, path: str) -> None:
        with open(path, "wb") as fh:
            out = self.digests.writer(fh)
            torch.save(state_dict, out, _use_new_zipfile_serialization=self.inner.zipfile_serialization)
        self.digests.written(path, out)

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
