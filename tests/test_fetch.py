"""``losslab fetch-data`` and ``fetch-tokenizer`` against a Hub on the loopback address (tests/hub_server.py)
that serves a small Pile-format repository the way the Hub does: the shards asked for, verified; a download
killed midway resumes; a dropped connection resumes within the run; a corrupted file is fetched again; an
unreachable Hub is one line and exit 2."""

from __future__ import annotations

import base64
import hashlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data.shards import write_shard
from tests.corpus import documents
from tests.hub_server import Hub, Repo

REPO = Path(__file__).resolve().parents[1]
DATASET = "test-org/pile-mini"
TOKENIZER = "test-org/llama-like"
CHUNK = 10 * 1024 * 1024  # huggingface_hub's download chunk (constants.DOWNLOAD_CHUNK_SIZE)


def shard_bytes(tmp: Path, name: str, docs: list[dict]) -> bytes:
    write_shard(str(tmp / name), docs, level=1)
    return (tmp / name).read_bytes()


@pytest.fixture(scope="module")
def hub(tmp_path_factory, corpus):
    tmp = tmp_path_factory.mktemp("hub_files")
    rng = random.Random(3)
    # a ~19 MB shard whose text does not compress: huggingface_hub writes what it receives in 10 MB chunks
    noisy = [{"text": base64.b64encode(rng.randbytes(96_000)).decode(), "meta": {"pile_set_name": "Pile-CC"}}
             for _ in range(200)]  # fmt: skip
    files = {
        "README.md": b"# pile-mini\nA test repository.\n",
        "train/00.jsonl.zst": shard_bytes(tmp, "00.jsonl.zst", noisy),
        "train/01.jsonl.zst": shard_bytes(tmp, "01.jsonl.zst", documents(300, seed=1)),
        "train/02.jsonl.zst": shard_bytes(tmp, "02.jsonl.zst", documents(300, seed=2)),
        "val.jsonl.zst": shard_bytes(tmp, "val.jsonl.zst", documents(50, seed=4)),
    }
    model = Path(corpus["tokenizer"]).read_bytes()
    tokenizer = Repo({"tokenizer.model": model, "tokenizer_config.json": b"{}"}, {"tokenizer.model"}, "f" * 40)
    dataset = Repo(files, lfs={p for p in files if p.endswith(".zst")})
    server = Hub({("datasets", DATASET): dataset, ("models", TOKENIZER): tokenizer}, lifetime=600).start()
    server.files, server.model = files, model
    yield server
    server.stop()


def env(endpoint: str, home: Path) -> dict[str, str]:
    drop = ("HF_TOKEN", "HF_HUB_OFFLINE", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy",
            "all_proxy")  # fmt: skip
    base = {k: v for k, v in os.environ.items() if k not in drop}
    return {**base, "HF_ENDPOINT": endpoint, "HF_HOME": str(home), "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}


def fetch(hub_url: str, tmp: Path, *args: str, command: str = "fetch-data") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "losslab", command, *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env=env(hub_url, tmp / "hf_home"))  # fmt: skip


def data_args(out: Path, *extra: str) -> list[str]:
    return ["--repo", DATASET, "--revision", "main", "--out", str(out), *extra]


def cdn_gets(hub: Hub, since: int) -> list[tuple[str, str, str]]:
    return [r for r in hub.log[since:] if r[0] == "GET" and r[1].startswith("/blob/")]


