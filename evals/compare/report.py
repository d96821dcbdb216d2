"""The report of a comparison: ``summary.md`` (the declared analysis, the held-out set, the primary verdicts, the
paper's effects beside ours, the secondary metrics with Holm-adjusted p-values, every run's numbers),
``summary.csv`` (every number, per run, per group and per contrast) and ``curves.csv``, with the figures of
``plots.py``. Paths in them are relative to the repository (or, outside it, to the report)."""

from __future__ import annotations

import csv
import math
import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data.files import git_commit
from evals.compare import metrics as M
from evals.compare.runs import (
    Run,
    SettingError,
    baseline,
    choose_setting,
    diverged,
    final,
    group_runs,
    mismatches,
    read_run,
)
from evals.compare.stats import ALPHA, N_BOOT
from losslab.log import get_logger

log = get_logger(__name__)

REPO = Path(__file__).resolve().parents[2]


class NotComparable(ValueError):
    """Runs trained on different token budgets, tokenizers, data or held-out sets (``mismatches``)."""


class ContrastError(ValueError):
    """A ``--contrast`` that does not name two groups."""


@dataclass
class Options:
    margin: float = 0.01
    """Equivalence margin of losses, nats/token (0.01: about 1% of perplexity)."""
    score_margin: float = 0.01
    """Equivalence margin of downstream scores (fractions: 0.01 is one point of accuracy)."""
    contrasts: list[tuple[str, str]] = field(default_factory=list)
    method: str = "seeds_t"
    cluster: bool = False
    force: bool = False
    command: str = ""
    eval_setting: str = ""
    """The evaluation setting (key, ``evals/results_store.py``) to read every run's final evaluation with."""


def rel(path: Path | str, out: Path) -> str:
    """``path`` relative to the repository when inside it, else to the report's folder: never absolute."""
    p = Path(path).resolve()
    try:
        return str(p.relative_to(REPO))
    except ValueError:
        return os.path.relpath(p, out.resolve())


def _num(x: float, digits: int = 4) -> str:
    if isinstance(x, float) and math.isnan(x):
        return "–"
    if isinstance(x, float) and math.isinf(x):
        return "+∞" if x > 0 else "−∞"
    return f"{x:+.{digits}f}"


def _p(p: float) -> str:
    return "–" if math.isnan(p) else ("< 0.001" if p < 0.001 else f"{p:.3f}")


def _interval(e: Any) -> str:
    return f"[{_num(e.lo)}, {_num(e.hi)}]"


def resolve_contrast(text: str, groups: dict[str, list[Run]]) -> tuple[str, str]:
    """``A:B`` -> two group labels: a label itself, else the one group whose loss tag or loss name it is."""
    if text.count(":") != 1:
        raise ContrastError(f"--contrast {text!r}: give two groups as A:B (e.g. mile:focal)")
    out = []
    for name in text.split(":"):
        if name in groups:
            out.append(name)
            continue
        hits = [g for g, rs in groups.items() if g.split(" ")[0] == name or rs[0].cfg.loss.name == name]
        if len(hits) != 1:
            raise ContrastError(f"--contrast {text!r}: {name!r} names {'no group' if not hits else 'several groups'}"
                             f" (groups: {', '.join(groups)})")  # fmt: skip
        out.append(hits[0])
    return out[0], out[1]


def coverage_notes(c: M.Contrast) -> list[str]:
    """Where this interval's coverage was not shown by the simulation (docs/statistics.md)."""
    e, notes = c.est, []
    if "no per-document data" in e.method:
        notes.append("no per-document data: the documents' share of the noise is not in the interval")
    elif not e.seed_spread_included:
        notes.append("one seed per group: the seeds' spread is not in the interval, which covers only where the "
                     "seeds matter little (docs/statistics.md)")  # fmt: skip
    elif min(e.seeds) < 3 and e.paired:
        notes.append("2 seeds: t with 1 degree of freedom, wide")
    if e.n_docs and e.n_eff < 30:
        notes.append(f"{e.n_eff:.0f} effective documents (< 30): simulated coverage holds for normal effects only")
    return notes


