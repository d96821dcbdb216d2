"""Compare runs from their run directories alone (no W&B needed):
``python scripts/compare_runs.py runs/ce-s0 runs/ce-s1 runs/mile-s0 runs/mile-s1 --out docs/results/x``.

Runs whose configs differ only by seed (and by bookkeeping: run directory, W&B, checkpointing, layout) form a
group; seeds are its repeats. Every loss is compared on the same number, the token cross-entropy ``ce`` (the
optimised ``loss`` of MiLe, focal or PDL is on its own scale and is only listed). Writes into ``--out``:

- ``ce_vs_tokens.png``: training ``ce`` against tokens, smoothed (a centred moving average, ``--smooth``), mean
  over seeds with the seeds' min..max as a band; its difference to the CE baseline; the held-out loss at each
  evaluation where runs logged one;
- ``bucket_ppl.png``: held-out perplexity by token-frequency bucket on a log axis, and its relative change
  against the CE baseline (paired by seed where the baseline has the same seeds);
- ``downstream.png``: lm-eval scores with error bars (the larger of lm-eval's standard error and the spread
  over seeds) and each task's chance level;
- ``differences.png``: every difference against the CE baseline with its 95% interval (``evals/stats.py``):
  held-out loss overall and per frequency bucket and downstream scores paired over documents (bootstrap) with
  the seeds' spread on top; per-domain held-out loss from the seeds' spread alone (no per-document data);
- ``summary.md`` (the tables, a verdict per difference: better / worse / no difference at this power, and the
  interval's half-width: the smallest difference it could detect), ``summary.csv`` (every number in them, per
  run and per group, full precision, with ``lo``/``hi``/``verdict`` for the differences) and ``curves.csv``.

Runs trained on different token budgets (final tokens), tokenizers (``run_info.json`` ``tokenizer_sha256``) or
data (``run_info.json`` ``data_files``, ``data.val_files``) are refused (exit 2) unless ``--force``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import _bootstrap  # noqa: F401  (this checkout first on sys.path)
import matplotlib

from losslab.log import fail

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import yaml
from omegaconf import OmegaConf

from evals.stats import Interval, difference, seed_interval
from evals.task_sets import resolve_tasks
from trainer.callbacks import loss_tag

BUCKETS = ("high", "medium", "low")
# Beside each evaluated checkpoint (the names of evals/runner.py, not imported: it loads DeepSpeed)
HELD_OUT_FILE, SAMPLES_FILE = "eval_held_out.json", "eval_samples.json"
SCORES = ("acc", "acc_norm", "exact_match")
# Config keys that do not change what a run computes: runs differing only here (and by seed) are repeats.
BOOKKEEPING_PREFIXES = ("run.", "wandb.", "checkpoint.", "debug.", "distributed.", "eval.")
BOOKKEEPING_KEYS = {"train.seed", "train.resume", "train.log_every", "train.max_nonfinite_in_a_row",
                    "data.num_workers", "model.compile", "model.activation_checkpointing"}  # fmt: skip
# Number of answer choices of stock lm-eval multiple-choice tasks (chance = 1 / choices). ARC has a few
# questions with 3 or 5 choices; 4 is the norm. Generative tasks (LAMBADA, TriviaQA, NQ) have no chance level.
STOCK_CHOICES = {"piqa": 2, "hellaswag": 4, "winogrande": 2, "arc_easy": 4, "arc_challenge": 4, "openbookqa": 4,
                 "social_iqa": 3, "boolq": 2, "sciq": 4, "mmlu": 4, "copa": 2,
                 "shakespeare_cloze": 4}  # fmt: skip  # the last: the demo's task (scripts/build_default_corpus.py)


@dataclass
class Run:
    dir: Path
    cfg: Any
    seed: int
    steps: list[int]
    tokens: list[float]
    ce: list[float]
    loss: list[float]
    val: list[tuple[float, float]]
    """(tokens, held-out loss) at each evaluation with frequency buckets."""
    eval: dict[str, float]
    """The final evaluation: ``eval/TASK/METRIC`` and ``eval_bucket/...`` keys."""
    eval_tasks: list[str] = field(default_factory=list)
    eval_limit: int = 0
    info: dict[str, Any] = field(default_factory=dict)
    """run_info.json (tokenizer_sha256, data_files, ...); empty for runs that predate it."""
    held_out: dict[str, Any] | None = None
    """Per held-out document losses of the final evaluation (evals/runner.py HELD_OUT_FILE)."""
    samples: dict[str, Any] = field(default_factory=dict)
    """lm-eval's per-document scores of the final evaluation ({task[@kshot]: {metric: [...], "doc_id": [...]}})."""
    domains: dict[str, float] = field(default_factory=dict)
    """``eval_domain/<d>/loss`` (and overall/average/worst) at the last step that logged them."""


def _eval_results(run_dir: Path, last_step: int) -> tuple[dict[str, Any] | None, Path | None]:
    """The latest checkpoint's eval_results.json (also written by a later scripts/evaluate.py) and that
    checkpoint, if it evaluated the last step."""
    ckpts = sorted((run_dir / "checkpoints").glob("step_*"))
    if not ckpts or not (ckpts[-1] / "eval_results.json").is_file():
        return None, None
    results = json.loads((ckpts[-1] / "eval_results.json").read_text())
    return (results, ckpts[-1]) if results.get("step") == last_step else (None, None)


