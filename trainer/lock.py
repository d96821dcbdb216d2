"""One launch per run directory: rank 0 holds an exclusive advisory lock on ``RUN_DIR/run.lock`` (``flock``) for
the run's life. The kernel releases it when the process ends, however it ends, so a crash or a SIGKILL never
leaves a stale lock; a second launch on the same directory (a requeued job while the old one still runs, the
same command typed twice) stops with one line naming the holder, before it reads or writes anything there.

The lock file keeps the holder's host, pid and start time, which is what the second launch reports. Where the
file system has no locks (``flock`` fails with anything but "held"), the run goes on with a warning."""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import torch.distributed as dist

from losslab.log import get_logger
from trainer.collectives import from_rank0

log = get_logger(__name__)

LOCK_FILE = "run.lock"


class RunDirBusy(RuntimeError):
    """Another launch holds the run directory (or it cannot be used at all); the message says which."""


@contextlib.contextmanager
def hold_run_dir(run_dir: Path) -> Iterator[None]:
    """Collective: every rank enters, rank 0 takes the lock, and every rank learns whether it got it (none goes on
    if it did not). Held until the block ends; a directory this launch created and left holding nothing but the
    lock file (a launch refused before it wrote anything) is removed again."""
    held, error = None, None
    if dist.get_rank() == 0:
        try:
            held = _Lock.acquire(run_dir)
        except RunDirBusy as e:
            error = str(e)
    error = from_rank0(error)
    if error is not None:
        raise RunDirBusy(error)
    try:
        yield
    finally:
        if held is not None:
            held.release()


class _Lock:
    def __init__(self, run_dir: Path, fd: int, created: bool) -> None:
        self.run_dir, self.fd, self.created = run_dir, fd, created

    @classmethod
    def acquire(cls, run_dir: Path) -> _Lock:
        try:
            created = not run_dir.exists()
            run_dir.mkdir(parents=True, exist_ok=True)
            path = run_dir / LOCK_FILE
            for _ in range(10):
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = _holder(fd)
                    os.close(fd)
                    raise RunDirBusy(
                        f"run directory {str(run_dir)!r} is in use by another launch ({holder}; lock {path}): wait "
                        "for it to end or stop it, or choose another run.dir"
                    ) from None
                except OSError as e:  # no locks on this file system (some network file systems)
                    log.warning(
                        f"warning: cannot lock {path} ({os.strerror(e.errno or errno.ENOLCK)}): nothing stops a "
                        "second launch from using this run directory at the same time"
                    )
                    return cls(run_dir, fd, created)
                # the file locked may have been removed meanwhile by a launch giving back a directory it created
                if _same_file(path, fd):
                    _record_holder(fd)
                    return cls(run_dir, fd, created)
                os.close(fd)
                run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunDirBusy(f"cannot use run directory {str(run_dir)!r}: {e}") from None
        raise RunDirBusy(f"cannot lock run directory {str(run_dir)!r}: its lock file keeps being replaced")

    def release(self) -> None:
        with contextlib.suppress(OSError):
            if self.created and [p.name for p in self.run_dir.iterdir()] == [LOCK_FILE]:
                (self.run_dir / LOCK_FILE).unlink()  # while still held: see _same_file
                self.run_dir.rmdir()
        os.close(self.fd)


def _same_file(path: Path, fd: int) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _record_holder(fd: int) -> None:
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    info = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": started}) + "\n"
    with contextlib.suppress(OSError):  # the lock holds without it (a full disk); only the report is poorer
        os.ftruncate(fd, 0)
        os.pwrite(fd, info.encode(), 0)


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0))
        return f"pid {info['pid']} on host {info['host']}, started {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not yet written its host and pid"