def compare(run_dirs: Sequence[Path], out: Path, options: Options, schema: Any = None) -> Path:
    """Read the runs, compare them, write the report into ``out``; returns ``summary.md``."""
    from evals.compare import plots

    runs = [read_run(Path(d), schema) for d in run_dirs]
    try:
        choose_setting(runs, options.eval_setting, options.force)
    except SettingError as e:
        raise NotComparable(str(e)) from None
    problems = mismatches(runs)
    if problems and not options.force:
        raise NotComparable("; ".join(problems))
    groups, settings = group_runs(runs)
    contrasts_asked = [resolve_contrast(t, groups) if isinstance(t, str) else t for t in options.contrasts]
    out.mkdir(parents=True, exist_ok=True)
    base = baseline(groups)
    scores = M.task_keys(groups)
    metrics = M.metrics_of(groups, scores)
    log.info(f"comparing {len(runs)} runs in {len(groups)} groups on {len(metrics)} metrics")
    found = M.contrasts(groups, base, metrics, contrasts_asked, margin=options.margin,
                        score_margin=options.score_margin, method=options.method, cluster=options.cluster,
                        progress=lambda s: log.info(f"  {s}"))  # fmt: skip
    labels = setting_labels(runs)
    for c in found:
        c.notes = coverage_notes(c)
        mixed = sorted({labels[r.eval_setting] for g in (c.a, c.b) for r in groups[g]})
        if len(labels) > 1 and not c.metric.key.startswith(("train", "inloop")) and len(mixed) > 1:
            c.notes.append(f"evaluation settings {' vs '.join(mixed)} mixed")
    notes = {}
    for label, rs in groups.items():
        why = [f"seed {r.seed}: {w}" for r in rs if (w := diverged(r))]
        if why:
            notes[label] = f"{len(why)} of {len(rs)} runs: " + "; ".join(why)
    tasks = list(dict.fromkeys(k.removeprefix("eval/").rpartition("/")[0] for k in scores))
    chance = {t: c for t in tasks if (c := M.chance_level(t.partition("@")[0], runs))}
    figures = []
    if plots.plot_curves(groups, base, notes, out, series="train", file="training_curves.png"):
        figures.append("training_curves.png")
    if plots.plot_curves(groups, base, notes, out, series="heldout", file="heldout_curves.png"):
        figures.append("heldout_curves.png")
    if plots.plot_differences(found, groups, out):
        figures.append("differences.png")
    if plots.plot_bucket_change(found, groups, out):
        figures.append("bucket_change.png")
    if plots.plot_downstream(groups, scores, chance, out):
        figures.append("downstream.png")
    if plots.plot_downstream_curves(groups, scores, chance, out):
        figures.append("downstream_curves.png")
    md = markdown(groups, settings, base, metrics, found, notes, chance, problems, figures, options, out)
    at = md.index("## Held-out set")
    md[at:at] = _setting_section(runs, labels)
    (out / "summary.md").write_text("\n".join(md) + "\n")
    rows = records(groups, metrics, found, chance, out)
    keys = {rel(r.dir, out): r.eval_setting for r in runs}
    for row in rows:  # every run's evaluated number with the evaluation setting it came from
        evaluated = row["kind"] == "run" and not str(row["metric"]).startswith(("train/", "inloop/"))
        row["eval_setting"] = keys.get(row["run"], "") if evaluated else ""
    _write_csv(out / "summary.csv", rows)
    _write_csv(out / "curves.csv", curve_rows(groups, out))
    return out / "summary.md"


def setting_labels(runs: list[Run]) -> dict[str, str]:
    """Evaluation setting key -> a short label (``S1``, ``S2``, ...) in the order the runs use them."""
    return {k: f"S{i + 1}" for i, k in enumerate(dict.fromkeys(r.eval_setting for r in runs))}


