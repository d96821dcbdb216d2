"""What is compared: the metrics of a study, each run's number on them, and each contrast (group A minus group B)
with its interval and verdict. No plotting here.

The **primary metric** is declared, not chosen after looking: the held-out ``ce`` (token cross-entropy, nats per
token, every loss compared on it) over the stratified held-out set (``evals/heldout.py``), token-weighted. Every
other metric is **secondary**: the held-out loss on each frequency bucket and each domain, and each downstream
score; their p-values are Holm-adjusted over the family of every secondary test in the report (``holm``), and
their verdicts use the adjusted values.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from evals.compare.runs import Run
from evals.compare.stats import METHODS, Estimate, Paired, Verdict, holm, seeds_only, verdict

BUCKETS = ("high", "medium", "low")
SCORES = ("acc", "acc_norm", "exact_match")
PRIMARY = "heldout/ce"
# Number of answer choices of stock lm-eval multiple-choice tasks (chance = 1 / choices). ARC has a few
# questions with 3 or 5 choices; 4 is the norm. Generative tasks (LAMBADA, TriviaQA, NQ) have no chance level.
STOCK_CHOICES = {"piqa": 2, "hellaswag": 4, "winogrande": 2, "arc_easy": 4, "arc_challenge": 4, "openbookqa": 4,
                 "social_iqa": 3, "boolq": 2, "sciq": 4, "mmlu": 4, "copa": 2,
                 "shakespeare_cloze": 4}  # fmt: skip  # the last: the demo's task (scripts/build_default_corpus.py)

# A paper's reported effect where one is known, in the study's units (nats/token: the log of a perplexity ratio).
# MiLe (Su et al., arXiv 2310.19531), 6.7B parameters on the Pile, perplexity by frequency bucket (80/15/5% of
# occurrences): CE 13.541 / 15.517, MiLe (gamma 1) 13.459 / 15.371 on the medium / low buckets.
PAPER_EFFECTS: dict[str, dict[str, tuple[float, str]]] = {
    "mile": {
        "heldout/medium": (math.log(13.459 / 13.541), "MiLe paper, 6.7B: medium-bucket ppl 13.459 vs CE 13.541"),
        "heldout/low": (math.log(15.371 / 15.517), "MiLe paper, 6.7B: low-bucket ppl 15.371 vs CE 15.517"),
    },
}


@dataclass(frozen=True)
class Metric:
    key: str
    """``heldout/ce``, ``heldout/<bucket>``, ``domain/<name>``, ``eval/<task>/<metric>``."""
    name: str
    unit: str
    """``nats/token`` or ``score``."""
    lower_is_better: bool = True

    @property
    def primary(self) -> bool:
        return self.key == PRIMARY


@dataclass
class Contrast:
    a: str
    b: str
    """Group labels: the difference is A - B."""
    metric: Metric
    est: Estimate
    requested: bool = False
    """Asked for with ``--contrast`` (the others: each group against the baseline)."""
    p_holm: float = math.nan
    p_tost_holm: float = math.nan
    verdict: Verdict | None = None
    margin: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.a} − {self.b}"


def metrics_of(groups: dict[str, list[Run]], scores: list[str]) -> list[Metric]:
    """The study's metrics, the primary first: those any run has."""
    runs = [r for rs in groups.values() for r in rs]
    out = []
    if any("eval_bucket/loss" in r.eval for r in runs):
        out.append(Metric(PRIMARY, "held-out ce", "nats/token"))
    for b in BUCKETS:
        if any(f"eval_bucket/{b}_loss" in r.eval for r in runs):
            out.append(Metric(f"heldout/{b}", f"held-out ce, {b}-frequency tokens", "nats/token"))
    for d in domains_of(runs):
        out.append(Metric(f"domain/{d}", f"held-out ce, domain {d}", "nats/token"))
    out.extend(Metric(k, k.removeprefix("eval/"), "score", lower_is_better=False) for k in scores)
    return out


def domains_of(runs: list[Run]) -> list[str]:
    names = set()
    for r in runs:
        if r.stratified:
            names |= set(r.held_out["domain"])
        else:
            names |= {k.removesuffix("/loss") for k in r.domains if k.endswith("/loss")}
    return sorted(names)