def _json(path: Path | None) -> Any:
    return json.loads(path.read_text()) if path is not None and path.is_file() else None


def _schema_defaults() -> Any:
    """Today's config schema with its defaults: a run saved before a key existed ran with that key's default
    (new keys default to the old behaviour), so old and new runs compare on equal terms."""
    from trainer.config import RunConfig

    return OmegaConf.create(OmegaConf.to_container(OmegaConf.structured(RunConfig)))


def read_run(run_dir: Path) -> Run:
    cfg = OmegaConf.merge(_schema_defaults(), OmegaConf.load(run_dir / "config.yaml"))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in rows if "loss" in r and "tokens" in r]
    # evaluations follow checkpoints, which need not fall on logging steps; tokens grow linearly with steps
    tokens_per_step = train[-1]["tokens"] / train[-1]["step"] if train else math.nan
    final_eval: dict[str, float] = {}
    val: list[tuple[float, float]] = []
    for r in rows:  # the last evaluation wins
        evals = {k: v for k, v in r.items() if k.startswith(("eval/", "eval_bucket/"))}
        if evals:
            final_eval = evals
            if "eval_bucket/loss" in evals:
                val.append((r["step"] * tokens_per_step, evals["eval_bucket/loss"]))
    last_step = train[-1]["step"] if train else 0
    results, ckpt = _eval_results(run_dir, last_step)
    domain_rows = [r for r in rows if any(k.startswith("eval_domain/") for k in r)]
    domains = {k.removeprefix("eval_domain/"): v for k, v in domain_rows[-1].items() if k.startswith("eval_domain/")
               and k.endswith(("/loss", "overall", "average", "worst"))} if domain_rows else {}  # fmt: skip
    held_out = _json(ckpt / HELD_OUT_FILE) if ckpt else None
    held_out = held_out if held_out and held_out.get("step") == last_step else None
    tasks, limit = list(cfg.eval.tasks), int(cfg.eval.limit)
    if results is not None:
        for key, value in results["metrics"].items():
            name = f"eval_bucket/{key.removeprefix('bucket/')}" if key.startswith("bucket/") else f"eval/{key}"
            final_eval[name] = value
        tasks, limit = list(results.get("tasks") or tasks), int(results.get("limit") or 0)
    return Run(
        dir=run_dir,
        cfg=cfg,
        seed=int(cfg.train.seed),
        steps=[r["step"] for r in train],
        tokens=[r["tokens"] for r in train],
        ce=[r.get("ce", math.nan) for r in train],
        loss=[r["loss"] for r in train],
        val=val,
        eval=final_eval,
        eval_tasks=tasks,
        eval_limit=limit,
        info=_json(run_dir / "run_info.json") or {},
        held_out=held_out,
        samples=(_json(ckpt / SAMPLES_FILE) or {}) if ckpt else {},
        domains=domains,
    )


