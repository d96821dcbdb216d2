"""Preparation at cluster scale: every shard is prepared on its own, once, into ``OUT.parts/``, and the parts
are merged into the prepared directory training reads.

- A shard's part is written to a temporary folder and renamed when complete, with the fingerprint of its one
  input file (path, size, mtime, tokenizer, settings) in its manifest: a stopped run (Ctrl-C, SIGKILL, a node
  lost) continues with the shards whose part is missing or stale; a part is never prepared twice.
- Shard jobs run in child processes, as many at once as there are workers (and shards); when workers outnumber
  the shards left, each job tokenises with several worker processes of its own. Children die with the parent
  (Linux ``PR_SET_PDEATHSIG``), so killing the run never leaves a job writing behind it.
- ``part=(i, n)`` prepares shards ``i, i + n, i + 2n, ...`` only: n nodes sharing a file system each run one
  part, and one merge then builds the output — the same files as a single run.
- The merge concatenates each source's parts in the order of the files (documents keep the corpus order),
  shifts document offsets, sums token counts and read statistics: byte for byte what one pass over all files
  writes.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import multiprocessing.connection
import os
import shutil
import signal
import socket
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data.sft import FineTuningRecords
from data.shards import DataError
from data.tokenise import MANIFEST, die_with_parent, fingerprint, source_dirname, write_prepared
from data.tokenizer import Tokenizer
from losslab.log import get_logger

log = get_logger(__name__)

PARTS_SUFFIX = ".parts"


@dataclass
class ShardPart:
    """One input shard and the folder its prepared part goes to."""

    index: int
    """Position of the shard in the corpus's file order (the order of the merged output)."""
    file: str
    dir: Path
    fingerprint: dict

    def done(self) -> bool:
        try:
            return json.loads((self.dir / MANIFEST).read_text()).get("fingerprint") == self.fingerprint
        except (OSError, ValueError):
            return False

    def manifest(self) -> dict:
        return json.loads((self.dir / MANIFEST).read_text())


def parts_dir(out: Path) -> Path:
    return out.parent / f"{out.name}{PARTS_SUFFIX}"


def plan(files: list[str], out: Path, tokenizer_sha: str, by_source: bool, records: FineTuningRecords | None):
    """The part of every shard; a part's folder is named after its file, so adding shards keeps the others."""
    root = parts_dir(out)
    parts = []
    for i, f in enumerate(files):
        key = hashlib.sha1(os.path.abspath(f).encode()).hexdigest()[:12]
        stem = Path(f).name.split(".")[0]
        parts.append(ShardPart(i, f, root / f"{stem}-{key}", fingerprint([f], tokenizer_sha, by_source, records)))
    return parts


def select(parts: list[ShardPart], part: tuple[int, int] | None) -> list[ShardPart]:
    """The shards of node ``i`` of ``n`` (round robin over the file order), or all of them."""
    if part is None:
        return parts
    i, n = part
    return [p for p in parts if p.index % n == i]


def parse_part(spec: str) -> tuple[int, int]:
    """``"i/n"`` -> (i, n) with 0 <= i < n."""
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise DataError(f"--part {spec!r}: expected i/n, e.g. 0/4 (the first of four nodes)") from None
    if not 0 <= i < n:
        raise DataError(f"--part {spec!r}: i must be in [0, n), e.g. 0/4 ... 3/4")
    return i, n


# ---------------------------------------------------------------------------------------------- shard jobs


class _SharedCounter:
    """``Progress`` for a child process: text bytes tokenised, read by the parent for its bar."""

    def __init__(self, value) -> None:
        self.value = value

    def update(self, n: int) -> None:
        with self.value.get_lock():
            self.value.value += n


def _tmp_name(part: ShardPart) -> Path:
    # the host is in the name: nodes sharing the parts folder must never take each other's jobs for dead ones
    return part.dir.parent / f".{part.dir.name}.tmp-{socket.gethostname()}-{os.getpid()}"