def _held_out_columns(metric: str) -> tuple[str, str, str | None] | None:
    """(numerator column, denominator column, domain or None) of the per-document held-out file."""
    if metric == PRIMARY:
        return "loss", "tokens", None
    if metric.startswith("heldout/"):
        b = metric.removeprefix("heldout/")
        return f"{b}_loss", f"{b}_tokens", None
    if metric.startswith("domain/"):
        return "loss", "tokens", metric.removeprefix("domain/")
    return None


def per_document(run: Run, metric: str) -> tuple[list[Any], np.ndarray, np.ndarray, list[str] | None] | None:
    """(document ids, per-document numerators, denominators, domains or None) of one run on one metric, where its
    evaluation saved them; None otherwise."""
    cols = _held_out_columns(metric)
    if cols is not None:
        h = run.held_out
        num, den, domain = cols
        if h is None or num not in h or (domain is not None and not run.stratified):
            return None
        ids = h["sha"] if run.stratified else h["doc_id"]
        keep = [i for i in range(len(ids)) if domain is None or h["domain"][i] == domain]
        domains = [h["domain"][i] for i in keep] if run.stratified else None
        return ([ids[i] for i in keep], np.array([h[num][i] for i in keep], dtype=np.float64),
                np.array([h[den][i] for i in keep], dtype=np.float64), domains)  # fmt: skip
    base, at, shots = metric.removeprefix("eval/").partition("@")
    task, _, name = base.rpartition("/")
    scores = run.samples.get(f"{task}{at}{shots}") or {}
    if name not in scores or "doc_id" not in scores:
        return None
    return scores["doc_id"], np.array(scores[name], dtype=np.float64), np.ones(len(scores[name])), None


def per_run(run: Run, metric: str) -> float:
    """A run's number on a metric (NaN where it has none)."""
    if metric == PRIMARY:
        return run.eval.get("eval_bucket/loss", math.nan)
    if metric.startswith("heldout/"):
        return run.eval.get(f"eval_bucket/{metric.removeprefix('heldout/')}_loss", math.nan)
    if metric.startswith("domain/"):
        got = per_document(run, metric)
        if got is not None and got[2].sum() > 0:
            return float(got[1].sum() / got[2].sum())
        return run.domains.get(f"{metric.removeprefix('domain/')}/loss", math.nan)
    return run.eval.get(metric, math.nan)


def estimate(a_runs: list[Run], b_runs: list[Run], metric: Metric, method: str = "seeds_t",
             cluster: bool = False) -> Estimate | None:  # fmt: skip
    """A - B on one metric: over documents and seeds where every run of both saved per-document values on the
    same documents (same tokens), from the per-run numbers and the seeds alone otherwise; None where a run has no
    number."""
    paired = [r.seed for r in a_runs] == [r.seed for r in b_runs]  # both sorted by seed
    docs = [per_document(r, metric.key) for r in a_runs + b_runs]
    if all(d is not None for d in docs):
        same_docs = len({json.dumps(list(d[0])) for d in docs}) == 1
        same_den = all(np.array_equal(d[2], docs[0][2]) for d in docs)
        if same_docs and same_den and docs[0][2].sum() > 0:
            data = Paired.of([d[1] for d in docs[: len(a_runs)]], [d[1] for d in docs[len(a_runs) :]], docs[0][2],
                             paired=paired, strata=docs[0][3])  # fmt: skip
            return METHODS[method](data, cluster=cluster)
    a = [per_run(r, metric.key) for r in a_runs]
    b = [per_run(r, metric.key) for r in b_runs]
    if any(not math.isfinite(v) for v in a + b):
        return None
    return seeds_only(a, b, paired=paired)