def _flat(cfg: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            out[prefix.rstrip(".")] = json.dumps(node, sort_keys=True)

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return {k: v for k, v in out.items() if k not in BOOKKEEPING_KEYS and not k.startswith(BOOKKEEPING_PREFIXES)}


def group_runs(runs: list[Run]) -> tuple[dict[str, list[Run]], dict[str, str]]:
    """(label -> runs that differ only by seed, label -> the group's other differing settings). The label is
    the loss with its parameters, plus the settings that differ between groups when they are short (a letter
    otherwise, the settings then in the markdown); CE groups first (the baseline), then in the order given."""
    flats = [_flat(r.cfg) for r in runs]
    keyed: dict[tuple, list[int]] = {}
    for i, f in enumerate(flats):
        keyed.setdefault(tuple(sorted(f.items())), []).append(i)
    varying = sorted({k for f in flats for k in f if len({g.get(k) for g in flats}) > 1 and not k.startswith("loss.")})
    # loss settings that the tag does not show but that tell two groups apart (a plug-in's options, pdl's eps)
    tags = [loss_tag(runs[m[0]].cfg.loss) for m in keyed.values()]
    hidden: dict[str, list[str]] = {}
    for tag in {t for t in tags if tags.count(t) > 1}:
        same = [flats[m[0]] for m, t in zip(keyed.values(), tags, strict=True) if t == tag]
        loss_keys = {k for f in same for k in f if k.startswith("loss.")}
        hidden[tag] = sorted(k for k in loss_keys if len({g.get(k) for g in same}) > 1)
    groups: dict[str, list[Run]] = {}
    settings: dict[str, str] = {}
    for n, (members, tag) in enumerate(zip(keyed.values(), tags, strict=True)):
        keys = varying + hidden.get(tag, [])
        extra = [f"{k}={json.loads(flats[members[0]][k])}" for k in keys if k in flats[members[0]]]
        short = " ".join(e.split(".", 1)[-1] for e in extra)
        label = tag + (f" {short}" if 0 < len(short) <= 40 else f" [{chr(65 + n)}]" if extra else "")
        if label in groups:  # never merge or drop a group under another's name
            label = f"{label} [{chr(65 + n)}]"
        groups[label] = sorted((runs[i] for i in members), key=lambda r: r.seed)
        settings[label] = ", ".join(extra)
    # the baseline first: plain CE (no modifier) before CE with one, then the rest in the order given
    order = sorted(groups, key=lambda label: (groups[label][0].cfg.loss.name != "ce", not label.startswith("ce ")
                                              and label != "ce"))  # fmt: skip
    return {label: groups[label] for label in order}, settings


def baseline(groups: dict[str, list[Run]]) -> str | None:
    return next((label for label, runs in groups.items() if runs[0].cfg.loss.name == "ce"), None)


def smooth_curve(values: list[float], fraction: float) -> list[float]:
    """Centred moving average over ``fraction`` of the curve's points (a window that shrinks symmetrically at
    the ends). Centred, unlike TensorBoard's EMA, so a falling curve is not shifted up by the smoothing's lag."""
    half = int(fraction * len(values) / 2)
    out = []
    for i in range(len(values)):
        h = min(half, i, len(values) - 1 - i)
        out.append(statistics.fmean(values[i - h : i + h + 1]))
    return out


def mean_sd(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def fmt(mean: float, err: float | None = None, n: int = 1) -> str:
    if not math.isfinite(mean):
        return "–"
    digits = 4 if abs(mean) < 100 else 2  # perplexities of rare tokens run into the thousands
    return f"{mean:.{digits}f} ± {err:.{digits}f}" if err is not None and n > 1 else f"{mean:.{digits}f}"


def _aligned(runs: list[Run], attr: str) -> tuple[list[float], list[list[float]]]:
    """Tokens and each run's values at the logging steps all runs share."""
    common = sorted(set.intersection(*(set(r.steps) for r in runs)))
    index = [{s: i for i, s in enumerate(r.steps)} for r in runs]
    tokens = [runs[0].tokens[index[0][s]] for s in common]
    return tokens, [[getattr(r, attr)[ix[s]] for s in common] for r, ix in zip(runs, index, strict=True)]


def colors(groups: dict[str, list[Run]]) -> dict[str, Any]:
    cmap = plt.get_cmap("tab10")
    return {label: cmap(i % 10) for i, label in enumerate(groups)}


def plot_curves(groups: dict[str, list[Run]], smooth: float, base: str | None, out: Path) -> list[dict[str, Any]]:
    has_val = any(len(r.val) > 1 for runs in groups.values() for r in runs)  # a curve, not one final point
    has_diff = base is not None and len(groups) > 1
    panels = 1 + has_val + has_diff
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.8), squeeze=False)
    ax, rows = axes[0][0], []
    color = colors(groups)
    means: dict[str, tuple[list[float], list[float]]] = {}
    for label, runs in groups.items():
        tokens, per_run = _aligned(runs, "ce")
        smoothed = [smooth_curve(v, smooth) for v in per_run]
        mean_raw = [statistics.fmean(col) for col in zip(*per_run, strict=True)]
        mean = [statistics.fmean(col) for col in zip(*smoothed, strict=True)]
        ax.plot(tokens, mean_raw, color=color[label], alpha=0.25, linewidth=0.8)
        seeds = f"{len(runs)} seed{'s' * (len(runs) > 1)}"
        dashed = {"linestyle": "--", "zorder": 3} if label == base else {}  # visible where curves coincide
        ax.plot(tokens, mean, color=color[label], linewidth=1.8, label=f"{label} ({seeds})", **dashed)
        means[label] = (tokens, mean)
        if len(runs) > 1:
            lo = [min(col) for col in zip(*smoothed, strict=True)]
            hi = [max(col) for col in zip(*smoothed, strict=True)]
            ax.fill_between(tokens, lo, hi, color=color[label], alpha=0.2, linewidth=0)
        for run, raw, sm in zip(runs, per_run, smoothed, strict=True):
            for i, t in enumerate(tokens):
                rows.append({"group": label, "seed": run.seed, "run": str(run.dir), "tokens": t, "ce": raw[i],
                             "ce_smoothed": sm[i]})  # fmt: skip
    ax.set_xlabel("training tokens")
    ax.set_ylabel("training cross-entropy (nats/token)")
    ax.set_title(f"Training CE (smoothed over {smooth:.0%} of a run; faint: raw; band: seeds' min..max)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if has_diff:  # the curves of losses that train alike overlap; their difference is what a comparison needs
        dax = axes[0][1]
        base_at = dict(zip(*means[base], strict=True))
        for label, (tokens, mean) in means.items():
            if label == base:
                continue
            shared = [(t, m - base_at[t]) for t, m in zip(tokens, mean, strict=True) if t in base_at]
            dax.plot([t for t, _ in shared], [d for _, d in shared], color=color[label], linewidth=1.8, label=label)
        dax.axhline(0, color=color[base], linewidth=1.2, label=f"{base} (baseline)")
        dax.set_xlabel("training tokens")
        dax.set_ylabel(f"training CE minus {base}'s (nats/token)")
        dax.set_title("Difference to the CE baseline (smoothed means, no interval; below 0 = lower CE)", fontsize=10)
        dax.grid(alpha=0.3)
        dax.legend(fontsize=8)
    if has_val:
        vax = axes[0][-1]
        for label, runs in groups.items():
            points: dict[float, list[float]] = {}
            for r in runs:
                for t, v in r.val:
                    points.setdefault(t, []).append(v)
            if not points:
                continue
            ts = sorted(points)
            stats = [mean_sd(points[t]) for t in ts]
            dashed = {"linestyle": "--", "zorder": 3} if label == base else {}
            vax.errorbar(ts, [m for m, _ in stats], yerr=[s for _, s in stats], color=color[label], marker="o",
                         capsize=3, label=label, **dashed)  # fmt: skip
        vax.set_xlabel("training tokens")
        vax.set_ylabel("held-out cross-entropy (nats/token)")
        vax.set_title("Held-out loss at each evaluation (mean ± sd over seeds)", fontsize=10)
        vax.grid(alpha=0.3)
        vax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "ce_vs_tokens.png", dpi=120)
    plt.close(fig)
    return rows


