"""The coverage of the comparison intervals by simulation (``evals/compare/coverage.py``), written into
``docs/statistics.md`` between its coverage markers:
``python scripts/coverage_sim.py [--studies 2000] [--boot 1000] [--out docs/statistics.md]``.
About 20 minutes on one core at the defaults; ``--studies 200`` for a quick look (prints only, with ``--print``).
``--distinct``: the distinct-n intervals of ``scripts/generation_table.py`` instead (``evals/compare/
coverage_distinct.py``; ``--studies`` for the jackknife, ``--boot-studies`` for the percentile bootstrap it
replaced, at 200 replicates; and ``seeds_jackknife``, the loss-level interval of 3 paired seeds, at half
``--studies``), between the distinct-n markers; about 15 minutes at the defaults. ``--scores``: ``seeds_t`` for a
mean over prompts of a ROUGE-like score (``evals/compare/coverage_scores.py``), between the score markers; about
4 minutes at the defaults."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import _bootstrap  # noqa: F401  (this checkout first on sys.path)

from evals.compare.coverage import CASES, Coverage, coverage
from evals.compare.coverage_distinct import (
    DISTINCT_CASES,
    SEEDED_CASES,
    DistinctCoverage,
    distinct_coverage,
    seeded_coverage,
)
from evals.compare.coverage_scores import SCORE_CASES, ScoreCoverage, score_coverage, truth
from evals.compare.stats import METHODS, seeds_t
from losslab.log import fail, get_logger

log = get_logger(__name__)

BEGIN, END = "<!-- coverage table: scripts/coverage_sim.py -->", "<!-- end of coverage table -->"
DISTINCT_BEGIN = "<!-- distinct-n coverage table: scripts/coverage_sim.py --distinct -->"
DISTINCT_END = "<!-- end of distinct-n coverage table -->"
SCORES_BEGIN = "<!-- score coverage table: scripts/coverage_sim.py --scores -->"
SCORES_END = "<!-- end of score coverage table -->"
DISTINCT_BOOT = 200
"""Replicates of the distinct-n bootstrap (the interval replaced): each costs a distinct-n count per model, and
its failure (every replicate below the value) is far beyond what more replicates would change."""


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


def distinct_table(results: list[DistinctCoverage], command: str) -> str:
    """One row per case: each method's coverage of one model's distinct-n and of the paired difference."""
    cols = [(m, t) for m in ("jackknife", "bootstrap") for t in ("one model", "difference")]
    cols.append(("seeds_jackknife", "difference"))
    lines = [
        "Coverage ± its Monte-Carlo error (95%), the mean half-width in parentheses, the simulated studies in "
        f"brackets (the bootstrap at {DISTINCT_BOOT} replicates). "
        f"Command: `{command}`.",
        "",
        "| case | prompts x seeds | " + " | ".join(f"{m}: {t}" for m, t in cols) + " |",
        "|---|---|" + "---|" * len(cols),
    ]
    for case in dict.fromkeys(r.case for r in results):
        by = {(r.method, r.target): r for r in results if r.case == case}
        cells = [f"{by[k].covered:.3f} ± {by[k].error:.3f} ({by[k].mean_half_width:.4f}) [{by[k].studies}]"
                 if k in by else "—" for k in cols]  # fmt: skip
        lines.append(f"| {case.name} | {case.prompts} x {case.seeds} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def scores_table(results: list[ScoreCoverage], studies: int, boot: int, command: str) -> str:
    lines = [
        f"Simulated studies per case: {studies}, bootstrap replicates per interval: {boot}; ± is the Monte-Carlo error "
        f"(95%) of the coverage. Command: `{command}`.",
        "",
        "| case | prompts x seeds | B's prompts at zero | true difference | `seeds_t` 95% | 90% (TOST) | half-width "
        "| widening to hold 95% | widening to hold 90% |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        c = r.case
        lines.append(f"| {c.name} | {c.prompts} x {c.seeds} | {r.zero_share:.2f} | {truth(c):+.4f} | "
                     f"{r.covered:.3f} ± {r.error(r.covered):.3f} | {r.covered90:.3f} ± {r.error(r.covered90):.3f} | "
                     f"{r.mean_half_width:.4f} | {r.widen95:.2f} | {r.widen90:.2f} |")  # fmt: skip
    return "\n".join(lines)


def scores_main(args: argparse.Namespace, out: Path) -> int:
    results: list[ScoreCoverage] = []
    start = time.perf_counter()
    for i, case in enumerate(SCORE_CASES):
        results.append(score_coverage(case, seeds_t, studies=args.studies, n_boot=args.boot, seed=args.seed))
        log.info(f"[{i + 1}/{len(SCORE_CASES)}] {case.name:55s} {results[-1].covered:.3f} "
                 f"({time.perf_counter() - start:.0f} s)")  # fmt: skip
    text = scores_table(results, args.studies, args.boot, command(args, "--scores"))
    return publish(text, None if args.print else out, SCORES_BEGIN, SCORES_END)


def command(args: argparse.Namespace, table_flag: str = "") -> str:
    """The command that wrote a table: its flag (``--distinct``, ``--scores``) and the options that differ from their
    defaults (``--distinct`` uses ``--boot-studies``, the others ``--boot``)."""
    if table_flag == "--distinct":
        boot = f"--boot-studies {args.boot_studies}" if args.boot_studies != 200 else ""
    else:
        boot = f"--boot {args.boot}" if args.boot != 1000 else ""
    flags = [table_flag, f"--studies {args.studies}" if args.studies != 2000 else "", boot,
             f"--seed {args.seed}" if args.seed else ""]  # fmt: skip
    return " ".join(["python scripts/coverage_sim.py", *(f for f in flags if f)])


def publish(text: str, out: Path | None, begin: str, end: str) -> int:
    """Print the table (``out`` None), or write it into ``out`` between its markers."""
    if out is None:
        print(text)
        return 0
    head, rest = out.read_text().split(begin, 1)
    _, tail = rest.split(end, 1)
    out.write_text(f"{head}{begin}\n{text}\n{end}{tail}")
    print(f"wrote the table into {out} ({begin})")
    return 0


def distinct_main(args: argparse.Namespace, out: Path) -> int:
    results: list[DistinctCoverage] = []
    start = time.perf_counter()
    for i, case in enumerate(DISTINCT_CASES):
        results += distinct_coverage(case, studies=args.studies, seed=args.seed)
        boot = distinct_coverage(case, studies=args.boot_studies, n_boot=DISTINCT_BOOT, seed=args.seed + 1)
        results += [r for r in boot if r.method == "bootstrap"]
        log.info(f"[{i + 1}/{len(DISTINCT_CASES)}] {case.name} ({time.perf_counter() - start:.0f} s)")
    for i, case in enumerate(SEEDED_CASES):
        results.append(seeded_coverage(case, studies=max(10, args.studies // 2), seed=args.seed))
        log.info(f"[{i + 1}/{len(SEEDED_CASES)}] {case.name} ({time.perf_counter() - start:.0f} s)")
    text = distinct_table(results, command(args, "--distinct"))
    return publish(text, None if args.print else out, DISTINCT_BEGIN, DISTINCT_END)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=2000, help="simulated studies per case")
    parser.add_argument("--boot", type=int, default=1000, help="bootstrap replicates per interval")
    parser.add_argument("--out", default="docs/statistics.md", help="the file whose coverage table is replaced")
    parser.add_argument("--print", action="store_true", help="print the table only, write nothing")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--distinct", action="store_true", help="the distinct-n intervals' coverage instead")
    parser.add_argument("--boot-studies", type=int, default=200, help="--distinct: studies for the bootstrap")
    parser.add_argument("--scores", action="store_true", help="seeds_t's coverage for a ROUGE-like score instead")
    args = parser.parse_args(argv)
    if args.studies < 10 or args.boot < 50:
        return fail("--studies must be >= 10 and --boot >= 50")
    out = Path(args.out)
    if args.distinct and args.scores:
        return fail("--distinct and --scores: one table at a time")
    begin, end = (DISTINCT_BEGIN, DISTINCT_END) if args.distinct else (SCORES_BEGIN, SCORES_END) if args.scores else (
        BEGIN, END)  # fmt: skip
    if not args.print and (not out.is_file() or begin not in out.read_text() or end not in out.read_text()):
        return fail(f"{out} has no coverage table markers ({begin} ... {end})")
    if args.distinct:
        return distinct_main(args, out)
    if args.scores:
        return scores_main(args, out)
    results = []
    start = time.perf_counter()
    for i, case in enumerate(CASES):
        for name, method in METHODS.items():
            r = coverage(case, method, studies=args.studies, n_boot=args.boot, seed=args.seed, name=name)
            results.append(r)
            log.info(f"[{i + 1}/{len(CASES)}] {case.name:55s} {name:10s} {r.covered:.3f} ± {r.error:.3f} "
                     f"({time.perf_counter() - start:.0f} s)")  # fmt: skip
    return publish(table(results, args.studies, args.boot, command(args)), None if args.print else out, BEGIN, END)


if __name__ == "__main__":
    sys.exit(main())