def contrasts(groups: dict[str, list[Run]], base: str | None, metrics: list[Metric], requested: list[tuple[str, str]],
              *, margin: float, score_margin: float, method: str = "seeds_t", cluster: bool = False,
              progress: Callable[[str], None] | None = None) -> list[Contrast]:  # fmt: skip
    """Every group against the baseline, then each requested pair, on every metric; secondary p-values
    Holm-adjusted over the report's whole secondary family; verdicts."""
    pairs = [(g, base, False) for g in groups if base is not None and g != base]
    pairs += [(a, b, True) for a, b in requested if (a, b) not in {(x, y) for x, y, _ in pairs}]
    out: list[Contrast] = []
    for a, b, asked in pairs:
        if progress is not None:
            progress(f"{a} − {b}")
        for metric in metrics:
            est = estimate(groups[a], groups[b], metric, method, cluster)
            if est is not None:
                m = margin if metric.unit == "nats/token" else score_margin
                out.append(Contrast(a, b, metric, est, asked, margin=m))
    secondary = [c for c in out if not c.metric.primary]
    for c, p, pt in zip(secondary, holm([c.est.p for c in secondary]),
                        holm([c.est.p_tost(c.margin) for c in secondary]), strict=True):  # fmt: skip
        c.p_holm, c.p_tost_holm = p, pt
    for c in out:
        adjusted = {} if c.metric.primary else {"p": c.p_holm, "p_tost": c.p_tost_holm}
        c.verdict = verdict(c.est, c.margin, lower_is_better=c.metric.lower_is_better, **adjusted)
    return out


def task_keys(groups: dict[str, list[Run]]) -> list[str]:
    """Scores of the tasks the runs were asked for (not the subtasks of a group such as MMLU's 57)."""
    from evals.task_sets import resolve_tasks

    runs = [r for rs in groups.values() for r in rs]
    wanted: set[str] = set()
    for r in runs:
        for t in resolve_tasks(r.eval_tasks, str(r.cfg.eval.task_dir or "")):
            wanted |= {t, t.removesuffix("_local")}
    keys = sorted({k for r in runs for k in r.eval if k.startswith("eval/")})
    out = []
    for k in keys:
        task, _, metric = k.removeprefix("eval/").rpartition("/")
        if metric.partition("@")[0] in SCORES and (not wanted or task in wanted):
            out.append(k)
    return out


def chance_level(task: str, runs: list[Run]) -> tuple[float, str] | None:
    """Chance accuracy of a multiple-choice task and where it comes from: the mean of 1/choices over the
    evaluated documents of a local task (its YAML and data in ``eval.task_dir``), else the stock benchmark's
    number of choices; None for generative tasks and tasks not known."""
    task_dir = next((str(r.cfg.eval.task_dir) for r in runs if r.cfg.eval.task_dir), "")
    local = Path(task_dir) / f"{task}.yaml" if task_dir else None
    if local is not None and local.is_file():
        try:
            spec = yaml.safe_load(local.read_text())
        except yaml.YAMLError:  # stock YAMLs carry !function tags; fall back to the table
            spec = None
        if isinstance(spec, dict) and spec.get("output_type") == "multiple_choice":
            choice = spec.get("doc_to_choice")
            limit = runs[0].eval_limit
            if isinstance(choice, list) and choice:
                return 1 / len(choice), f"{task}: {len(choice)} fixed choices"
            files = (spec.get("dataset_kwargs") or {}).get("data_files") or {}
            split = files.get(spec.get("test_split", "test")) if isinstance(files, dict) else None
            if isinstance(choice, str) and isinstance(split, str):
                data = Path(split) if Path(split).is_file() else Path(task_dir) / Path(split).name
                if data.is_file():
                    docs = [json.loads(line) for line in data.read_text().splitlines() if line.strip()]
                    docs = docs[:limit] if limit else docs
                    counts = [len(d[choice]) for d in docs if isinstance(d.get(choice), list) and d[choice]]
                    if counts:
                        n = f"the first {len(counts)}" if limit else f"all {len(counts)}"
                        return (statistics.fmean(1 / c for c in counts),
                                f"mean 1/choices over {n} documents of {task} ({data.name})")  # fmt: skip
    stock = task.removesuffix("_local")
    stock = "mmlu" if stock.startswith("mmlu") else stock
    if stock in STOCK_CHOICES:
        return 1 / STOCK_CHOICES[stock], f"{stock}: {STOCK_CHOICES[stock]} answer choices per question"
    return None