def _eval_stats(runs: list[Run], key: str) -> tuple[float, float, float, int]:
    """(mean, sd over seeds, mean lm-eval stderr, n) of an eval key over a group's runs."""
    vals = [r.eval[key] for r in runs if key in r.eval]
    base, at, shots = key.partition("@")
    errs = [r.eval[f"{base}_stderr{at}{shots}"] for r in runs if f"{base}_stderr{at}{shots}" in r.eval]
    mean, sd = mean_sd(vals)
    return mean, sd, statistics.fmean(errs) if errs else math.nan, len(vals)


def plot_buckets(groups: dict[str, list[Run]], keys: list[str], base: str | None, out: Path) -> None:
    labels = [k.removeprefix("eval_bucket/").removesuffix("_ppl").replace("ppl", "all tokens") for k in keys]
    rel_groups = [g for g in groups if g != base] if base else []
    fig, axes = plt.subplots(1, 2 if rel_groups else 1, figsize=(13 if rel_groups else 7, 4.8), squeeze=False)
    ax, color = axes[0][0], colors(groups)
    width = 0.8 / len(groups)
    for i, (label, runs) in enumerate(groups.items()):
        stats = [_eval_stats(runs, k) for k in keys]
        xs = [j + (i - (len(groups) - 1) / 2) * width for j in range(len(keys))]
        spread = [s[1] for s in stats] if len(runs) > 1 else None  # one seed: no spread to draw
        ax.bar(xs, [s[0] for s in stats], width, yerr=spread, color=color[label], capsize=3,
               label=f"{label} (n={len(runs)})")  # fmt: skip
    ax.set_yscale("log")
    _plain_log_ticks(ax)
    ax.set_xticks(range(len(keys)), labels)
    ax.set_xlabel("target tokens by training frequency (top 80% / next 15% / last 5% of occurrences)")
    ax.set_ylabel("held-out perplexity (log scale)")
    ax.set_title("Held-out perplexity by token frequency (mean ± sd over seeds)", fontsize=10)
    ax.grid(axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(0.0, -0.18), ncol=2, frameon=False)
    if rel_groups:
        rax = axes[0][1]
        width = 0.8 / len(rel_groups)
        for i, label in enumerate(rel_groups):
            rel = [relative(groups[label], groups[base], k) for k in keys]
            xs = [j + (i - (len(rel_groups) - 1) / 2) * width for j in range(len(keys))]
            spread = [100 * r[1] for r in rel] if len(groups[label]) > 1 else None
            rax.bar(xs, [100 * r[0] for r in rel], width, yerr=spread, color=color[label], capsize=3,
                    label=label)  # fmt: skip
        rax.axhline(0, color="black", linewidth=0.8)
        rax.set_xticks(range(len(keys)), labels)
        rax.set_xlabel("target tokens by training frequency")
        rax.set_ylabel(f"perplexity change vs {base} (%)")
        rax.set_title(f"Relative to the CE baseline ({base}); below 0 = better\nerror bar: sd over seeds of the "
                      "per-seed ratios (95% intervals: differences.png)", fontsize=10)  # fmt: skip
        rax.grid(axis="y", alpha=0.3)
        rax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(0.0, -0.18), ncol=2, frameon=False)
    fig.tight_layout()
    fig.savefig(out / "bucket_ppl.png", dpi=120, bbox_inches="tight")
    plt.close(fig)


def _plain_log_ticks(ax: Any) -> None:
    """Numbers, not powers of ten, on a log axis; minor ticks labelled too when the data span under a decade."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    lo, hi = ax.get_ylim()
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain if hi / lo < 10 else NullFormatter())


def relative(runs: list[Run], base_runs: list[Run], key: str) -> tuple[float, float]:
    """Relative change of ``key`` against the baseline group: (change, sd). Paired by seed when the baseline
    has every seed of the group (same seed: same initialisation and data order, so the pair's ratio removes
    most of the seed-to-seed spread): the mean and sd over seeds of ``value / baseline value - 1``. Otherwise
    unpaired: ``mean / baseline mean - 1`` with a first-order sd from both groups' spreads."""
    base_by_seed = {r.seed: r.eval.get(key) for r in base_runs}
    pairs = [(r.eval.get(key), base_by_seed.get(r.seed)) for r in runs]
    if all(v is not None and b for v, b in pairs):
        return mean_sd([v / b - 1 for v, b in pairs])
    m, s, _, _ = _eval_stats(runs, key)
    bm, bs, _, _ = _eval_stats(base_runs, key)
    if not (math.isfinite(m) and math.isfinite(bm)) or bm == 0:
        return math.nan, math.nan
    ratio = m / bm
    return ratio - 1, ratio * math.hypot(s / m if m else 0.0, bs / bm)


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
                return 1 / len(choice), f"{local}: {len(choice)} fixed choices"
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
                        return statistics.fmean(1 / c for c in counts), f"mean 1/choices over {n} documents of {data}"
    stock = task.removesuffix("_local")
    stock = "mmlu" if stock.startswith("mmlu") else stock
    if stock in STOCK_CHOICES:
        return 1 / STOCK_CHOICES[stock], f"{stock}: {STOCK_CHOICES[stock]} answer choices per question"
    return None


