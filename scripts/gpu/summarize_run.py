"""One line of throughput figures from a run directory's metrics.jsonl, for docs/benchmarks.md:
``python scripts/gpu/summarize_run.py RUN_DIR [--skip 0.25]``. Logging steps in the first ``skip`` fraction
(compilation, warm-up, the first CPU optimizer steps) are left out of the medians; memory is the peak."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def summarize(run_dir: Path, skip: float = 0.25) -> dict[str, float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    rows = [r for r in rows if "tokens_per_s" in r]
    if not rows:
        raise ValueError(f"{run_dir}/metrics.jsonl holds no training rows")
    kept = rows[int(len(rows) * skip) :] or rows[-1:]
    out = {"steps": rows[-1]["step"], "logged_rows_used": len(kept),
           "tokens_per_s": statistics.median(r["tokens_per_s"] for r in kept),
           "final_loss": rows[-1]["loss"]}  # fmt: skip
    for key, name in (("perf/mfu", "mfu"), ("perf/tflops_per_device", "tflops_per_device")):
        if key in kept[0]:
            out[name] = statistics.median(r[key] for r in kept)
    for key, name in (("perf/gpu_peak_gib", "gpu_peak_gib"), ("perf/host_peak_gib", "host_peak_gib")):
        if key in rows[-1]:
            out[name] = max(r.get(key, 0.0) for r in rows)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--skip", type=float, default=0.25)
    args = parser.parse_args(argv)
    print(json.dumps({"run": str(args.run_dir), **summarize(args.run_dir, args.skip)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
