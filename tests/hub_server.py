"""A small Hugging Face Hub on the loopback address, for the fetch tests: the endpoints ``huggingface_hub``
calls, answered the way the Hub answers them (read from huggingface_hub's ``hf_api.py``, ``file_download.py``
and ``utils/_http.py``):

- ``GET /api/{models|datasets}/{repo}/revision/{rev}``: ``{"id", "sha", "siblings"}`` (``HfApi.repo_info``);
- ``GET /api/{models|datasets}/{repo}/tree/{rev}[/{path}]?recursive=..``: file and folder entries (``oid`` = git
  blob hash, ``lfs.oid`` = sha256), paginated with a ``Link: <...>; rel="next"`` header (``list_repo_tree``);
- ``HEAD|GET /[datasets/]{repo}/resolve/{rev}/{path}``: a regular file is answered here (``ETag`` = its git
  hash, ``X-Repo-Commit``); an LFS file is a 302 to a second server, the "CDN", with ``X-Linked-Etag`` (its
  sha256), ``X-Linked-Size`` and ``X-Repo-Commit`` (``get_hf_file_metadata`` reads them from the redirect,
  which it does not follow off the Hub's host);
- CDN ``GET /blob/{sha256}`` with ``Range: bytes=N-`` -> 206 and ``Content-Range`` (``http_get``'s resume).
Unknown repositories, revisions and files are 404s with the Hub's ``X-Error-Code``.

Faults a test can set: ``throttle`` (bytes per second the CDN sends), ``cut_after`` (the CDN drops the connection
after that many bytes of a file's first response). Every request is recorded in ``log``. Both servers bind
127.0.0.1 only, on free ports, and stop by themselves after ``lifetime`` seconds if nobody stops them.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, unquote, urlparse

PAGE = 2  # entries per tree page: small, so that pagination is exercised


def git_blob_hash(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    files: dict[str, bytes]
    lfs: set[str]
    commit: str = "0123456789abcdef0123456789abcdef01234567"
    revisions: tuple[str, ...] = ("main",)


@dataclass
class Hub:
    repos: dict[tuple[str, str], Repo]  # (models|datasets, repo id) -> repo
    throttle: float = 0.0
    cut_after: int = 0
    lifetime: float = 300.0
    log: list[tuple[str, str, str]] = field(default_factory=list)  # (method, path, Range header)
    _cut_done: set[str] = field(default_factory=set)

    def start(self) -> Hub:
        self.api = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self, cdn=False))
        self.cdn = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self, cdn=True))
        for server in (self.api, self.cdn):
            server.daemon_threads = True
            threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
        self._timer = threading.Timer(self.lifetime, self.stop)  # never outlives a test that forgot it
        self._timer.daemon = True
        self._timer.start()
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.api.server_address[1]}"

    @property
    def cdn_url(self) -> str:
        return f"http://127.0.0.1:{self.cdn.server_address[1]}"

    def stop(self) -> None:
        self._timer.cancel()
        for server in (self.api, self.cdn):
            server.shutdown()
            server.server_close()

    def find(self, kind: str, repo_id: str) -> Repo | None:
        return self.repos.get((kind, repo_id))

    def blob(self, sha256: str) -> bytes | None:
        for repo in self.repos.values():
            for path, data in repo.files.items():
                if path in repo.lfs and hashlib.sha256(data).hexdigest() == sha256:
                    return data
        return None


def _handler(hub: Hub, cdn: bool) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet: the test reads hub.log
            pass

        def do_HEAD(self) -> None:
            self._serve(body=False)

        def do_GET(self) -> None:
            self._serve(body=True)

        def _serve(self, body: bool) -> None:
            hub.log.append((self.command, self.path, self.headers.get("Range", "")))
            url = urlparse(self.path)
            if cdn:
                return self._blob(unquote(url.path), body)
            m = re.fullmatch(r"/api/(models|datasets)/([^/]+/[^/]+)/(revision|tree)/([^/]+)(/.*)?", url.path)
            if m:
                return self._api(m.group(1), m.group(2), m.group(3), unquote(m.group(4)), m.group(5), url.query)
            m = re.fullmatch(r"/(datasets/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)", url.path)
            if m:
                kind = "datasets" if m.group(1) else "models"
                return self._resolve(kind, m.group(2), unquote(m.group(3)), unquote(m.group(4)), body)
            self._error(404, "EntryNotFound", "no such endpoint")

        def _repo(self, kind: str, repo_id: str, revision: str) -> Repo | None:
            repo = hub.find(kind, repo_id)
            if repo is None:
                self._error(404, "RepoNotFound", f"Repository not found: {repo_id}")
            elif revision not in (*repo.revisions, repo.commit):
                self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
                return None
            return repo

        def _api(self, kind, repo_id, what, revision, path, query) -> None:
            repo = self._repo(kind, repo_id, revision)
            if repo is None:
                return
            if what == "revision":
                siblings = [{"rfilename": p} for p in sorted(repo.files)]
                return self._json({"id": repo_id, "sha": repo.commit, "siblings": siblings})
            params = parse_qs(query)
            prefix = unquote(path or "").strip("/")
            recursive = params.get("recursive", ["False"])[0].lower() == "true"
            entries = self._tree(repo, prefix, recursive)
            start = int(params.get("cursor", ["0"])[0])
            page = entries[start : start + PAGE]
            link = None
            if start + PAGE < len(entries):
                q = f"recursive={params.get('recursive', ['False'])[0]}&cursor={start + PAGE}"
                link = f'<{hub.url}/api/{kind}/{repo_id}/tree/{quote(revision, safe="")}{path or ""}?{q}>; rel="next"'
            self._json(page, {"Link": link} if link else {})

        def _tree(self, repo: Repo, prefix: str, recursive: bool) -> list[dict]:
            entries: dict[str, dict] = {}
            for p in sorted(repo.files):
                if prefix and not p.startswith(prefix + "/"):
                    continue
                rest = p[len(prefix) + 1 :] if prefix else p
                parts = rest.split("/")
                for depth in range(1, len(parts)):  # the folders on the way
                    folder = "/".join(([prefix] if prefix else []) + parts[:depth])
                    if recursive or depth == 1:
                        entries.setdefault(folder, {"type": "directory", "oid": "0" * 40, "size": 0, "path": folder})
                if recursive or len(parts) == 1:
                    data = repo.files[p]
                    entry = {"type": "file", "oid": git_blob_hash(data), "size": len(data), "path": p}
                    if p in repo.lfs:
                        entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
                    entries[p] = entry
            return list(entries.values())

        def _resolve(self, kind, repo_id, revision, path, body) -> None:
            repo = self._repo(kind, repo_id, revision)
            if repo is None:
                return
            data = repo.files.get(path)
            if data is None:
                return self._error(404, "EntryNotFound", f"{path} does not exist", {"X-Repo-Commit": repo.commit})
            if path in repo.lfs:
                sha = hashlib.sha256(data).hexdigest()
                self.send_response(302)
                self.send_header("Location", f"{hub.cdn_url}/blob/{sha}?signature=test")
                self.send_header("X-Repo-Commit", repo.commit)
                self.send_header("X-Linked-Etag", f'"{sha}"')
                self.send_header("X-Linked-Size", str(len(data)))
                self.send_header("ETag", f'"{git_blob_hash(data)}"')
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            headers = {"ETag": f'"{git_blob_hash(data)}"', "X-Repo-Commit": repo.commit}
            self._bytes(data, body, headers)

        def _blob(self, path: str, body: bool) -> None:
            data = hub.blob(path.removeprefix("/blob/"))
            if data is None:
                return self._error(404, "EntryNotFound", "no such blob")
            start = 0
            m = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
            if m:
                start = int(m.group(1))
                if start >= len(data):
                    return self._error(416, "RangeNotSatisfiable", "range not satisfiable")
            self.send_response(206 if m else 200)
            if m:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.send_header("Content-Length", str(len(data) - start))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            if not body:
                return
            cut = hub.cut_after if hub.cut_after and path not in hub._cut_done else 0
            sent, step = start, 16384
            while sent < len(data):
                end = min(len(data), sent + step)
                if cut and end - start >= cut:  # the first response for this blob stops here
                    self.wfile.write(data[sent : start + cut])
                    self.wfile.flush()
                    hub._cut_done.add(path)
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                self.wfile.write(data[sent:end])
                sent = end
                if hub.throttle:
                    time.sleep(step / hub.throttle)

        def _json(self, value, headers: dict | None = None) -> None:
            self._bytes(json.dumps(value).encode(), True, {"Content-Type": "application/json", **(headers or {})})

        def _bytes(self, data: bytes, body: bool, headers: dict) -> None:
            self.send_response(200)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body:
                self.wfile.write(data)

        def _error(self, status: int, code: str, message: str, headers: dict | None = None) -> None:
            data = json.dumps({"error": message}).encode()
            self.send_response(status)
            self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", message)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

    return Handler