def task_keys(groups: dict[str, list[Run]]) -> list[str]:
    """Scores of the tasks the runs were asked for (not the subtasks of a group such as MMLU's 57)."""
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


def plot_downstream(groups: dict[str, list[Run]], keys: list[str], chance: dict[str, Any], out: Path) -> None:
    labels = [k.removeprefix("eval/") for k in keys]
    fig, ax = plt.subplots(figsize=(max(7.0, 1.3 * len(keys) + 3), 4.8))
    color, width = colors(groups), 0.8 / len(groups)
    for i, (label, runs) in enumerate(groups.items()):
        stats = [_eval_stats(runs, k) for k in keys]
        errs = [max(s[1], s[2] if math.isfinite(s[2]) else 0.0) for s in stats]
        xs = [j + (i - (len(groups) - 1) / 2) * width for j in range(len(keys))]
        ax.bar(xs, [s[0] for s in stats], width, yerr=errs, color=color[label], capsize=3,
               label=f"{label} (n={len(runs)})")  # fmt: skip
    drawn = False
    for j, k in enumerate(keys):
        level = chance.get(k.removeprefix("eval/").rpartition("/")[0])
        if level is not None:
            ax.hlines(level[0], j - 0.45, j + 0.45, colors="black", linestyles="--", linewidth=1.2,
                      label=None if drawn else "chance")  # fmt: skip
            drawn = True
    ax.set_xticks(range(len(keys)), labels, rotation=20, ha="right")
    ax.set_ylabel("score")
    ax.set_ylim(0, 1)
    ax.set_title("Downstream (final checkpoint); error bar: max(lm-eval stderr, sd over seeds)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)  # beside, not on the bars
    fig.tight_layout()
    fig.savefig(out / "downstream.png", dpi=120, bbox_inches="tight")
    plt.close(fig)


def mismatches(runs: list[Run]) -> list[str]:
    """Why these runs cannot be compared on equal terms, one entry per property that differs (runs that predate
    run_info.json are not checked on what only it records)."""
    checks = {
        "final tokens": lambda r: f"{final(r.tokens):.0f}",
        "tokenizer (run_info.json tokenizer_sha256)": lambda r: (r.info.get("tokenizer_sha256") or "")[:12] or None,
        "training data (run_info.json data_files)": lambda r: (
            json.dumps(r.info["data_files"]) if "data_files" in r.info else None
        ),
        "held-out data (data.val_files)": lambda r: json.dumps(list(r.cfg.data.val_files)),
    }
    out = []
    for what, get in checks.items():
        seen: dict[str, list[str]] = {}
        for r in runs:
            if (value := get(r)) is not None:
                seen.setdefault(value, []).append(r.dir.name)
        if len(seen) > 1:
            short = all(len(v) <= 16 for v in seen)  # show values when short, else only which runs differ
            out.append(f"{what} differ: " + " vs ".join(
                f"{v + ': ' if short else ''}{', '.join(names)}" for v, names in seen.items()
            ))  # fmt: skip
    return out


@dataclass
class Difference:
    group: str
    key: str
    """The metric as in summary.csv (``eval_bucket/loss``, ``eval_domain/Plays/loss``, ``eval/task/acc``)."""
    name: str
    """The metric in words, for tables and figures."""
    unit: str
    interval: Interval


def _aligned_units(runs: list[Run], get: Any) -> tuple[list[Any], list[list[float]]] | None:
    """(doc ids, per-run values) when every run has per-document values on the same documents, else None."""
    got = [get(r) for r in runs]
    if any(g is None for g in got) or len({json.dumps(ids) for ids, _ in got}) != 1:
        return None
    return got[0][0], [values for _, values in got]


def _held_out(r: Run, column: str) -> tuple[list[Any], list[float]] | None:
    h = r.held_out
    return (h["doc_id"], h[column]) if h is not None and column in h else None


def _sample(r: Run, key: str) -> tuple[list[Any], list[float]] | None:
    base, at, shots = key.removeprefix("eval/").partition("@")
    task, _, metric = base.rpartition("/")
    scores = r.samples.get(f"{task}{at}{shots}") or {}
    return (scores["doc_id"], scores[metric]) if metric in scores and "doc_id" in scores else None


def _difference(label: str, runs: list[Run], base_runs: list[Run], key: str, name: str, unit: str, get: Any,
                den_of: Any, lower_is_better: bool) -> Difference | None:  # fmt: skip
    """One group's difference to the baseline on one metric: paired over documents when every run of both has
    per-document values (``get``) on the same documents, else from the per-run numbers and the seeds alone."""
    import numpy as np

    paired = [r.seed for r in runs] == [r.seed for r in base_runs]  # both sorted by seed
    units = _aligned_units(runs + base_runs, get) if get is not None else None
    if units is not None and den_of is not None and len({json.dumps(den_of(r)) for r in runs + base_runs}) > 1:
        units = None  # the same documents cut into other tokens (another tokenizer, under --force): not paired
    if units is not None:
        values = np.array(units[1], dtype=np.float64)  # [runs of both groups, documents]
        den = np.array(den_of(runs[0]), dtype=np.float64) if den_of is not None else None  # [documents]
        if den is not None and not den.sum():
            return None  # no token of this bucket among the held-out documents
        interval = difference(values[: len(runs)], values[len(runs) :], den, paired_seeds=paired,
                              lower_is_better=lower_is_better)  # fmt: skip
    else:
        a = [r.eval.get(key, r.domains.get(key.removeprefix("eval_domain/"))) for r in runs]
        b = [r.eval.get(key, r.domains.get(key.removeprefix("eval_domain/"))) for r in base_runs]
        if any(v is None or not math.isfinite(v) for v in a + b):
            return None
        interval = seed_interval(a, b, paired_seeds=paired, lower_is_better=lower_is_better)
    return Difference(label, key, name, unit, interval)


def differences(groups: dict[str, list[Run]], base: str, bucket_keys: list[str], scores: list[str]) -> list[Difference]:
    """Every group's difference to the baseline with its 95% interval (evals/stats.py): paired over documents
    with the seeds' spread on top where per-document data were saved, from the seeds alone otherwise."""
    held_out = [("eval_bucket/loss", "held-out loss", "loss", "tokens")]
    held_out += [(f"eval_bucket/{b}_loss", f"held-out loss, {b}-frequency tokens", f"{b}_loss", f"{b}_tokens")
                 for b in BUCKETS if f"eval_bucket/{b}_ppl" in bucket_keys]  # fmt: skip
    domains = sorted({k for rs in groups.values() for r in rs for k in r.domains})
    found: list[Difference | None] = []
    for label, runs in groups.items():
        if label == base:
            continue
        base_runs = groups[base]
        for key, name, num, den in held_out:
            if any(key in r.eval for r in runs):
                found.append(_difference(label, runs, base_runs, key, name, "nats/token",
                                         lambda r, num=num: _held_out(r, num), lambda r, den=den: r.held_out[den],
                                         True))  # fmt: skip
        for d in domains:
            name = f"domain {d.removesuffix('/loss')} loss" if d.endswith("/loss") else f"domains: {d} loss"
            found.append(_difference(label, runs, base_runs, f"eval_domain/{d}", name, "nats/token", None, None, True))
        for key in scores:
            found.append(_difference(label, runs, base_runs, key, key.removeprefix("eval/"), "score",
                                     lambda r, key=key: _sample(r, key), None, False))  # fmt: skip
    return [d for d in found if d is not None]


def plot_differences(diffs: list[Difference], base: str, groups: dict[str, list[Run]], out: Path) -> None:
    """A forest plot: each difference to the baseline with its 95% interval, losses and scores apart."""
    units = list(dict.fromkeys(d.unit for d in diffs))
    rows = {u: list(dict.fromkeys(d.name for d in diffs if d.unit == u)) for u in units}
    height = 1.2 + 0.32 * sum(len(r) * max(1, len(groups) - 1) for r in rows.values())
    fig, axes = plt.subplots(len(units), 1, figsize=(9, max(3.0, height)), squeeze=False,
                             gridspec_kw={"height_ratios": [max(1, len(rows[u])) for u in units]})  # fmt: skip
    color = colors(groups)
    others = [g for g in groups if g != base]
    for ax, unit in zip((a[0] for a in axes), units, strict=True):
        names = rows[unit]
        step = 0.8 / len(others)
        drawn: set[str] = set()
        for d in (d for d in diffs if d.unit == unit):
            y = names.index(d.name) + (others.index(d.group) - (len(others) - 1) / 2) * step
            iv = d.interval
            bounded = math.isfinite(iv.lo) and math.isfinite(iv.hi)
            xerr = [[iv.diff - iv.lo], [iv.hi - iv.diff]] if bounded else None
            seeds_only = iv.method.startswith(("seeds only", "one seed"))
            ax.errorbar([iv.diff], [y], xerr=xerr, fmt="s" if seeds_only else "o", color=color[d.group], capsize=3,
                        mfc="white" if not bounded else color[d.group],
                        label=None if d.group in drawn else d.group)  # fmt: skip
            drawn.add(d.group)
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.set_ylim(len(names) - 0.5, -0.5)  # first metric on top, room above and below
        better = "left of 0 = lower loss (better)" if unit != "score" else "right of 0 = higher score (better)"
        ax.set_xlabel(f"difference to {base} ({unit}); {better}")
        ax.grid(axis="x", alpha=0.3)
        ax.margins(x=0.08)  # no marker on the frame
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)  # beside, not on it
    axes[0][0].set_title(
        f"Difference to the CE baseline ({base}), 95% intervals: paired bootstrap over documents + seed spread\n"
        "(squares: seeds' spread only — per-domain, or runs without per-document data; hollow: no interval)", fontsize=9
    )  # fmt: skip
    fig.tight_layout()
    fig.savefig(out / "differences.png", dpi=120, bbox_inches="tight")
    plt.close(fig)


