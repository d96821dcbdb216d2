"""Fetch files from a Hugging Face Hub repository: resumable across runs, retried, verified against the Hub's
sizes and hashes, with a progress bar per file and overall.

``huggingface_hub`` does every HTTP exchange: the repository's commit and file listing (``HfApi``), each file's
metadata and location (``get_hf_file_metadata``: a HEAD that follows the Hub's redirects), and the ranged,
retried transfer (``file_download.http_get``, which resumes a cut connection within a run). This module adds
what ``hf_hub_download`` lacks for 15 GB shards:

- a partial download kept on disk across runs (``NAME.<hash>.part``): a killed job continues where it stopped
  (``hf_hub_download`` writes to a per-process temporary file and starts a stopped download again from byte 0);
- a content check of every file, new or already on disk, against the Hub's listing: sha256 for LFS files, the
  git blob hash otherwise (``hf_hub_download`` checks sizes only): a corrupted file is fetched again;
- files pinned to one commit: a revision that moves while a fetch runs cannot mix two versions.

``HF_ENDPOINT`` chooses the Hub (a mirror, or a local test server); ``HF_TOKEN`` is sent to the Hub, never to a
storage host it redirects to.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from huggingface_hub import HfApi, constants, get_hf_file_metadata, hf_hub_url
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.file_download import http_get
from huggingface_hub.hf_api import RepoFile
from huggingface_hub.utils import build_hf_headers, disable_progress_bars
from huggingface_hub.utils.sha import git_hash
from tqdm import tqdm

from data.files import file_sha256

try:  # the HTTP client huggingface_hub uses: httpx2 from huggingface_hub 2, httpx before
    import httpx2 as _http
except ImportError:  # pragma: no cover - older huggingface_hub
    import httpx as _http  # type: ignore[no-redef]

TRANSPORT_ERRORS = (_http.TransportError, OfflineModeIsEnabled)
"""The Hub could not be reached at all (no route, refused, timed out, DNS, offline mode)."""


class HubError(Exception):
    """A fetch that cannot go on; the message is one line naming what failed."""


@dataclass(frozen=True)
class RemoteFile:
    """A file of the repository at the pinned commit, with what the Hub says its content is."""

    path: str
    size: int
    sha256: str | None
    """LFS files: the sha256 of the content."""
    blob_id: str
    """The git blob hash; the content's for a regular file (an LFS file's is its pointer's)."""

    @property
    def check(self) -> tuple[str, str]:
        return ("sha256", self.sha256) if self.sha256 else ("git blob sha1", self.blob_id)


def endpoint() -> str:
    return constants.ENDPOINT


def _describe(repo_id: str, repo_type: str) -> str:
    return f"{repo_type} {repo_id!r} on {endpoint()}"