def test_the_shards_asked_for_are_fetched_and_verified(hub, tmp_path):
    out = tmp_path / "raw"
    proc = fetch(hub.url, tmp_path, *data_args(out, "--shards", "0,2", "--val"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert got == ["train/00.jsonl.zst", "train/02.jsonl.zst", "val.jsonl.zst"]
    for name in got:
        assert (out / name).read_bytes() == hub.files[name]
    assert "3 files verified" in proc.stdout and "3 downloaded" in proc.stdout
    assert "prepare_data.py" in proc.stdout  # the next step

    before = len(hub.log)
    again = fetch(hub.url, tmp_path, *data_args(out, "--shards", "0,2", "--val"))
    assert again.returncode == 0 and "3 present" in again.stdout, again.stderr[-3000:]
    assert cdn_gets(hub, before) == []  # intact files are checked, not downloaded again


def test_a_download_killed_midway_resumes(hub, tmp_path):
    out = tmp_path / "raw"
    size = len(hub.files["train/00.jsonl.zst"])
    hub.throttle = 6_000_000  # bytes/s: the 19 MB shard takes ~3 s
    cmd = [sys.executable, "-m", "losslab", "fetch-data", *data_args(out, "--shards", "0")]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=env(hub.url, tmp_path / "hf_home"))  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not any(p.stat().st_size >= CHUNK for p in out.glob("train/*.part")):
            assert proc.poll() is None and time.monotonic() < deadline, "the download ended before it was stopped"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        hub.throttle = 0
    (part,) = out.glob("train/*.part")
    kept = part.stat().st_size
    assert CHUNK <= kept < size and not (out / "train/00.jsonl.zst").exists()

    before = len(hub.log)
    again = fetch(hub.url, tmp_path, *data_args(out, "--shards", "0"))
    assert again.returncode == 0 and "1 resumed" in again.stdout, again.stderr[-3000:]
    assert (out / "train/00.jsonl.zst").read_bytes() == hub.files["train/00.jsonl.zst"]
    assert [r[2] for r in cdn_gets(hub, before)] == [f"bytes={kept}-"]  # only the missing bytes travelled
    assert not list(out.glob("train/*.part"))


def test_a_dropped_connection_resumes_within_the_run(hub, tmp_path):
    out = tmp_path / "raw"
    hub.cut_after = CHUNK + 2_000_000  # the connection drops after the first chunk was written
    try:
        before = len(hub.log)
        proc = fetch(hub.url, tmp_path, *data_args(out, "--shards", "0"))
    finally:
        hub.cut_after = 0
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "train/00.jsonl.zst").read_bytes() == hub.files["train/00.jsonl.zst"]
    assert [r[2] for r in cdn_gets(hub, before)] == ["", f"bytes={CHUNK}-"]


def test_a_corrupted_file_is_fetched_again(hub, tmp_path):
    out = tmp_path / "raw"
    assert fetch(hub.url, tmp_path, *data_args(out, "--shards", "1", "--val")).returncode == 0
    shard = out / "train/01.jsonl.zst"
    damaged = bytearray(shard.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF  # same size, one byte flipped: only the hash can tell
    shard.write_bytes(bytes(damaged))
    proc = fetch(hub.url, tmp_path, *data_args(out, "--shards", "1", "--val"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "train/01.jsonl.zst: on disk, but its size or sha256 is not the Hub's: fetching it again" in proc.stderr
    assert "1 replaced" in proc.stdout and "1 present" in proc.stdout
    assert shard.read_bytes() == hub.files["train/01.jsonl.zst"]


def one_error_line(proc: subprocess.CompletedProcess, *names: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


def test_an_unreachable_hub_is_one_line_and_exit_2(hub, tmp_path):
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    start = time.monotonic()
    one_error_line(fetch(dead, tmp_path, *data_args(tmp_path / "raw")), "cannot reach", DATASET, dead)
    one_error_line(fetch(dead, tmp_path, "--repo", TOKENIZER, "--out", str(tmp_path / "tok"),
                         command="fetch-tokenizer"), "cannot reach", TOKENIZER, dead)  # fmt: skip
    assert time.monotonic() - start < 30  # no long retry loop before saying so
    one_error_line(fetch(hub.url, tmp_path, "--repo", "test-org/nothing", "--out", str(tmp_path / "raw")),
                   "test-org/nothing", "does not exist")  # fmt: skip
    one_error_line(fetch(hub.url, tmp_path, *data_args(tmp_path / "raw", "--shards", "5")), "numbered 0-2")


def test_fetch_tokenizer(hub, tmp_path):
    out = tmp_path / "tok"
    sha = hashlib.sha256(hub.model).hexdigest()
    proc = fetch(hub.url, tmp_path, "--repo", TOKENIZER, "--out", str(out), "--expect-sha256", sha,
                 command="fetch-tokenizer")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "tokenizer.model").read_bytes() == hub.model
    assert "384 pieces" in proc.stdout and f"data.tokenizer={out / 'tokenizer.model'}" in proc.stdout
    wrong = fetch(hub.url, tmp_path, "--repo", TOKENIZER, "--out", str(out), "--expect-sha256", "0" * 64,
                  command="fetch-tokenizer")  # fmt: skip
    one_error_line(wrong, "tokenizer.model", "not the tokenizer asked for")
