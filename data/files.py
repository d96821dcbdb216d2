"""File helpers every floor of losslab may use: content hashes, atomic writes and the checkout's commit."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import xxhash

DIGEST = "xxh3_128"
"""The checksum of checkpoint and data files: xxHash's XXH3, 128 bits. Not cryptographic (it finds damage, not
tampering) but ~10x faster than sha256 here, so hashing a multi-GB checkpoint adds little to its save
(``docs/benchmarks.md``)."""
_BLOCK = 16 << 20
REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS = "docs/results"
"""Published reports: what a report writes, never code it was made by (see ``git_commit``)."""


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_digest(path: str | os.PathLike) -> str:
    """``DIGEST`` of a whole file, read in blocks into one reused buffer (no copy per block)."""
    h = xxhash.xxh3_128()
    buf = bytearray(_BLOCK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def text_digest(text: str) -> str:
    return xxhash.xxh3_128(text.encode()).hexdigest()


def write_atomic(path: Path, data: str | bytes) -> None:
    """Replace ``path`` with ``data`` (text or bytes) so that a reader (or a crash) never sees half of it. A write
    that fails (a full disk) leaves ``path`` as it was and no temporary file behind."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _umask() -> int:
    """This process's umask, read without changing it (``os.umask`` would, for a moment, for every thread)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(root: str | os.PathLike) -> None:
    """Give ``root`` and everything under it the modes the user's umask gives new files (0644 / 0755 under the
    usual 022): some writers create files 0600 whatever the umask (the safetensors library), which colleagues on
    a shared filesystem then cannot read."""
    mask = _umask()
    root = Path(root)
    paths = [root, *root.rglob("*")] if root.is_dir() else [root]
    for p in paths:
        if p.is_symlink():
            continue
        executable = p.is_dir() or p.stat().st_mode & 0o111
        os.chmod(p, (0o777 if executable else 0o666) & ~mask)


def git_commit(short: int = 0) -> str:
    """This checkout's commit (``short``: its first characters), with ``-dirty`` when a tracked file other than the
    published reports (``docs/results/``) has uncommitted changes; ``unknown`` outside git. A report written
    into ``docs/results/`` changes tracked files there itself: that says nothing about the code that made it, and
    counting it made every published report read "made by uncommitted code"."""
    try:
        run = {"cwd": REPO_ROOT, "capture_output": True, "text": True, "timeout": 30}
        sha = subprocess.run(["git", "rev-parse", "HEAD"], check=True, **run).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                f":(exclude){RESULTS}"], check=True, **run).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if not sha:
        return "unknown"
    return (sha[:short] if short else sha) + ("-dirty" if dirty else "")
