"""Build a W&B report comparing the losses of one study (one W&B group):
``python scripts/wandb_report.py --entity ME --project losslab --group cpu-study [--summary .../summary.md]``.

The report holds, for the study's runs grouped by loss (``loss/tag``: the loss with its parameters; seeds of
one loss are averaged, their min..max shaded): training ``ce`` against tokens for every loss, the held-out loss
at each evaluation, held-out perplexity by token-frequency bucket, held-out loss per domain (``eval_domain/``),
the downstream scores and a run comparer (config and summary of every run, differences only). With
``--summary`` the tables of ``scripts/compare_runs.py`` (differences against CE with 95% intervals and their
verdicts) are added as markdown: W&B's panels show spreads over seeds, not those intervals.

Needs the optional ``wandb-workspaces`` package (``pip install 'losslab[wandb-report]'``) and a reachable W&B
with an API key (``wandb login``). ``--dry-run`` builds the report and prints an outline of it (panels,
metrics, run filter) without saving it (no network). See docs/wandb.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import _bootstrap  # noqa: F401  (this checkout first on sys.path)

from losslab.log import fail

BUCKET_PPL = ["eval_bucket/high_ppl", "eval_bucket/medium_ppl", "eval_bucket/low_ppl", "eval_bucket/ppl"]
DOMAIN_SUMMARY = ["eval_domain/overall", "eval_domain/average", "eval_domain/worst"]
GROUP_BY = "loss/tag"  # a flat config column every run of a study has (trainer/callbacks.py wandb_config)


def build_report(entity: str, project: str, group: str, *, title: str, tasks: list[str], summary: str = "") -> Any:
    """The report object (wandb_workspaces.reports.v2.Report), not saved."""
    import wandb_workspaces.reports.v2 as wr

    runset = wr.Runset(
        entity=entity,
        project=project,
        name=group,
        filters=f"Metric('Group') == '{group}'",
        groupby=[f"config.{GROUP_BY}"],
    )
    seeds = {"groupby_aggfunc": "mean", "groupby_rangefunc": "minmax"}  # the mean over seeds, min..max shaded
    panels = [
        wr.LinePlot(
            title="Training CE (nats/token) vs tokens; mean over seeds, band: min..max",
            x="train/tokens",
            y=["train/ce"],
            smoothing_type="gaussian",
            smoothing_factor=0.05,
            **seeds,
        ),
        wr.LinePlot(title="Held-out loss at each evaluation", y=["eval_bucket/loss"], **seeds),
        wr.BarPlot(
            title="Held-out perplexity by token frequency (mean, band: min..max over seeds)",
            metrics=BUCKET_PPL,
            orientation="v",
            **seeds,
        ),
        wr.LinePlot(title="Held-out loss per domain", metric_regex="eval_domain/.*/loss", **seeds),
        wr.BarPlot(
            title="Held-out loss over domains: overall, average, worst",
            metrics=DOMAIN_SUMMARY,
            orientation="v",
            **seeds,
        ),
    ]
    if tasks:
        panels.append(wr.BarPlot(title="Downstream (final checkpoint)", metrics=[f"eval/{t}" for t in tasks],
                                 orientation="v", **seeds))  # fmt: skip
    panels.append(wr.RunComparer(diff_only="split"))
    blocks: list[Any] = [
        wr.H1(title),
        wr.P(
            f"Runs of W&B group `{group}`, grouped by `{GROUP_BY}` (the loss and its parameters); lines and bars "
            "are the mean over seeds with their min..max. For differences against CE with 95% intervals "
            "(paired bootstrap over documents, seeds on top) see scripts/compare_runs.py's summary."
        ),
        wr.PanelGrid(runsets=[runset], panels=panels),
    ]
    if summary:
        blocks += [wr.H2("Differences against CE (scripts/compare_runs.py)"), wr.MarkdownBlock(summary)]
    return wr.Report(project=project, entity=entity, title=title, description=f"losslab study {group}",
                     blocks=blocks)  # fmt: skip


def outline(report: Any) -> dict[str, Any]:
    """What the report holds, from its objects (W&B's own serialisation looks the project up online)."""
    blocks = []
    for block in report.blocks:
        item: dict[str, Any] = {"block": type(block).__name__}
        if hasattr(block, "runsets"):
            item["runsets"] = [{"entity": r.entity, "project": r.project, "filters": r.filters, "groupby": r.groupby}
                               for r in block.runsets]  # fmt: skip
            item["panels"] = [
                {"panel": type(p).__name__, "title": getattr(p, "title", None),
                 "metrics": list(getattr(p, "y", None) or getattr(p, "metrics", None) or []),
                 "metric_regex": getattr(p, "metric_regex", None), "x": getattr(p, "x", None)}
                for p in block.panels
            ]  # fmt: skip
        elif hasattr(block, "text"):
            item["text"] = str(block.text)[:200]
        blocks.append(item)
    return {"title": report.title, "entity": report.entity, "project": report.project, "blocks": blocks}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entity", required=True, help="W&B entity (user or team) that owns the project")
    parser.add_argument("--project", default="losslab", help="W&B project (wandb.project of the runs)")
    parser.add_argument("--group", required=True, help="W&B group of the study's runs (wandb.group)")
    parser.add_argument("--title", default="", help="report title (default: 'losslab: GROUP')")
    parser.add_argument("--tasks", nargs="*", default=[], help="downstream metrics, e.g. piqa_local/acc")
    parser.add_argument("--summary", default="", help="scripts/compare_runs.py's summary.md, added as markdown")
    parser.add_argument("--dry-run", action="store_true", help="print the report's outline, do not save")
    args = parser.parse_args(argv)
    for name in ("entity", "project", "group"):
        value = getattr(args, name)
        if not value.strip() or "'" in value:
            return fail(f"--{name}={value!r} is not a W&B {name} name")
    summary = ""
    if args.summary:
        if not Path(args.summary).is_file():
            return fail(f"--summary {args.summary}: no such file")
        summary = Path(args.summary).read_text()
    try:
        import wandb_workspaces.reports.v2  # noqa: F401  (optional: only this script needs it)
    except ImportError:
        return fail(
            "scripts/wandb_report.py needs the wandb-workspaces package: "
            "pip install 'losslab[wandb-report]' (or pip install wandb-workspaces)"
        )
    report = build_report(args.entity, args.project, args.group, title=args.title or f"losslab: {args.group}",
                          tasks=list(args.tasks), summary=summary)  # fmt: skip
    if args.dry_run:
        print(json.dumps(outline(report), default=str, indent=1))
        return 0
    try:
        report.save()
    except Exception as e:  # no network, no API key, no such entity: the service's own words, on one line
        first = (str(e).strip().splitlines() or [""])[0][:300]
        return fail(
            f"could not save the report to W&B ({type(e).__name__}: {first}); check the network, "
            "`wandb login` and --entity/--project"
        )
    print(report.url)
    return 0


if __name__ == "__main__":
    sys.exit(main())