def _setting_section(runs: list[Run], labels: dict[str, str]) -> list[str]:
    """Which evaluation every run's downstream and held-out numbers come from."""
    md = ["## Evaluation setting", ""]
    described = {r.eval_setting: r.evals[r.eval_setting].settings.describe() for r in runs if r.eval_setting}
    if len(labels) == 1:
        key = next(iter(labels))
        md.append(f"Every run's downstream and held-out numbers come from the evaluation `{key}` of its final "
                  f"checkpoint ({described[key]})." if key else "No run holds an evaluation of its final "
                  "checkpoint: downstream numbers, if any, are the in-loop ones of metrics.jsonl.")  # fmt: skip
    else:
        md.append("**Forced comparison of mixed evaluation settings** (`--force`): each run's downstream and "
                  "held-out numbers come from another evaluation; the runs' columns and every contrast that mixes "
                  "them are labelled with the setting:")  # fmt: skip
        md.extend(f"- {labels[k]}: `{k or 'none'}` ({described.get(k, 'no evaluation')}): "
                  + ", ".join(r.name for r in runs if r.eval_setting == k) for k in labels)  # fmt: skip
    return [*md, ""]


def _held_out_section(groups: dict[str, list[Run]]) -> list[str]:
    runs = [r for rs in groups.values() for r in rs]
    sets = {r.held_out["set"]["identity"]: r.held_out["set"] for r in runs if r.stratified}
    old = [r.name for r in runs if r.held_out is not None and not r.stratified]
    md = ["", "## Held-out set", ""]
    if len(sets) == 1:
        s = next(iter(sets.values()))
        spec = s.get("spec", {})
        per = ", ".join(f"{d} {v['documents']} ({v['tokens']} tokens)" for d, v in s["domains"].items())
        md.append(f"{s['n_documents']} documents in {len(s['domains'])} domains, {s['tokens']} tokens, "
                  f"**{s['n_eff']:.1f} effective documents** (Kish, token-weighted); the same set for every run "
                  f"(identity `{s['identity']}`). Sampled by `evals/heldout.py`: seed {spec.get('seed')}, at least "
                  f"{spec.get('tokens_per_domain')} tokens a domain, {spec.get('tokens')} in all shared equally, no "
                  f"document over 1/8 of its domain's quota. Per domain: {per}.")  # fmt: skip
        if s.get("missing"):
            md.append(f"\n**No held-out document for {', '.join(s['missing'])}**: no held-out number covers "
                      f"{'it' if len(s['missing']) == 1 else 'them'}.")  # fmt: skip
    if old:
        md.append(f"Runs {', '.join(old)} predate the stratified held-out set: their held-out documents were read "
                  "from the held-out files in order up to the token budget, which need not cover every domain; "
                  "their per-domain losses come from the in-loop evaluation, and those intervals from the seeds "
                  "alone.")  # fmt: skip
    if not sets and not old:
        md.append("No per-document held-out data: held-out intervals come from the seeds alone.")
    return md


