"""The fine-tuning report's figure: each loss setting's difference to the reference setting, one panel per metric
(its own x scale: ROUGE, distinct-n, rarity and length differ by orders of magnitude), the declared primary metric
first with its equivalence margin shaded. Like the pretraining report's forest plots (``plots.py``): the point
estimate, the 95% interval (thin), the 90% interval (thick: the equivalence test's), a filled point where the
verdict is better or worse (the primary metric at its own p, the others Holm-adjusted over the secondary table),
the same colour for a loss in every report."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

from evals.compare.plots import draw_interval, tag_colour

BEFORE = "#7f7f7f"
"""The model before fine-tuning (a setting with no loss)."""


def _colour(loss: str) -> str:
    """``generation_table.py``'s loss column (``pdl (alpha 0.5)``; ``—`` for the model before fine-tuning)."""
    name = loss.split(" ")[0]
    return BEFORE if name in ("—", "") else tag_colour(name)


def plot_settings(found: list[tuple[str, str, str, Any]], ref_group: str, losses: dict[str, str],
                  direction: dict[str, int], decided: set[tuple[str, str]], out: Path, title: str, primary: str = "",
                  margin: float = 0.0) -> bool:  # fmt: skip
    """Write ``out`` (PNG): ``found`` is (setting, seeds, metric, Estimate) as ``generation_table.py`` computes them;
    ``losses`` each setting's loss name (its colour), ``direction`` +1/-1 where a metric has a better direction,
    ``decided`` the (setting, metric) pairs whose verdict in the report's tables is better or worse. False when
    there is nothing to draw."""
    if not found:
        return False
    metrics = list(dict.fromkeys(c for _, _, c, _ in found))
    if primary in metrics:
        metrics.remove(primary)
        metrics.insert(0, primary)
    setting_names = list(dict.fromkeys(n for n, *_ in found))
    cols = min(4, len(metrics))
    rows = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols + 1.2, 0.6 + (0.35 * len(setting_names) + 0.9) * rows),
                             squeeze=False)  # fmt: skip
    for i, metric in enumerate(metrics):
        ax = axes[i // cols][i % cols]
        for y, name in enumerate(setting_names):
            hit = [e for n, _, c, e in found if n == name and c == metric]
            if not hit:
                continue
            draw_interval(ax, hit[0], y, _colour(losses.get(name, name)), (name, metric) in decided)
        if metric == primary and margin > 0:
            ax.axvspan(-margin, margin, color="#2ca02c", alpha=0.1, linewidth=0)
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_yticks(range(len(setting_names)), setting_names if i % cols == 0 else [""] * len(setting_names),
                      fontsize=8)  # fmt: skip
        ax.set_ylim(len(setting_names) - 0.5, -0.5)
        better = {1: "higher is better", -1: "lower is better"}.get(direction.get(metric, 0), "no better direction")
        ax.set_title(f"{metric}{' (primary)' if metric == primary else ''}", fontsize=9,
                     fontweight="bold" if metric == primary else "normal")  # fmt: skip
        ax.set_xlabel(f"Δ vs {ref_group}; {better}", fontsize=7)
        ax.grid(axis="x", alpha=0.3)
        ax.margins(x=0.15)
        ax.tick_params(axis="x", labelsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(nbins=5))  # a narrow panel's labels must not run into each other
    for j in range(len(metrics), rows * cols):
        axes[j // cols][j % cols].set_visible(False)
    shaded = f"; shaded: ±{margin:g} (the primary metric's equivalence margin)" if primary and margin > 0 else ""
    fig.suptitle(f"{title}\nmean over seeds minus {ref_group}'s: 95% (thin) and 90% (thick) intervals{shaded}; "
                 "filled: better/worse (secondary metrics Holm-adjusted)", fontsize=9)  # fmt: skip
    fig.tight_layout()
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True