def _prepare_part(part: ShardPart, tokenizer_path: str, workers: int, batch_bytes: int, by_source: bool,
                  records: FineTuningRecords | None, progress) -> None:  # fmt: skip
    """Prepare one shard into its part folder, atomically."""
    tmp = _tmp_name(part)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        tok = Tokenizer(tokenizer_path)
        write_prepared([part.file], tok, tokenizer_path, tmp, part.fingerprint, by_source=by_source,
                       workers=workers, batch_bytes=batch_bytes, progress=progress, records=records)  # fmt: skip
        if part.dir.exists():  # a stale part (its file changed), or one another job finished meanwhile
            if part.done():
                return
            shutil.rmtree(part.dir)
        os.replace(tmp, part.dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _job_main(part, tokenizer_path, workers, batch_bytes, by_source, records, counter, parent: int) -> None:
    die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # Ctrl-C reaches the whole group; the parent reports it
    try:
        _prepare_part(part, tokenizer_path, workers, batch_bytes, by_source, records, _SharedCounter(counter))
    except BaseException as e:  # the parent names the shard; this line says why
        log.error(f"error: {part.file}: {type(e).__name__}: {e}")
        raise SystemExit(1) from None


def _remove_stale_tmp(root: Path) -> None:
    """Temporary folders of this host's jobs that were killed (their process is gone)."""
    prefix = f".tmp-{socket.gethostname()}-"
    for tmp in root.glob(".*.tmp-*"):
        head, sep, pid = tmp.name.rpartition("-")
        if sep and (head + "-").endswith(prefix) and pid.isdigit() and not alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def run_parts(
    parts: list[ShardPart],
    tokenizer_path: str,
    *,
    workers: int,
    batch_bytes: int,
    by_source: bool,
    records: FineTuningRecords | None,
    show_progress: bool,
) -> None:
    """Prepare the parts not yet done, ``workers`` processes in all (0: one after another, in this process)."""
    if not parts:
        return
    root = parts[0].dir.parent
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(root)
    todo = [p for p in parts if not p.done()]
    done_before = len(parts) - len(todo)
    if done_before and show_progress:
        log.info(f"{done_before} of {len(parts)} shards already prepared in {root}; preparing the other {len(todo)}")
    if not todo:
        return
    compressed = {p.index: os.path.getsize(p.file) for p in todo}
    bar = tqdm(total=None, unit="B", unit_scale=True, desc="tokenising", disable=not show_progress, smoothing=0.05)
    bar.set_postfix_str(f"0/{len(todo)} shards, {sum(compressed.values()) / 1e9:.2f} GB compressed")
    try:
        if workers <= 0:
            for n, p in enumerate(todo):
                _prepare_part(p, tokenizer_path, 0, batch_bytes, by_source, records, bar)
                bar.set_postfix_str(f"{n + 1}/{len(todo)} shards")
            return
        _schedule(todo, tokenizer_path, workers, batch_bytes, by_source, records, bar, compressed)
    finally:
        bar.close()


def _schedule(todo, tokenizer_path, workers, batch_bytes, by_source, records, bar, compressed) -> None:
    concurrent = min(workers, len(todo))
    # tokeniser processes per job: a job alone on several cores tokenises with a pool (its process reads and
    # writes); one core per job tokenises inline
    per_job = workers // concurrent
    job_workers = per_job if per_job >= 2 else 0
    ctx = mp.get_context("fork")
    pending = list(todo)
    running: dict[int, tuple[mp.Process, ShardPart, object]] = {}  # sentinel -> (process, part, counter)
    finished: list[ShardPart] = []
    text_done = 0  # text bytes of finished jobs
    try:
        while pending or running:
            while pending and len(running) < concurrent:
                part = pending.pop(0)
                counter = ctx.Value("q", 0)
                proc = ctx.Process(
                    target=_job_main,
                    args=(part, tokenizer_path, job_workers, batch_bytes, by_source, records, counter, os.getpid()),
                    name=f"prepare-{Path(part.file).name}",
                )
                proc.start()
                running[proc.sentinel] = (proc, part, counter)
            ready = mp.connection.wait(list(running), timeout=0.5)
            for sentinel in ready:
                proc, part, counter = running.pop(sentinel)
                proc.join()
                if proc.exitcode != 0 or not part.done():
                    raise DataError(f"preparing {part.file} failed (exit code {proc.exitcode}); the shards done are "
                                    "kept: run the same command again to continue")  # fmt: skip
                text_done += counter.value
                finished.append(part)
            live = sum(c.value for _, _, c in running.values())
            bar.update(text_done + live - bar.n)
            if finished:  # expected text, from the compression ratio of the shards done so far
                ratio = text_done / sum(compressed[p.index] for p in finished)
                bar.total = int(ratio * sum(compressed.values()))
            bar.set_postfix_str(f"{len(finished)}/{len(todo)} shards, {len(running)} running")
    finally:
        for proc, _, _ in running.values():  # an error or Ctrl-C: stop the other jobs; their parts stay unwritten
            proc.kill()
            proc.join()


# ---------------------------------------------------------------------------------------------------- merge


def merge(parts: list[ShardPart], out_tmp: Path, fp: dict, records: FineTuningRecords | None,
          show_progress: bool) -> dict:  # fmt: skip
    """Concatenate the parts (all done, in file order) into ``out_tmp``; returns the manifest written there."""
    manifests = [p.manifest() for p in parts]
    first = manifests[0]
    names = sorted({name for m in manifests for name in m["sources"]})
    if not names:
        stats = _sum_stats(m["read_stats"] for m in manifests)
        raise DataError(f"no documents in {[p.file for p in parts]} (read stats: {stats})")
    total = sum(p.dir.joinpath(m["sources"][n]["dir"], "tokens.bin").stat().st_size
                for p, m in zip(parts, manifests, strict=True) for n in m["sources"])  # fmt: skip
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="merging", disable=not show_progress)
    sources = {}
    try:
        for name in names:
            sources[name] = _merge_source(name, parts, manifests, out_tmp / source_dirname(name), records, bar)
    finally:
        bar.close()
    counts = sum(np.load(p.dir / "token_counts.npy") for p in parts)
    np.save(out_tmp / "token_counts.npy", counts)
    if records is not None:
        np.save(out_tmp / "target_counts.npy", sum(np.load(p.dir / "target_counts.npy") for p in parts))
    manifest = {
        "kind": first["kind"],
        "fingerprint": fp,
        "dtype": first["dtype"],
        "vocab_size": first["vocab_size"],
        "eos_id": first["eos_id"],
        "sources": sources,
        "read_stats": _sum_stats(m["read_stats"] for m in manifests),
    }
    (out_tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def _merge_source(name, parts, manifests, d: Path, records, bar) -> dict:
    d.mkdir()
    having = [(p, m["sources"][name]) for p, m in zip(parts, manifests, strict=True) if name in m["sources"]]
    documents = sum(s["documents"] for _, s in having)
    # offsets written into a .npy memmap: the Pile's ~200M documents need no array of that size in memory
    offsets = np.lib.format.open_memmap(d / "doc_offsets.npy", mode="w+", dtype=np.int64, shape=(documents + 1,))
    offsets[0] = 0
    base, row = 0, 1
    streams = ["tokens.bin"] + (["loss_mask.bin"] if records is not None else [])
    with ExitStack() as opened:
        outs = {s: opened.enter_context(open(d / s, "wb")) for s in streams}
        for part, s in having:
            src = part.dir / s["dir"]
            for stream, fh in outs.items():
                with open(src / stream, "rb") as inp:
                    while block := inp.read(64 << 20):
                        fh.write(block)
                        if stream == "tokens.bin":
                            bar.update(len(block))
            own = np.load(src / "doc_offsets.npy")
            offsets[row : row + len(own) - 1] = own[1:] + base
            row += len(own) - 1
            base += s["tokens"]
    offsets.flush()
    del offsets
    return {"dir": source_dirname(name), "tokens": base, "documents": documents}


def _sum_stats(stats) -> dict:
    total: dict[str, int] = {}
    for s in stats:
        for k, v in s.items():
            total[k] = total.get(k, 0) + v
    return total