def markdown(groups: dict[str, list[Run]], settings: dict[str, str], base: str | None, metrics: list[M.Metric],
             found: list[M.Contrast], notes: dict[str, str], chance: dict[str, Any], problems: list[str],
             figures: list[str], options: Options, out: Path) -> list[str]:  # fmt: skip
    n_runs = sum(len(r) for r in groups.values())
    secondary = [c for c in found if not c.metric.primary]
    md = ["# Loss comparison", ""]
    md.append(f"{n_runs} runs in {len(groups)} groups (runs that differ only by seed): "
              + "; ".join(f"`{g}` seeds {', '.join(str(r.seed) for r in rs)}" for g, rs in groups.items())
              + (f". Baseline: `{base}`." if base else "."))  # fmt: skip
    if any(settings.values()):
        md.append("Groups that differ in more than the loss: " + "; ".join(f"`{g}`: {s}" for g, s in settings.items()
                                                                           if s) + ".")  # fmt: skip
    md.extend(["", "**Declared analysis** (`docs/statistics.md` explains every word). Primary metric: held-out "
               "`ce` (token cross-entropy, nats/token) over the held-out set, token-weighted; every loss is "
               f"compared on it. Equivalence margin: ±{options.margin:g} nats/token (±{options.score_margin:g} "
               f"for downstream scores). Verdicts: *better* / *worse* when the difference is significant at "
               f"{ALPHA:g} (two-sided), *equivalent within ±m* when the 90% interval lies inside the margin (TOST), "
               "*inconclusive* otherwise — never \"no difference\". Every other metric is secondary: its p-values "
               f"are Holm-adjusted over the {len(secondary)} secondary tests of this report and its verdict uses "
               f"the adjusted value. Intervals: 95%, {_method_words(options)}; MDE: the smallest true difference "
               "this comparison finds significant with 80% power (about 1.43 x the half-width)."])  # fmt: skip
    md.extend(_held_out_section(groups))
    if notes:
        md.extend(["", "## Diverged runs", ""] + [f"- `{g}`: {why}" for g, why in notes.items()])
        md.append("Their numbers stay in every table (they are what the loss did); their plots have their own panel.")
    primary = [c for c in found if c.metric.primary]
    if primary:
        md.extend(["", "## Primary: held-out ce", "",
                   "| contrast | seeds | Δ (nats/token) | 95% interval | p | verdict | MDE (80% power) | notes |",
                   "|---|---|---|---|---|---|---|---|"])  # fmt: skip
        for c in primary:
            e = c.est
            ask = " (requested)" if c.requested else ""
            md.append(
                f"| {c.label}{ask} | {e.seeds[0]} vs {e.seeds[1]}{' paired' if e.paired else ''} | "
                f"{_num(e.diff)} | {_interval(e)} | {_p(e.p)} | **{c.verdict.word}** | "
                f"{e.mde():.4f} | {'; '.join(c.notes + ([c.verdict.note] if c.verdict.note else []))} |"
            )
        md.append(f"\nInterval per row: {'; '.join(dict.fromkeys(c.est.method for c in primary))}.")
    paper = paper_rows(found, groups)
    if paper:
        md.extend(["", "## The paper's effects beside ours", "",
                   "The effect a paper reports, in the same units (nats/token: the log of its perplexity ratio), "
                   "next to this study's difference and the power this study had to find the paper's effect "
                   "significant (two-sided, 5%). A paper's effect at another scale need not hold at this one.", "",
                   "| contrast | metric | paper's Δ | this study's Δ [95%] | power to see the paper's Δ | source "
                   "| notes |",
                   "|---|---|---|---|---|---|---|", *paper])  # fmt: skip
    if secondary:
        md.extend(["", f"## Secondary metrics (Holm-adjusted over {len(secondary)} tests)", "",
                   "| contrast | metric | Δ | 95% interval | p | p (Holm) | verdict | MDE | notes |",
                   "|---|---|---|---|---|---|---|---|---|"])  # fmt: skip
        for c in secondary:
            e = c.est
            md.append(f"| {c.label} | {c.metric.name} | {_num(e.diff)} | {_interval(e)} | {_p(e.p)} | "
                      f"{_p(c.p_holm)} | {c.verdict.word} | {e.mde():.4f} | "
                      f"{'; '.join(c.notes + ([c.verdict.note] if c.verdict.note else []))} |")  # fmt: skip
        md.append("\nLosses in nats/token (below 0: lower loss, better; for a bucket exp(Δ) − 1 is the relative change "
                  "of its perplexity); scores as fractions (above 0: better).")  # fmt: skip
    md.extend(run_tables(groups, metrics, chance))
    if problems:
        md.extend(["", f"**Forced comparison of mismatched runs** (`--force`): {'; '.join(problems)}."])
    md.extend(["", "## Reproduce", ""])
    shas = sorted({r.info.get("git_sha", "unknown") or "unknown" for rs in groups.values() for r in rs})
    short = [s[:10] + ("-dirty" if s.endswith("-dirty") else "") for s in shas]  # -dirty: uncommitted changes
    md.append(f"Runs trained at commit(s) {', '.join(f'`{s}`' for s in short)}; report made at commit "
              f"`{git_commit(10)}` by `{options.command or 'scripts/compare_runs.py'}`.")  # fmt: skip
    md.append("Runs: " + ", ".join(f"`{rel(r.dir, out)}`" for rs in groups.values() for r in rs) + ".")
    md.extend(["", "Every number is in `summary.csv` (per run, per group, per contrast); curves in `curves.csv`. "
               "Figures: " + ", ".join(f"[{f}]({f})" for f in figures) + "."])  # fmt: skip
    return md


