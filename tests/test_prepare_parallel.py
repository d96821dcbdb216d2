"""Preparation at cluster scale, driven as a user drives it: several shards and workers, a run killed with
SIGKILL and started again, ``--part`` halves merged — each output byte for byte the single-process run's."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data.shards import write_shard
from data.tokenise import fingerprint, write_prepared
from data.tokenizer import Tokenizer
from tests.corpus import documents

REPO = Path(__file__).resolve().parents[1]
SHARDS = 8


def running(pid: str) -> bool:
    """The process exists and is not a zombie (dead, waiting for a parent that may never reap it)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text().splitlines()
    except FileNotFoundError:
        return False
    return "\tZ" not in next(x for x in status if x.startswith("State"))


def children(pid: int) -> list[str]:
    """The process's children, whichever of its threads started them."""
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):  # a thread that has just ended
            out += (task / "children").read_text().split()
    return out


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def prepare_cmd(shards: str, tokenizer: str, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "scripts/prepare_data.py", "--files", shards, "--tokenizer", tokenizer,
            "--out", str(out), "--by-source", *extra]  # fmt: skip


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip


@pytest.fixture(scope="module")
def shards(tmp_path_factory, corpus) -> dict:
    """Eight shards of three domains (~0.4 MB of text each), and the single-process run over them."""
    root = tmp_path_factory.mktemp("many_shards")
    docs = documents(SHARDS * 500, seed=11)
    for i, d in enumerate(docs):
        d["meta"] = {"pile_set_name": ["Alpha", "Beta", "Gamma Set"][(i // 7) % 3]}
    for s in range(SHARDS):
        write_shard(str(root / f"{s:02d}.jsonl.zst"), docs[s::SHARDS], level=3)
    glob = str(root / "*.jsonl.zst")
    single = root / "single"
    proc = run(prepare_cmd(glob, corpus["tokenizer"], single, "--workers", "0"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"glob": glob, "root": root, "single": tree(single), "files": sorted(root.glob("*.jsonl.zst"))}


def test_merged_parts_are_one_pass_over_all_files(shards, corpus, tmp_path):
    """The shard-by-shard path writes what one pass over every file in order writes."""
    tok = Tokenizer(corpus["tokenizer"])
    files = [str(f) for f in shards["files"]]
    fp = fingerprint(files, tok.sha256, True, None)
    write_prepared(files, tok, corpus["tokenizer"], tmp_path, fp, by_source=True, workers=0, batch_bytes=1 << 20,
                   progress=type("Quiet", (), {"update": lambda self, n: None})(), records=None)  # fmt: skip
    assert tree(tmp_path) == shards["single"]


def test_a_killed_run_resumes_with_the_shards_not_done(shards, corpus, tmp_path):
    out = tmp_path / "prepared"
    parts = tmp_path / "prepared.parts"
    cmd = prepare_cmd(shards["glob"], corpus["tokenizer"], out, "--workers", "2")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    deadline = time.monotonic() + 120
    try:
        # a shard done and shard jobs running: kill the run (jobs end together: a moment after one is done, the
        # next may not have started yet, and there is nothing to kill)
        while not (list(parts.glob("*/manifest.json")) and (jobs := children(proc.pid))):
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before a shard was done"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)  # the main process only: its shard jobs must die with it
    finally:
        proc.kill()
        proc.wait()
    time.sleep(0.5)
    assert jobs and not any(running(pid) for pid in jobs), "a shard job outlived the run"
    done = len(list(parts.glob("*/manifest.json")))
    assert 0 < done < SHARDS and not out.exists()

    again = run(cmd)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{done} of {SHARDS} shards already prepared" in again.stderr
    assert tree(out) == shards["single"]
    assert not parts.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["prepared"]  # nothing left over


def test_part_halves_merged_equal_the_whole(shards, corpus, tmp_path):
    out = tmp_path / "prepared"
    first = run(prepare_cmd(shards["glob"], corpus["tokenizer"], out, "--part", "0/2", "--workers", "1"))
    assert first.returncode == 0 and "part 0/2: 4 shards prepared" in first.stdout, first.stderr[-3000:]
    early = run(prepare_cmd(shards["glob"], corpus["tokenizer"], out, "--merge"))
    assert early.returncode == 2 and early.stderr.count("\n") == 1, early.stderr
    assert "4 of 8 shards are not prepared" in early.stderr and "01.jsonl.zst" in early.stderr
    second = run(prepare_cmd(shards["glob"], corpus["tokenizer"], out, "--part", "1/2", "--workers", "2"))
    assert second.returncode == 0, second.stderr[-3000:]
    merged = run(prepare_cmd(shards["glob"], corpus["tokenizer"], out, "--merge"))
    assert merged.returncode == 0, merged.stderr[-3000:]
    assert tree(out) == shards["single"]


def test_a_bad_part_is_one_line(shards, corpus, tmp_path):
    proc = run(prepare_cmd(shards["glob"], corpus["tokenizer"], tmp_path / "p", "--part", "2/2"))
    assert proc.returncode == 2 and proc.stderr.strip() == "error: --part '2/2': i must be in [0, n), e.g. 0/4 ... 3/4"
