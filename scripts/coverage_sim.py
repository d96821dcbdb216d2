"""The coverage of the comparison intervals by simulation (``evals/compare/coverage.py``), written into
``docs/statistics.md`` between its coverage markers:
``python scripts/coverage_sim.py [--studies 2000] [--boot 1000] [--out docs/statistics.md]``.
About 20 minutes on one core at the defaults; ``--studies 200`` for a quick look (prints only, with ``--print``)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import _bootstrap  # noqa: F401  (this checkout first on sys.path)

from evals.compare.coverage import CASES, Coverage, coverage
from evals.compare.stats import METHODS
from losslab.log import fail, get_logger

log = get_logger(__name__)

BEGIN, END = "<!-- coverage table: scripts/coverage_sim.py -->", "<!-- end of coverage table -->"


def table(results: list[Coverage], studies: int, boot: int, command: str) -> str:
    lines = [
        f"Simulated studies per case: {studies}, bootstrap replicates per interval: {boot}; ± is the Monte-Carlo error "
        f"(95%) of the coverage. Command: `{command}`.",
        "",
        "| case | documents | n_eff | seeds | `seeds_t` (default) | half-width | `two_level` (percentile) "
        "| half-width |",
        "|---|---|---|---|---|---|---|---|",
    ]
    cases = list(dict.fromkeys(r.case for r in results))
    for case in cases:
        by = {r.method: r for r in results if r.case == case}
        t, p = by["seeds_t"], by["two_level"]
        lines.append(f"| {case.name} | {case.docs} | {t.mean_n_eff:.1f} | {case.seeds} | {t.covered:.3f} ± "
                     f"{t.error:.3f} | {t.mean_half_width:.4f} | {p.covered:.3f} ± {p.error:.3f} | "
                     f"{p.mean_half_width:.4f} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=2000, help="simulated studies per case")
    parser.add_argument("--boot", type=int, default=1000, help="bootstrap replicates per interval")
    parser.add_argument("--out", default="docs/statistics.md", help="the file whose coverage table is replaced")
    parser.add_argument("--print", action="store_true", help="print the table only, write nothing")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.studies < 10 or args.boot < 50:
        return fail("--studies must be >= 10 and --boot >= 50")
    out = Path(args.out)
    if not args.print and (not out.is_file() or BEGIN not in out.read_text() or END not in out.read_text()):
        return fail(f"{out} has no coverage table markers ({BEGIN} ... {END})")
    results = []
    start = time.perf_counter()
    for i, case in enumerate(CASES):
        for name, method in METHODS.items():
            r = coverage(case, method, studies=args.studies, n_boot=args.boot, seed=args.seed, name=name)
            results.append(r)
            log.info(f"[{i + 1}/{len(CASES)}] {case.name:55s} {name:10s} {r.covered:.3f} ± {r.error:.3f} "
                     f"({time.perf_counter() - start:.0f} s)")  # fmt: skip
    flags = [f"--studies {args.studies}" if args.studies != 2000 else "", f"--boot {args.boot}" if args.boot != 1000
             else "", f"--seed {args.seed}" if args.seed else ""]  # fmt: skip
    command = " ".join(["python scripts/coverage_sim.py", *(f for f in flags if f)])
    text = table(results, args.studies, args.boot, command)
    if args.print:
        print(text)
        return 0
    doc = out.read_text()
    head, rest = doc.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    out.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")
    print(f"wrote the coverage table into {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