def _method_words(options: Options) -> str:
    if options.method == "two_level":
        return f"two-level percentile bootstrap of seeds and documents ({N_BOOT} replicates)"
    domains = "whole domains, then documents within them" if options.cluster else "documents within each domain"
    return (
        f"seeds through Student's t (paired by seed), the held-out set through a bootstrap of {domains} "
        f"({N_BOOT} replicates), combined without counting the seed x document interaction twice"
    )


def paper_rows(found: list[M.Contrast], groups: dict[str, list[Run]]) -> list[str]:
    rows = []
    for c in found:
        known = M.PAPER_EFFECTS.get(groups[c.a][0].cfg.loss.name, {})
        if c.metric.key in known and groups[c.b][0].cfg.loss.name == "ce":
            effect, source = known[c.metric.key]
            rows.append(f"| {c.label} | {c.metric.name} | {effect:+.4f} | {_num(c.est.diff)} {_interval(c.est)} | "
                        f"{c.est.power(effect):.2f} | {source} | {'; '.join(c.notes)} |")  # fmt: skip
    return rows


def run_tables(groups: dict[str, list[Run]], metrics: list[M.Metric], chance: dict[str, Any]) -> list[str]:
    """Every run's number on every metric (transposed: a row per metric, a column per run)."""
    runs = [(g, r) for g, rs in groups.items() for r in rs]
    labels = setting_labels([r for _, r in runs])
    mark = (lambda r: f" [{labels[r.eval_setting]}]") if len(labels) > 1 else (lambda r: "")
    head = "| metric | " + " | ".join(f"{g} s{r.seed}{mark(r)}" for g, r in runs) + " |"
    md = ["", "## Every run's numbers", "", head, "|---" * (len(runs) + 1) + "|"]
    rows = [("tokens", lambda r: f"{final(r.tokens):.0f}"),
            ("training ce, last logged", lambda r: f"{final(r.ce):.4f}"),
            ("training loss, last logged (its own scale)", lambda r: f"{final(r.loss):.4f}")]  # fmt: skip
    for m in metrics:
        rows.append((m.name, lambda r, k=m.key: _cell(M.per_run(r, k))))
    for name, get in rows:
        md.append(f"| {name} | " + " | ".join(get(r) for _, r in runs) + " |")
    if chance:
        md.append("\nChance: " + "; ".join(f"`{t}` {v:.4f} ({src})" for t, (v, src) in chance.items()) + ".")
    return md


def _cell(x: float) -> str:
    return "–" if not math.isfinite(x) else f"{x:.4f}"


