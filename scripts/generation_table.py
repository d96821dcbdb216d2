"""Generation metrics of fine-tuned runs side by side, as a markdown table:
``python scripts/generation_table.py runs/finetune/ce runs/finetune/pdl_a1 [--task shakespeare_dialogue]``.
Reads each run's newest ``eval_results.json`` (written by the in-loop evaluation or ``scripts/evaluate.py``)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run this checkout's code, never an installed copy

import argparse
import json

COLUMNS = ("rouge1", "rouge2", "rougeL", "distinct1", "distinct2", "rarity", "length", "degenerate")


def table(runs: list[str], task: str, buckets: bool = True) -> str:
    from models.checkpoint import resolve_checkpoint

    lines = ["| run | loss | " + " | ".join(COLUMNS) + " | documents |", "|---" * (len(COLUMNS) + 3) + "|"]
    reference = None
    for run in runs:
        ckpt = resolve_checkpoint(run)
        results = json.loads((ckpt / "eval_results.json").read_text())
        metrics = results["metrics"]
        loss = _loss_name(ckpt)
        cells = []
        for c in COLUMNS:
            value = metrics.get(f"{task}/{c}")
            stderr = metrics.get(f"{task}/{c}_stderr")
            cells.append("—" if value is None else f"{value:.4f}" + (f" ± {stderr:.4f}" if stderr else ""))
        docs = results.get("n_samples", {}).get(task, {}).get("effective", "?")
        lines.append(f"| {Path(run).name} | {loss} | " + " | ".join(cells) + f" | {docs} |")
        reference = reference or metrics.get(f"{task}/rarity_reference")
    if reference is not None:
        lines.append(f"\nRarity of the reference replies: {reference:.4f} (mean -log relative training frequency).")
    lines.append("± is lm-eval's standard error over documents (none for the corpus-level distinct-n and rarity).")
    rows = bucket_table(runs) if buckets else []
    return "\n".join(lines + (["", *rows] if rows else []))


BUCKET_COLUMNS = ("ppl", "high_ppl", "medium_ppl", "low_ppl", "tokens")


def bucket_table(runs: list[str]) -> list[str]:
    """Response perplexity on held-out records by training-frequency bucket (``eval.buckets`` with records in
    ``data.val_files``), where the runs have it."""
    from models.checkpoint import resolve_checkpoint

    rows = []
    for run in runs:
        metrics = json.loads((resolve_checkpoint(run) / "eval_results.json").read_text())["metrics"]
        if f"bucket/{BUCKET_COLUMNS[0]}" in metrics:
            cells = [metrics.get(f"bucket/{c}") for c in BUCKET_COLUMNS]
            rows.append(f"| {Path(run).name} | " + " | ".join("—" if v is None else f"{v:.4g}" for v in cells) + " |")
    if not rows:
        return []
    head = ["Response perplexity on held-out records, by frequency bucket of the training counts (high: the tokens of "
            "the first 80% of occurrences, medium: the next 15%, low: the last 5%):", "",
            "| run | " + " | ".join(BUCKET_COLUMNS) + " |", "|---" * (len(BUCKET_COLUMNS) + 1) + "|"]  # fmt: skip
    return head + rows


def _loss_name(ckpt: Path) -> str:
    from omegaconf import OmegaConf

    if not (ckpt / "config.yaml").is_file():  # an imported model, not trained here: the model before fine-tuning
        return "— (before fine-tuning)"
    loss = OmegaConf.load(ckpt / "config.yaml").loss
    return f"{loss.name}" + (f" (alpha {loss.alpha})" if loss.name == "pdl" else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("runs", nargs="+", help="run (or checkpoint) directories")
    parser.add_argument("--task", default="shakespeare_dialogue")
    parser.add_argument("--no-buckets", action="store_true", help="leave out the bucket perplexity table")
    args = parser.parse_args(argv)
    from models.checkpoint_files import CheckpointError

    try:
        print(table(args.runs, args.task, buckets=not args.no_buckets))
    except (CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
