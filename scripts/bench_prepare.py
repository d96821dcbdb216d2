"""Throughput of ``scripts/prepare_data.py`` per core and on all cores, and the time it projects for a corpus the
size of the Pile:

    python scripts/bench_prepare.py --files 'corpus/default/train_*.jsonl.zst' --tokenizer tok32k.model

Each setting prepares the files ``--repeats`` times into a temporary folder (shard jobs, merge and all). Wall
time depends on what else the machine runs; CPU time (this process and its shard jobs, from ``getrusage``)
much less, so the per-core rate is text bytes per CPU-second, and the projection for N cores is
``--project-bytes / (per-core rate x min(N, --project-shards))``: shard jobs share nothing but the disk, and a
corpus of S shards keeps at most S jobs busy (beyond that each job tokenises with several processes, whose
scaling is not measured here).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import _bootstrap  # noqa: F401  (this checkout first on sys.path)

from data.prepare import prepare
from data.shards import ReadStats, iter_documents, resolve_files


def cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", nargs="+", required=True)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--project-bytes", type=float, default=685e9,
                        help="text bytes to project for (default: the public Pile mirror, ~638 GiB)")  # fmt: skip
    parser.add_argument("--project-shards", type=int, default=30, help="shards of that corpus")
    parser.add_argument("--cores", default="16,32,64,128", help="core counts to project for")
    args = parser.parse_args(argv)
    files = resolve_files(args.files)
    text = sum(len(d.text.encode()) for f in files for d in iter_documents(f, ReadStats()))
    cores = os.cpu_count() or 1
    print(f"# {len(files)} files, {text / 1e6:.2f} MB of text, tokenizer {args.tokenizer}, {cores} cores, "
          f"load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    tmp = Path(tempfile.mkdtemp(prefix="bench_prepare_"))
    per_core: list[float] = []
    try:
        for workers in sorted({1, cores}):
            walls, cpus = [], []
            for r in range(args.repeats):
                wall, cpu = time.perf_counter(), cpu_seconds()
                manifest = prepare(files, args.tokenizer, tmp / f"w{workers}-{r}", by_source=True, workers=workers,
                                   show_progress=False)  # fmt: skip
                walls.append(time.perf_counter() - wall)
                cpus.append(cpu_seconds() - cpu)
                shutil.rmtree(tmp / f"w{workers}-{r}")
            tokens = sum(s["tokens"] for s in manifest["sources"].values())
            wall, cpu = statistics.median(walls), statistics.median(cpus)
            per_core.append(text / cpu)
            print(f"{workers} worker(s): median of {args.repeats}: {wall:.2f} s wall = {text / wall / 1e6:.2f} MB/s; "
                  f"{cpu:.2f} CPU-s = {text / cpu / 1e6:.2f} MB per CPU-second; {tokens} tokens "
                  f"({text / tokens:.2f} bytes/token)")  # fmt: skip
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rate = min(per_core)  # the slower of the two: jobs on all cores pay for the merge and for sharing the machine
    print(f"projection for {args.project_bytes / 1e9:.0f} GB of text in {args.project_shards} shards at "
          f"{rate / 1e6:.2f} MB per core-second:")  # fmt: skip
    for n in (int(c) for c in args.cores.split(",")):
        busy = min(n, args.project_shards)
        print(f"  {n:4d} cores: {hours(args.project_bytes / (rate * busy))} ({busy} shard jobs at once)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