def records(groups: dict[str, list[Run]], metrics: list[M.Metric], found: list[M.Contrast], chance: dict[str, Any],
            out: Path) -> list[dict[str, Any]]:  # fmt: skip
    """One row per number: every run's value of every metric, every group's mean and sd over seeds, every
    contrast with its interval, tests and verdict, chance levels."""
    rows: list[dict[str, Any]] = []

    def row(kind: str, **kw: Any) -> None:
        rows.append({"kind": kind, "group": "", "contrast": "", "seed": "", "run": "", "metric": "", "value": "",
                     "sd": "", "n": "", **kw})  # fmt: skip

    for label, runs in groups.items():
        names: dict[str, Any] = {"train/final_ce": lambda r: final(r.ce), "train/final_loss": lambda r: final(r.loss),
                                 "train/tokens": lambda r: final(r.tokens)}  # fmt: skip
        names.update({m.key: (lambda r, k=m.key: M.per_run(r, k)) for m in metrics})
        extra = sorted({k for r in runs for k in r.eval} - {"eval_bucket/loss"})
        names.update({k: (lambda r, k=k: r.eval.get(k, math.nan)) for k in extra})
        names.update({f"inloop/{k}": (lambda r, k=k: r.domains.get(k, math.nan))
                      for k in sorted({k for r in runs for k in r.domains})})  # fmt: skip
        for key, get in names.items():
            values = [get(r) for r in runs]
            for r, v in zip(runs, values, strict=True):
                row("run", group=label, seed=r.seed, run=rel(r.dir, out), metric=key, value=v)
            finite = [v for v in values if isinstance(v, float) and math.isfinite(v)]
            if finite:
                row("mean", group=label, metric=key, value=statistics.fmean(finite),
                    sd=statistics.stdev(finite) if len(finite) > 1 else math.nan, n=len(finite))  # fmt: skip
    for c in found:
        e = c.est
        row("diff", group=c.a, contrast=c.label, metric=c.metric.key, value=e.diff, n=f"{e.seeds[0]}+{e.seeds[1]}",
            **{"lo": e.lo, "hi": e.hi, "lo90": e.lo90, "hi90": e.hi90, "se": e.se, "df": e.df, "p": e.p,
               "p_holm": c.p_holm, "p_tost": e.p_tost(c.margin), "p_tost_holm": c.p_tost_holm, "margin": c.margin,
               "verdict": c.verdict.word, "mde80": e.mde(), "primary": c.metric.primary, "requested": c.requested,
               "method": e.method, "n_docs": e.n_docs, "n_eff": e.n_eff,
               "note": "; ".join(c.notes + ([c.verdict.note] if c.verdict.note else []))})  # fmt: skip
    for task, (level, source) in chance.items():
        row("chance", metric=f"eval/{task}", value=level, note=source)
    columns = list(dict.fromkeys(k for r in rows for k in r))
    return [{k: r.get(k, "") for k in columns} for r in rows]


def curve_rows(groups: dict[str, list[Run]], out: Path) -> list[dict[str, Any]]:
    rows = []
    for label, runs in groups.items():
        for r in runs:
            for step, tokens, ce, loss in zip(r.steps, r.tokens, r.ce, r.loss, strict=True):
                rows.append({"group": label, "seed": r.seed, "run": rel(r.dir, out), "series": "train", "step": step,
                             "tokens": tokens, "metric": "ce", "value": ce})  # fmt: skip
                rows.append({"group": label, "seed": r.seed, "run": rel(r.dir, out), "series": "train", "step": step,
                             "tokens": tokens, "metric": "loss", "value": loss})  # fmt: skip
            for key, pts in r.eval_curves.items():
                for tokens, value in pts:
                    rows.append({"group": label, "seed": r.seed, "run": rel(r.dir, out), "series": "downstream",
                                 "step": "", "tokens": tokens, "metric": key, "value": value})  # fmt: skip
            for key, pts in r.domain_curves.items():
                for tokens, value in pts:
                    rows.append(
                        {
                            "group": label,
                            "seed": r.seed,
                            "run": rel(r.dir, out),
                            "series": "heldout",
                            "step": "",
                            "tokens": tokens,
                            "metric": f"eval_domain/{key}",
                            "value": value,
                        }
                    )
    return rows


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as fh:
        if rows:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