def final(values: list[float]) -> float:
    return values[-1] if values else math.nan


class NotComparable(ValueError):
    """Runs trained on different token budgets, tokenizers or data (``mismatches``)."""


def compare(run_dirs: list[Path], out: Path, smooth: float = 0.05, force: bool = False) -> Path:
    every_run = [read_run(d) for d in run_dirs]
    problems = mismatches(every_run)
    if problems and not force:
        raise NotComparable("; ".join(problems))
    out.mkdir(parents=True, exist_ok=True)
    groups, settings = group_runs(every_run)
    base = baseline(groups)
    curves = plot_curves(groups, smooth, base, out)
    all_eval = sorted({k for runs in groups.values() for r in runs for k in r.eval})
    bucket_keys = [k for k in (*(f"eval_bucket/{b}_ppl" for b in BUCKETS), "eval_bucket/ppl") if k in all_eval]
    if bucket_keys:
        plot_buckets(groups, bucket_keys, base, out)
    scores = task_keys(groups)
    tasks = list(dict.fromkeys(k.removeprefix("eval/").rpartition("/")[0] for k in scores))
    chance = {t: c for t in tasks if (c := chance_level(t.partition("@")[0], [r for g in groups.values() for r in g]))}
    if scores:
        plot_downstream(groups, scores, chance, out)
    diffs = differences(groups, base, bucket_keys, scores) if base and len(groups) > 1 else []
    if diffs:
        plot_differences(diffs, base, groups, out)

    # one record per number: per run (seed) and per group (mean, with its error)
    records: list[dict[str, Any]] = []

    def record(group: str, seed: Any, run: str, metric: str, value: float, err: float = math.nan, n: int = 1,
               note: str = "", lo: float = math.nan, hi: float = math.nan, verdict: str = "") -> None:  # fmt: skip
        records.append({"group": group, "seed": seed, "run": run, "metric": metric, "value": value, "error": err,
                        "n": n, "note": note, "lo": lo, "hi": hi, "verdict": verdict})  # fmt: skip

    run_metrics = {
        "final_train_ce": lambda r: final(r.ce),
        "final_train_loss": lambda r: final(r.loss),
        "tokens": lambda r: final(r.tokens),
        **{k: (lambda r, k=k: r.eval.get(k, math.nan)) for k in ["eval_bucket/loss", *bucket_keys]},
        **{k: (lambda r, k=k: r.eval.get(k, math.nan)) for k in scores},
    }
    table: dict[str, dict[str, str]] = {}
    for label, runs in groups.items():
        cells = table.setdefault(label, {})
        for name, get in run_metrics.items():
            for r in runs:
                record(label, r.seed, str(r.dir), name, get(r))
            if name in scores:
                m, sd, se, n = _eval_stats(runs, name)
                err = max(sd, se if math.isfinite(se) else 0.0)
                record(label, "mean", "", name, m, err, n, "error: max(lm-eval stderr, sd over seeds)")
                cells[name] = fmt(m, err, 2) if math.isfinite(se) or n > 1 else fmt(m)
            else:
                m, sd = mean_sd([get(r) for r in runs])
                record(label, "mean", "", name, m, sd, len(runs), "error: sd over seeds")
                cells[name] = f"{m:.0f}" if name == "tokens" else fmt(m, sd, len(runs))
        if base and label != base:
            for k in bucket_keys:
                rel, err = relative(runs, groups[base], k)
                record(label, "mean", "", f"{k}/change_vs_{base}", rel, err, len(runs), relative.__doc__.split(".")[0])
                spread = f" ± {100 * err:.1f}" if len(runs) > 1 else ""  # one seed: no spread to show
                cells[f"Δ{k}"] = f"{100 * rel:+.1f}%{spread}" if math.isfinite(rel) else "–"
    for task, (level, source) in chance.items():
        record("chance", "", "", f"eval/{task}", level, note=source)
    for d in diffs:  # error: the interval's half-width; lo..hi: the 95% interval; note: which interval
        iv = d.interval
        record(d.group, "diff", "", f"{d.key}/diff_vs_{base}", iv.diff, iv.half_width, sum(iv.n_seeds), iv.method,
               iv.lo, iv.hi, iv.verdict)  # fmt: skip

    md = ["# Loss comparison", "",
          f"{sum(len(r) for r in groups.values())} runs in {len(groups)} groups (runs that differ only by seed); "
          "mean ± sd over seeds; every number is also in `summary.csv`. All losses are compared on token "
          "cross-entropy (`ce`); the optimised loss is on each loss's own scale."]  # fmt: skip
    if base:
        md.append(f"Baseline for relative changes: `{base}`.")
    if any(settings.values()):
        md.extend(["", "Groups that differ in more than the loss:"])
        md.extend(f"- `{label}`: {s}" for label, s in settings.items() if s)

    def section(title: str, cols: list[tuple[str, str]], extra_rows: list[str] = ()) -> None:
        md.extend(["", f"## {title}", "", "| group | seeds | " + " | ".join(c for c, _ in cols) + " |",
                   "|---|---|" + "---|" * len(cols)])  # fmt: skip
        for label, runs in groups.items():
            seeds = ",".join(str(r.seed) for r in runs)
            md.append(f"| {label} | {seeds} | " + " | ".join(table[label].get(k, "–") for _, k in cols) + " |")
        md.extend(extra_rows)

    section("Training and held-out loss", [("tokens", "tokens"), ("final train ce", "final_train_ce"),
            ("final train loss (own scale)", "final_train_loss"), ("held-out ce", "eval_bucket/loss")])  # fmt: skip
    if bucket_keys:
        cols = [(f"{k.removeprefix('eval_bucket/')}", k) for k in bucket_keys]
        if base:
            cols += [(f"Δ {k.removeprefix('eval_bucket/')} vs {base}", f"Δ{k}") for k in bucket_keys]
        note = ["", f"Δ: relative change of the perplexity against `{base}` (paired by seed where `{base}` has the "
                "same seeds: mean ± sd of the per-seed ratios − 1)."] if base else []  # fmt: skip
        section("Held-out perplexity by token frequency", cols, note)
    if scores:
        chance_row = "| chance | | " + " | ".join(
            f"{chance[t][0]:.4f}" if (t := k.removeprefix("eval/").rpartition("/")[0]) in chance else "–"
            for k in scores
        ) + " |"  # fmt: skip
        section("Downstream (final checkpoint; ± max(lm-eval stderr, sd over seeds))",
                [(k.removeprefix("eval/"), k) for k in scores], [chance_row])  # fmt: skip
        if chance:
            md.extend(["", "Chance levels:"] + [f"- `{t}`: {v:.4f} ({src})" for t, (v, src) in chance.items()])
    if diffs:
        md.extend(difference_section(diffs, base))
    if problems:  # compared only because forced
        md.extend(["", f"**Forced comparison of mismatched runs** (`--force`): {'; '.join(problems)}."])
    md.extend(["", "Runs:"] + [f"- `{r.dir}` ({label}, seed {r.seed})" for label, rs in groups.items() for r in rs])
    plots = [p for p in ("ce_vs_tokens.png", "bucket_ppl.png", "downstream.png", "differences.png")
             if (out / p).is_file()]  # fmt: skip
    md.extend(["", "Plots: " + ", ".join(f"[{p}]({p})" for p in plots)])
    summary = out / "summary.md"
    summary.write_text("\n".join(md) + "\n")
    _write_csv(out / "summary.csv", records)
    _write_csv(out / "curves.csv", curves)
    return summary


