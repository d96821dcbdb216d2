"""The report's figures. Every figure gives each loss its own panel (its own y or x scale), so a loss that diverged
cannot flatten the others; one colour per loss tag in every report (``colour``); differences on linear axes; no
smoothing (raw values, each seed a thin line, the mean over seeds a thick one)."""

from __future__ import annotations

import math
import statistics
import textwrap
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt

from evals.compare.metrics import Contrast
from evals.compare.runs import Run
from losslab.losses import loss_tag

# One colour per loss, the same in every report: by the loss tag's name, its modifier where it has one.
LOSS_COLOURS = {"ce": "#333333", "mile": "#1f77b4", "focal": "#ff7f0e", "focal_lin": "#bcbd22", "pdl": "#2ca02c",
                "dft": "#d62728", "rho1": "#9467bd", "token_weighted": "#17becf"}  # fmt: skip
MODIFIER_COLOURS = {"ls": "#8c564b", "z": "#e377c2", "clamp": "#7f7f7f"}
OTHERS = ("#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#dbdb8d", "#9edae5")


def _variant(tag: str) -> str:
    """The part of a tag that picks its colour: a modifier (``ce-ls0.1`` -> ``ls``) or the loss name."""
    name, *params = tag.split("-")
    for p in params:
        for mod in MODIFIER_COLOURS:
            if p.startswith(mod) and p[len(mod) : len(mod) + 1].replace(".", "").isdigit():
                return mod
    return name


def colour(label: str, runs: list[Run]) -> str:
    """A group's colour from its loss tag (``tag_colour``)."""
    return tag_colour(loss_tag(runs[0].cfg.loss))


def tag_colour(tag: str) -> str:
    """A loss's colour from its tag (``mile-g1``, ``ce-ls0.1``; a bare loss name too), the same in every report; a
    loss not in the table gets one by a hash of its tag."""
    key = _variant(tag)
    if key in MODIFIER_COLOURS:
        return MODIFIER_COLOURS[key]
    if key in LOSS_COLOURS:
        return LOSS_COLOURS[key]
    return OTHERS[sum(map(ord, tag)) % len(OTHERS)]


def colours(groups: dict[str, list[Run]]) -> dict[str, str]:
    return {label: colour(label, runs) for label, runs in groups.items()}


def _aligned(runs: list[Run], xs_of: Any, ys_of: Any) -> tuple[list[float], list[list[float]]]:
    """x values all runs share and each run's y at them."""
    series = [dict(zip(xs_of(r), ys_of(r), strict=True)) for r in runs]
    common = sorted(set.intersection(*(set(s) for s in series))) if series else []
    return common, [[s[x] for x in common] for s in series]


def _panel_grid(n: int, cols: int, width: float, height: float) -> tuple[Any, list[Any]]:
    rows = max(1, n)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    return fig, [list(row) for row in axes]


