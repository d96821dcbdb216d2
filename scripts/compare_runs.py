"""Compare runs from their run directories alone (no W&B needed):
``python scripts/compare_runs.py runs/ce-s0 runs/ce-s1 runs/mile-s0 runs/mile-s1 --out docs/results/x``.

Runs are grouped by loss (``loss.name`` in each run's config.yaml; seeds are the repeats). Writes
``loss_vs_tokens.png``, ``bucket_ppl.png``, ``downstream.png`` (where the runs have those metrics) and
``summary.md``: per loss, mean ± standard deviation over seeds of the final training loss, held-out loss and
perplexity by token-frequency bucket, and every downstream metric of the final evaluation.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
from omegaconf import OmegaConf

BUCKETS = ("high", "medium", "low")


def read_run(run_dir: Path) -> dict:
    cfg = OmegaConf.load(run_dir / "config.yaml")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in rows if "loss" in r and "tokens" in r]
    final_eval: dict[str, float] = {}
    for r in rows:  # the last evaluation wins
        evals = {k: v for k, v in r.items() if k.startswith(("eval/", "eval_bucket/"))}
        if evals:
            final_eval = evals
    return {
        "dir": str(run_dir),
        "loss_name": str(cfg.loss.name),
        "seed": int(cfg.train.seed),
        "tokens": [r["tokens"] for r in train],
        "loss": [r["loss"] for r in train],
        "eval": final_eval,
    }


def mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    mean = statistics.fmean(values)
    return f"{mean:.4f} ± {statistics.stdev(values):.4f}" if len(values) > 1 else f"{mean:.4f}"


def plot_loss(groups: dict[str, list[dict]], out: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, runs in sorted(groups.items()):
        n = min(len(r["loss"]) for r in runs)
        tokens = runs[0]["tokens"][:n]
        per_step = list(zip(*(r["loss"][:n] for r in runs), strict=True))
        mean = [statistics.fmean(v) for v in per_step]
        (line,) = ax.plot(tokens, mean, label=f"{name} ({len(runs)} seed{'s' * (len(runs) > 1)})")
        if len(runs) > 1:
            lo = [min(v) for v in per_step]
            hi = [max(v) for v in per_step]
            ax.fill_between(tokens, lo, hi, color=line.get_color(), alpha=0.2)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("training loss (each loss on its own scale)")
    ax.set_title("Training loss (mean over seeds, band = min..max)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss_vs_tokens.png", dpi=120)
    plt.close(fig)


def plot_bars(
    groups: dict[str, list[dict]], keys: list[str], labels: list[str], title: str, ylabel: str, path: Path
) -> None:
    names = sorted(groups)
    width = 0.8 / max(len(names), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(keys) + 2), 4.5))
    for i, name in enumerate(names):
        means, errs = [], []
        for key in keys:
            vals = [r["eval"][key] for r in groups[name] if key in r["eval"]]
            means.append(statistics.fmean(vals) if vals else 0.0)
            errs.append(statistics.stdev(vals) if len(vals) > 1 else 0.0)
        ax.bar([k + i * width for k in range(len(keys))], means, width, yerr=errs, label=name, capsize=3)
    ax.set_xticks([k + width * (len(names) - 1) / 2 for k in range(len(keys))], labels, rotation=20)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def compare(run_dirs: list[Path], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    groups: dict[str, list[dict]] = defaultdict(list)
    for d in run_dirs:
        run = read_run(d)
        groups[run["loss_name"]].append(run)
    plot_loss(groups, out)
    all_eval = sorted({k for runs in groups.values() for r in runs for k in r["eval"]})
    bucket_keys = [f"eval_bucket/{b}_ppl" for b in BUCKETS if f"eval_bucket/{b}_ppl" in all_eval]
    if bucket_keys:
        plot_bars(groups, bucket_keys, [k.split("/")[1] for k in bucket_keys], "Held-out perplexity by token frequency",
                  "perplexity", out / "bucket_ppl.png")  # fmt: skip
    task_keys = [k for k in all_eval if k.startswith("eval/") and k.endswith(("/acc", "/acc_norm", "/exact_match"))]
    if task_keys:
        labels = [k.removeprefix("eval/") for k in task_keys]
        plot_bars(groups, task_keys, labels, "Downstream accuracy (final checkpoint)", "score", out / "downstream.png")

    metric_keys = [k for k in all_eval if k.startswith("eval/") and "stderr" not in k and not k.endswith("sample_len")]
    metric_keys += [k for k in ("eval_bucket/ppl", *bucket_keys) if k in all_eval]
    lines = [
        "| loss | seeds | final train loss | " + " | ".join(metric_keys) + " |",
        "|---|---|---|" + "---|" * len(metric_keys),
    ]
    for name, runs in sorted(groups.items()):
        cells = [mean_std([r["eval"][k] for r in runs if k in r["eval"]]) for k in metric_keys]
        seeds = ",".join(str(r["seed"]) for r in sorted(runs, key=lambda r: r["seed"]))
        lines.append(
            f"| {name} | {seeds} | {mean_std([r['loss'][-1] for r in runs if r['loss']])} | " + " | ".join(cells) + " |"
        )
    body = "\n".join(lines)
    sources = "\n".join(
        f"- `{r['dir']}` ({r['loss_name']}, seed {r['seed']})" for runs in groups.values() for r in runs
    )
    summary = out / "summary.md"
    summary.write_text(
        "# Loss comparison\n\nMean ± standard deviation over seeds (final evaluation of each run).\n"
        "Training losses are on each loss's own scale; compare held-out and downstream columns across losses.\n\n"
        f"{body}\n\nRuns:\n{sources}\n"
    )
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run directories")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    missing = [r for r in args.runs if not (Path(r) / "metrics.jsonl").is_file()]
    if missing:
        print(f"error: not run directories (no metrics.jsonl): {missing}", file=sys.stderr)
        return 2
    summary = compare([Path(r) for r in args.runs], Path(args.out))
    print(summary.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