def _reason(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def list_repo(repo_id: str, repo_type: str, revision: str) -> tuple[str, list[RemoteFile]]:
    """(commit, files) of the repository at ``revision``; a repository the Hub does not serve, or a Hub that cannot
    be reached, is a ``HubError`` naming it."""
    api = HfApi(endpoint=endpoint())
    where = _describe(repo_id, repo_type)
    try:
        commit = api.repo_info(repo_id, repo_type=repo_type, revision=revision).sha
        entries = api.list_repo_tree(repo_id, recursive=True, revision=commit, repo_type=repo_type)
        files = [
            RemoteFile(e.path, e.size, e.lfs.sha256 if e.lfs else None, e.blob_id)
            for e in entries
            if isinstance(e, RepoFile)
        ]
    except OfflineModeIsEnabled:
        raise HubError(f"cannot reach {where}: HF_HUB_OFFLINE is set (unset it to download)") from None
    except TRANSPORT_ERRORS as e:
        raise HubError(f"cannot reach {where} ({_reason(e)}); check the network, or HF_ENDPOINT") from None
    except RevisionNotFoundError:
        raise HubError(f"{where} has no revision {revision!r}") from None
    except GatedRepoError:
        raise HubError(f"{where} is gated: accept its terms on the Hub and set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise HubError(f"{where} does not exist, or is private (set HF_TOKEN)") from None
    except HfHubHTTPError as e:
        raise HubError(f"{where} answered {_reason(e)}") from None
    if commit is None:
        raise HubError(f"{where} did not name the commit of revision {revision!r}")
    return commit, files


def matches(path: Path, remote: RemoteFile) -> bool:
    """The file has the size and the content hash the Hub lists."""
    if not path.is_file() or path.stat().st_size != remote.size:
        return False
    if remote.sha256:
        return file_sha256(path) == remote.sha256
    return git_hash(path.read_bytes()) == remote.blob_id  # regular (non-LFS) files are small


class _CountingFile:
    """The ``.part`` file as ``http_get`` writes it, moving the progress bars with every chunk."""

    def __init__(self, fh, bars: list[tqdm]) -> None:
        self.fh, self.bars = fh, bars

    def write(self, data: bytes) -> int:
        n = self.fh.write(data)
        for bar in self.bars:
            bar.update(len(data))
        return n

    def tell(self) -> int:
        return self.fh.tell()

    def seek(self, *args) -> int:
        return self.fh.seek(*args)

    def truncate(self, *args) -> int:  # the server ignored the range: http_get starts the file again
        before = os.fstat(self.fh.fileno()).st_size
        after = self.fh.truncate(*args)
        for bar in self.bars:
            bar.update(after - before)
        return after


@dataclass
class Fetched:
    file: RemoteFile
    path: Path
    how: str
    """present (already on disk and verified), downloaded, resumed, or replaced (was corrupt)."""


class Fetcher:
    """Downloads files of one repository at one commit into ``out`` (the repository's layout), ``jobs`` at once."""

    def __init__(self, repo_id: str, repo_type: str, commit: str, out: Path, *, jobs: int = 4, attempts: int = 5,
                 show_progress: bool | None = None) -> None:  # fmt: skip
        self.repo_id, self.repo_type, self.commit, self.out = repo_id, repo_type, commit, out
        self.jobs, self.attempts = max(1, jobs), max(1, attempts)
        self.show_progress = show_progress  # None: bars on a terminal, one line per file elsewhere
        self._lock = threading.Lock()
        disable_progress_bars()  # huggingface_hub's own bars: ours count the same bytes

    def note(self, message: str) -> None:
        tqdm.write(message, file=sys.stderr)

    def fetch(self, files: list[RemoteFile]) -> list[Fetched]:
        total = sum(f.size for f in files)
        disable = None if self.show_progress is None else not self.show_progress
        self.overall = tqdm(total=total, unit="B", unit_scale=True, desc=f"{len(files)} files", position=0,
                            disable=disable, smoothing=0.05)  # fmt: skip
        slots: queue.Queue[int] = queue.Queue()
        for i in range(1, min(self.jobs, max(1, len(files))) + 1):
            slots.put(i)

        def one(f: RemoteFile) -> Fetched:
            slot = slots.get()
            bar = tqdm(total=f.size, unit="B", unit_scale=True, desc=f.path[-40:], position=slot, leave=False,
                       disable=disable)  # fmt: skip
            try:
                done = self._fetch_one(f, bar)
            finally:
                bar.close()
                slots.put(slot)
            if self.overall.disable:  # no bars (not a terminal): one line per file instead
                tqdm.write(f"{done.how}: {f.path} ({f.size / 1e6:.1f} MB, {f.check[0]} ok)", file=sys.stdout)
            return done

        try:
            with ThreadPoolExecutor(self.jobs) as pool:
                return list(pool.map(one, files))
        finally:
            self.overall.close()

    def _fetch_one(self, f: RemoteFile, bar: tqdm) -> Fetched:
        dest = self.out / f.path
        algo, digest = f.check
        how = "downloaded"
        if dest.exists():
            bar.set_postfix_str("verifying")
            if matches(dest, f):
                bar.update(f.size)
                self.overall.update(f.size)
                return Fetched(f, dest, "present")
            self.note(f"{f.path}: on disk, but its size or {algo} is not the Hub's: fetching it again")
            dest.unlink()
            how = "replaced"
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = dest.with_name(f"{dest.name}.{digest[:16]}.part")  # named by content: never resumed into another
        for attempt in range(1, self.attempts + 1):
            have = part.stat().st_size if part.exists() else 0
            if have > f.size:
                part.unlink()
                have = 0
            if have and how == "downloaded":
                how = "resumed"
            bar.reset(total=f.size)
            bar.update(have)
            bar.set_postfix_str(f"from byte {have}" if have else "")
            self.overall.update(have)
            try:
                self._transfer(f, part, have, bar)
            except (*TRANSPORT_ERRORS, HfHubHTTPError, OSError) as e:
                self.overall.update(-(part.stat().st_size if part.exists() else 0))
                if attempt == self.attempts:
                    raise HubError(f"{f.path}: failed {attempt} times, last: {_reason(e)} (run again to resume "
                                   f"from byte {part.stat().st_size if part.exists() else 0})") from None  # fmt: skip
                self.note(f"{f.path}: {_reason(e)}; retrying ({attempt}/{self.attempts - 1})")
                time.sleep(min(2**attempt, 30))
                continue
            bar.set_postfix_str("verifying")
            if matches(part, f):
                os.replace(part, dest)
                return Fetched(f, dest, how)
            self.overall.update(-f.size)
            self.note(f"{f.path}: the bytes received do not have the Hub's {algo}: fetching it again")
            part.unlink()
        raise HubError(f"{f.path}: no download in {self.attempts} attempts had the Hub's {algo} {digest}")

    def _transfer(self, f: RemoteFile, part: Path, have: int, bar: tqdm) -> None:
        url = hf_hub_url(self.repo_id, f.path, repo_type=self.repo_type, revision=self.commit, endpoint=endpoint())
        meta = get_hf_file_metadata(url, retry_on_errors=True)  # where the bytes are (a CDN for LFS files)
        if meta.size is not None and meta.size != f.size:
            raise HubError(f"{f.path}: the Hub lists {f.size} bytes but serves {meta.size}")
        headers = build_hf_headers()
        if urlparse(meta.location).netloc != urlparse(url).netloc:
            headers.pop("authorization", None)  # a signed storage URL: the token stays with the Hub
        with open(part, "ab") as fh:
            http_get(meta.location, _CountingFile(fh, [bar, self.overall]), resume_size=have, headers=headers,
                     expected_size=f.size, displayed_filename=f.path)  # fmt: skip


def parse_indices(spec: str, count: int) -> list[int]:
    """``"all"``, ``"none"``, or indices and ranges such as ``"0-3,7"``, each in [0, count)."""
    spec = spec.strip()
    if spec == "all":
        return list(range(count))
    if spec in ("none", ""):
        return []
    chosen: list[int] = []
    for item in spec.split(","):
        lo, sep, hi = item.strip().partition("-")
        try:
            a, b = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise HubError(f"--shards {spec!r}: expected all, none, or indices and ranges such as 0-3,7") from None
        if not 0 <= a <= b < count:
            raise HubError(f"--shards {spec!r}: the repository has {count} shards, numbered 0-{count - 1}")
        chosen.extend(i for i in range(a, b + 1) if i not in chosen)
    return chosen