def plot_curves(groups: dict[str, list[Run]], base: str | None, notes: dict[str, str], out: Path, *, series: str,
                file: str) -> bool:  # fmt: skip
    """Per group (one row, its own scales): the curve of ``series`` for each seed and their mean next to the
    baseline's mean, and the per-seed difference to the baseline (paired by seed where both have it). ``series``:
    ``train`` (training ``ce`` at each logged step) or ``heldout`` (``eval_domain/overall`` at each in-loop
    evaluation: the held-out set)."""
    if series == "train":
        get = (lambda r: [t / 1e6 for t in r.tokens], lambda r: r.ce)
        ylabel = "training ce (nats/token)"
        what = "Training cross-entropy as logged (each point: the mean over one logging interval)"
    else:
        get = (lambda r: [t / 1e6 for t, _ in r.domain_curves.get("overall", [])],
               lambda r: [v for _, v in r.domain_curves.get("overall", [])])  # fmt: skip
        ylabel, what = "held-out ce (nats/token)", "Held-out cross-entropy on the held-out set (in-loop evaluations)"
        if not any(len(r.domain_curves.get("overall", [])) > 1 for rs in groups.values() for r in rs):
            return False
    others = [g for g in groups if g != base] or list(groups)
    color = colours(groups)
    fig, axes = _panel_grid(len(others), 2 if base and others != [base] else 1, 6.0, 3.3)
    base_runs = groups.get(base) if base else None
    base_x, base_y = _aligned(base_runs, *get) if base_runs else ([], [])
    base_mean = [statistics.fmean(c) for c in zip(*base_y, strict=True)] if base_y else []
    for row, label in zip(axes, others, strict=True):
        runs = groups[label]
        x, ys = _aligned(runs, *get)
        ax = row[0]
        for y in ys:
            ax.plot(x, y, color=color[label], linewidth=0.7, alpha=0.5)
        if ys:
            ax.plot(x, [statistics.fmean(c) for c in zip(*ys, strict=True)], color=color[label], linewidth=2,
                    label=f"{label} ({len(runs)} seed{'s' * (len(runs) > 1)}; thin: each seed)")  # fmt: skip
        if base_mean and label != base:
            ax.plot(base_x, base_mean, color=color[base], linewidth=1.5, linestyle="--", label=f"{base} (mean)")
        # the reasons of every diverged seed are in summary.md: a panel's title holds one short line of them
        note = (
            f"\ndiverged: {textwrap.shorten(notes[label], 70, placeholder=' … (summary.md)')}" if label in notes else ""
        )
        ax.set_title(f"{label}{note}", fontsize=9, color="#b00000" if note else "black")
        ax.set_ylabel(ylabel, fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        if base and label != base:
            dax = row[1]
            by_seed = {r.seed: dict(zip(get[0](r), get[1](r), strict=True)) for r in base_runs}
            mean_ref = dict(zip(base_x, base_mean, strict=True))
            diffs = []
            for r in runs:
                ref = by_seed.get(r.seed, mean_ref)
                pts = [(t, v - ref[t]) for t, v in zip(get[0](r), get[1](r), strict=True) if t in ref]
                if pts:
                    dax.plot([t for t, _ in pts], [d for _, d in pts], color=color[label], linewidth=0.7, alpha=0.5)
                    diffs.append(dict(pts))
            if diffs:
                common = sorted(set.intersection(*(set(d) for d in diffs)))
                dax.plot(common, [statistics.fmean(d[t] for d in diffs) for t in common], color=color[label],
                         linewidth=2)  # fmt: skip
            dax.axhline(0, color=color[base], linewidth=1, linestyle="--")
            paired = all(r.seed in by_seed for r in runs)
            dax.set_title(f"{label} minus {base} ({'paired by seed' if paired else f'minus {base} mean'}); "
                          "below 0: lower loss", fontsize=9)  # fmt: skip
            dax.set_ylabel("difference (nats/token)", fontsize=8)
            dax.grid(alpha=0.3)
    for row in axes:
        for ax in row:
            ax.set_xlabel("training tokens (millions)", fontsize=8)
            ax.tick_params(labelsize=7)
    height = fig.get_figheight()
    fig.suptitle(f"{what}; each loss in its own row and scale, no smoothing", fontsize=10, y=1 - 0.1 / height, va="top")
    fig.tight_layout()
    fig.subplots_adjust(top=1 - 0.7 / height)  # the title's own strip (inches): tight_layout leaves it none
    fig.savefig(out / file, dpi=110)
    plt.close(fig)
    return True


def draw_interval(ax: Any, e: Any, y: float, colour: str, decided: bool) -> None:
    """One difference of a forest plot at height ``y``: its 95% interval (thin), its 90% one (thick: the equivalence
    test's) and the estimate, filled where the verdict is better or worse; an x where there is no interval."""
    if not (math.isfinite(e.lo) and math.isfinite(e.hi)):
        ax.plot([e.diff], [y], marker="x", color=colour)
        return
    ax.plot([e.lo, e.hi], [y, y], color=colour, linewidth=1.2)
    ax.plot([e.lo90, e.hi90], [y, y], color=colour, linewidth=3.5, alpha=0.6)
    ax.plot([e.diff], [y], marker="o", color=colour, mfc=colour if decided else "white", markersize=6)


def _forest(ax: Any, rows: list[Contrast], colour_of: str) -> None:
    names = [c.metric.name + (" (primary)" if c.metric.primary else "") for c in rows]
    for y, c in enumerate(rows):
        decided = c.verdict is not None and c.verdict.word.startswith(("better", "worse"))
        draw_interval(ax, c.est, y, colour_of, decided)
    margin = rows[0].margin if rows else 0.0
    if margin > 0:
        ax.axvspan(-margin, margin, color="#2ca02c", alpha=0.08, linewidth=0)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(rows)), names, fontsize=7)
    for label, c in zip(ax.get_yticklabels(), rows, strict=True):
        if c.metric.primary:
            label.set_fontweight("bold")
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.grid(axis="x", alpha=0.3)
    ax.margins(x=0.1)
    ax.tick_params(axis="x", labelsize=7)


