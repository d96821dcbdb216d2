"""Compare runs from their run directories alone (no W&B needed):
``python scripts/compare_runs.py runs/ce-s0 runs/ce-s1 runs/mile-s0 runs/mile-s1 --out docs/results/x``.

Runs whose configs differ only by seed (and bookkeeping) form a group; seeds are its repeats; every group is
compared with the CE baseline (and any ``--contrast A:B``) on the declared primary metric, held-out ``ce`` over
the run's held-out set, and on every secondary metric (frequency buckets, domains, downstream scores; Holm-
adjusted), with 95% intervals over seeds and held-out documents and the verdict words of ``docs/statistics.md``.
Writes ``summary.md``, ``summary.csv`` (every number), ``curves.csv`` and the figures into ``--out``
(``evals/compare/``). Runs trained on different token budgets, tokenizers, data or held-out sets are refused
(exit 2) unless ``--force``. Every run's final evaluation is read with one setting (``evals/results_store.py``):
the one common to all runs (several: training's, or ``--eval-setting KEY``); none common is refused (exit 2,
one line listing each run's settings) unless ``--force``, which labels every number with its run's setting.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import _bootstrap  # noqa: F401  (this checkout first on sys.path)

from losslab.log import fail


def _schema():
    """Today's config schema with its defaults: a run saved before a key existed ran with that key's default."""
    from omegaconf import OmegaConf

    from trainer.config import RunConfig

    return OmegaConf.create(OmegaConf.to_container(OmegaConf.structured(RunConfig)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run directories")
    parser.add_argument("--out", required=True)
    parser.add_argument("--margin", type=float, default=0.01, help="equivalence margin of losses, nats/token")
    parser.add_argument("--score-margin", type=float, default=0.01,
                        help="equivalence margin of downstream scores (0.01: one point of accuracy)")  # fmt: skip
    parser.add_argument(
        "--contrast",
        action="append",
        default=[],
        metavar="A:B",
        help="also compare group A with group B (labels, loss tags or loss names; repeatable)",
    )
    parser.add_argument("--method", choices=("seeds_t", "two_level"), default="seeds_t",
                        help="interval: seeds through t + document bootstrap (default), or the two-level "
                        "percentile bootstrap (undercovers with 3 seeds: docs/statistics.md)")  # fmt: skip
    parser.add_argument(
        "--cluster-domains",
        action="store_true",
        help="resample whole domains, then documents within them (domains as a sample of domains)",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="compare runs with different token budgets, tokenizers, data, held-out sets or evaluation settings "
        "anyway (every number labelled with its evaluation setting)",
    )
    parser.add_argument("--eval-setting", default="", metavar="KEY",
                        help="read every run's final evaluation with this setting (a folder name under "
                        "CKPT/evals/) when several are common to all runs")  # fmt: skip
    args = parser.parse_args(argv)
    missing = [
        r for r in args.runs if not (Path(r) / "metrics.jsonl").is_file() or not (Path(r) / "config.yaml").is_file()
    ]
    if missing:
        return fail(f"not run directories (no metrics.jsonl / config.yaml): {missing}")
    if args.margin < 0 or args.score_margin < 0:
        return fail("--margin and --score-margin must be >= 0")
    from evals.compare.report import ContrastError, NotComparable, Options, compare, rel

    given = argv if argv is not None else sys.argv[1:]  # paths in the recorded command: relative, never absolute
    out = Path(args.out)
    command = "python scripts/compare_runs.py " + " ".join(
        shlex.quote(rel(a, out) if Path(a).exists() or a == args.out else a) for a in given
    )
    options = Options(margin=args.margin, score_margin=args.score_margin, contrasts=args.contrast,
                      method=args.method, cluster=args.cluster_domains, force=args.force, command=command,
                      eval_setting=args.eval_setting)  # fmt: skip
    try:
        summary = compare([Path(r) for r in args.runs], Path(args.out), options, schema=_schema())
    except NotComparable as e:
        return fail(f"runs not comparable: {e} (pass --force to compare them anyway)")
    except ContrastError as e:
        return fail(e)
    print(summary.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