def _number(x: float, unit: str) -> str:
    return f"{x:+.4f}" if math.isfinite(x) else ("+∞" if x > 0 else "−∞")


def difference_section(diffs: list[Difference], base: str) -> list[str]:
    md = ["", f"## Differences against `{base}` (95% intervals)", "",
          "Each group minus the CE baseline (`differences.png` shows the same intervals). Losses in nats/token "
          "(below 0: lower loss, better; for a bucket, exp(Δ) − 1 is the relative change of its perplexity); "
          "downstream scores as fractions (above 0: better). The interval is a paired bootstrap over documents "
          "(2000 resamples, percentile 95%; held-out documents for losses, lm-eval's documents for scores) with "
          "the seeds' spread added in quadrature when a group has several seeds (a t-interval: over per-seed "
          "differences when both groups have the same seeds, Welch otherwise); per-domain losses have no "
          "per-document data saved, so their interval is the seeds' spread alone (none with one seed each). "
          "The verdict is *better* / *worse* when the interval excludes 0, else *no difference at this power*; "
          "± is the interval's half-width, the smallest difference this comparison could detect. "
          "Method per row: `summary.csv` (`note`).", "",
          "| comparison | Δ | 95% interval | ± | verdict | interval |", "|---|---|---|---|---|---|"]  # fmt: skip
    for d in diffs:
        iv = d.interval
        if not math.isfinite(iv.half_width):
            kind = "none: one seed each, no per-document data"
        elif iv.method.startswith("seeds only"):
            kind = "seeds"
        else:
            kind = "documents" + (" + seeds" if max(iv.n_seeds) > 1 else "")
        half = f"{iv.half_width:.4f}" if math.isfinite(iv.half_width) else "–"
        md.append(f"| {d.group}: {d.name} | {_number(iv.diff, d.unit)} | [{_number(iv.lo, d.unit)}, "
                  f"{_number(iv.hi, d.unit)}] | {half} | {iv.verdict} | {kind} |")  # fmt: skip
    return md


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as fh:
        if rows:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run directories")
    parser.add_argument("--out", required=True)
    parser.add_argument(
        "--smooth", type=float, default=0.05, help="smoothing window, a fraction of a run's logged points"
    )
    parser.add_argument(
        "--force", action="store_true", help="compare runs with different token budgets, tokenizers or data anyway"
    )
    args = parser.parse_args(argv)
    missing = [
        r for r in args.runs if not (Path(r) / "metrics.jsonl").is_file() or not (Path(r) / "config.yaml").is_file()
    ]
    if missing:
        return fail(f"not run directories (no metrics.jsonl / config.yaml): {missing}")
    if not 0 <= args.smooth < 1:
        return fail(f"--smooth={args.smooth} is not in [0, 1)")
    try:
        summary = compare([Path(r) for r in args.runs], Path(args.out), args.smooth, args.force)
    except NotComparable as e:
        return fail(f"runs not comparable: {e} (pass --force to compare them anyway)")
    print(summary.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