def plot_differences(found: list[Contrast], groups: dict[str, list[Run]], out: Path) -> bool:
    """A forest plot per contrast (a column each, its own x scale), losses and scores in separate rows: the point
    estimate, the 95% interval (thin), the 90% interval (thick: the equivalence test's), the ±margin band; a
    filled point where the verdict is better or worse (Holm-adjusted for secondary metrics)."""
    if not found:
        return False
    pairs = list(dict.fromkeys(c.label for c in found))
    units = [u for u in ("nats/token", "score") if any(c.metric.unit == u for c in found)]
    per = {(p, u): [c for c in found if c.label == p and c.metric.unit == u] for p in pairs for u in units}
    height = [max(1, max(len(per[(p, u)]) for p in pairs)) for u in units]
    fig, axes = plt.subplots(len(units), len(pairs), figsize=(4.6 * len(pairs) + 1.5, 0.9 + 0.3 * sum(height)),
                             squeeze=False, gridspec_kw={"height_ratios": height})  # fmt: skip
    color = colours(groups)
    for i, unit in enumerate(units):
        for j, pair in enumerate(pairs):
            ax, rows = axes[i][j], per[(pair, unit)]
            if not rows:
                ax.set_visible(False)
                continue
            _forest(ax, rows, color[rows[0].a])
            better = "left of 0: lower loss (better)" if unit != "score" else "right of 0: higher score (better)"
            ax.set_xlabel(f"{pair} ({unit}); {better}", fontsize=7)
            if i == 0:
                ax.set_title(pair, fontsize=9)
            if j > 0:
                ax.set_yticklabels([])
    fig.suptitle("Differences with 95% (thin) and 90% (thick) intervals; shaded: ±margin (equivalence); "
                 "filled: better/worse, Holm-adjusted for secondary metrics", fontsize=9)  # fmt: skip
    fig.tight_layout()
    fig.savefig(out / "differences.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True


def plot_bucket_change(found: list[Contrast], groups: dict[str, list[Run]], out: Path) -> bool:
    """The relative change of the held-out perplexity, overall and by frequency bucket: ``exp(Δ) - 1`` with the
    95% interval's ends transformed alike, in percent on a linear axis, one panel per contrast."""
    keys = ["heldout/ce", "heldout/high", "heldout/medium", "heldout/low"]
    rows = [c for c in found if c.metric.key in keys]
    pairs = list(dict.fromkeys(c.label for c in rows))
    if not pairs:
        return False
    color = colours(groups)
    fig, axes = plt.subplots(1, len(pairs), figsize=(3.8 * len(pairs) + 1, 3.6), squeeze=False)
    for ax, pair in zip(axes[0], pairs, strict=True):
        mine = {c.metric.key: c for c in rows if c.label == pair}
        xs = [k for k in keys if k in mine]
        for x, k in enumerate(xs):
            e = mine[k].est
            pct = [100 * math.expm1(v) for v in (e.diff, e.lo, e.hi)]
            bounded = all(math.isfinite(v) for v in pct)
            ax.errorbar([x], [pct[0]], yerr=[[pct[0] - pct[1]], [pct[2] - pct[0]]] if bounded else None, fmt="o",
                        color=color[mine[k].a], capsize=4)  # fmt: skip
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(xs)), [k.removeprefix("heldout/").replace("ce", "all tokens") for k in xs], fontsize=8)
        ax.set_ylabel("perplexity change (%)", fontsize=8)
        ax.set_title(f"{pair}\nbelow 0: lower perplexity (better); 95% intervals", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        ax.margins(x=0.2)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(out / "bucket_change.png", dpi=110)
    plt.close(fig)
    return True


def plot_downstream(groups: dict[str, list[Run]], keys: list[str], chance: dict[str, Any], out: Path) -> bool:
    """Each task score: every run (a dot per seed) and its group's mean (a bar), chance as a dashed line."""
    if not keys:
        return False
    color = colours(groups)
    fig, axes = plt.subplots(1, len(keys), figsize=(max(3.5, 0.9 * len(groups) + 1.5) * len(keys), 3.8),
                             squeeze=False)  # fmt: skip
    for ax, key in zip(axes[0], keys, strict=True):
        for i, (label, runs) in enumerate(groups.items()):
            vals = [r.eval[key] for r in runs if key in r.eval]
            if not vals:
                continue
            ax.bar([i], [statistics.fmean(vals)], 0.7, color=color[label], alpha=0.5)
            ax.plot([i] * len(vals), vals, "o", color=color[label], markersize=4)
        level = chance.get(key.removeprefix("eval/").rpartition("/")[0])
        if level is not None:
            ax.axhline(level[0], color="black", linestyle="--", linewidth=1, label="chance")
            ax.legend(fontsize=7)
        ax.set_xticks(range(len(groups)), list(groups), rotation=30, ha="right", fontsize=7)
        ax.set_ylim(0, 1)
        ax.set_title(key.removeprefix("eval/"), fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Downstream scores (final checkpoint): bar = mean over seeds, dots = seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "downstream.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True


def plot_downstream_curves(groups: dict[str, list[Run]], keys: list[str], chance: dict[str, Any], out: Path) -> bool:
    """Each task score against training tokens at every evaluated checkpoint (``eval.every_checkpoint`` or the
    watcher): one panel per score, each loss in its colour, a thin line per seed and the mean over the seeds that
    share the points as a thick one, chance dashed. Each loss also has its own line style: small models often give
    two losses the same scores, and a loss drawn solid under another's dashes stays visible. Drawn when some run
    was evaluated at more than one checkpoint."""
    keys = [k for k in keys if any(len(r.eval_curves.get(k, [])) > 1 for rs in groups.values() for r in rs)]
    if not keys:
        return False
    color = colours(groups)
    style = {label: ("-", "--", "-.", ":")[i % 4] for i, label in enumerate(groups)}
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.3 * rows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax, key in zip(flat, keys, strict=False):
        for label, runs in groups.items():
            get = (lambda r, k=key: [t / 1e6 for t, _ in r.eval_curves.get(k, [])],
                   lambda r, k=key: [v for _, v in r.eval_curves.get(k, [])])  # fmt: skip
            for r in runs:
                ax.plot(get[0](r), get[1](r), color=color[label], linestyle=style[label], linewidth=0.7, alpha=0.5,
                        marker=".", markersize=3)  # fmt: skip
            x, ys = _aligned([r for r in runs if key in r.eval_curves], *get)
            if ys:
                ax.plot(x, [statistics.fmean(c) for c in zip(*ys, strict=True)], color=color[label], linewidth=2,
                        linestyle=style[label], label=f"{label} ({len(ys)} seed{'s' * (len(ys) > 1)})")  # fmt: skip
        level = chance.get(key.removeprefix("eval/").rpartition("/")[0])
        if level is not None:
            ax.axhline(level[0], color="black", linestyle="--", linewidth=1, label="chance")
        ax.set_title(key.removeprefix("eval/"), fontsize=9)
        ax.set_xlabel("training tokens (millions)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in flat[len(keys) :]:
        ax.set_visible(False)
    fig.suptitle(
        "Downstream scores at every evaluated checkpoint: thick = mean over seeds, thin = each seed", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(out / "downstream_curves.png", dpi=110)
    plt.close(fig)
    return True
