"""Evaluate a checkpoint with lm-eval and/or rare-token perplexity:
``python scripts/evaluate.py --checkpoint RUN_OR_CKPT_DIR --tasks paper [--task-dir DIR] [--num-fewshot 0 5]
[--val-files 'held_out/*.jsonl.zst' [--bucket-files 'train/*.jsonl.zst']]``. Task sets: paper, quick
(evals/task_sets.py). Writes ``CKPT/evals/<settings>/eval_results.json`` (with ``eval_samples.json`` and
``eval_held_out.json``): a folder per evaluation setting (tasks, few-shot, limit, lm-eval version, held-out set),
so another setting never overwrites training's evaluation; the same setting again replaces its folder.

``--watch RUN_DIR`` evaluates each of a run's checkpoints as it lands, until the run finishes (evals/watch.py);
without ``--tasks`` it takes the run's own ``eval`` settings."""

from __future__ import annotations

import argparse
import json
import sys

import _bootstrap  # noqa: F401  (this checkout first on sys.path)

from losslab.log import fail


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--checkpoint", help="a checkpoint dir, or a run dir (latest checkpoint)")
    target.add_argument("--watch", metavar="RUN_DIR", help="evaluate each checkpoint of a run as it lands")
    parser.add_argument("--tasks", default="", help="comma-separated lm-eval task names or sets (paper, quick)")
    parser.add_argument("--task-dir", default="", help="directory of local task YAMLs (offline use)")
    parser.add_argument("--num-fewshot", type=int, nargs="+", default=[0], help="one run per value, e.g. 0 5")
    parser.add_argument("--val-files", nargs="*", default=[], help="held-out shards for frequency-bucket loss")
    parser.add_argument("--val-records", action="store_true",
                        help="--val-files hold fine-tuning records: score the responses")  # fmt: skip
    parser.add_argument("--val-tokens", type=int, default=200_000)
    parser.add_argument("--bucket-files", nargs="*", default=[],
                        help="count tokens of these files to define the frequency buckets (default: the checkpoint's "
                        "training counts; without either, held-out loss without buckets)")  # fmt: skip
    parser.add_argument("--limit", type=int, default=0, help="documents per task (0: all)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"], help="auto: bf16 on CUDA")
    parser.add_argument("--offline", action="store_true", help="never contact the hub (implied by --task-dir)")
    parser.add_argument("--interval", type=float, default=60.0, help="--watch: seconds between looks for checkpoints")
    parser.add_argument("--wandb", default="", choices=["", "online", "offline", "disabled"],
                        help="--watch: W&B mode (default: the run's wandb.mode)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.watch:
        return _watch(args)

    from data.shards import DataError
    from evals.runner import evaluate_checkpoint
    from models.checkpoint_files import CheckpointError

    try:
        summary = evaluate_checkpoint(
            args.checkpoint,
            [t for t in args.tasks.split(",") if t],
            task_dir=args.task_dir,
            num_fewshot=args.num_fewshot,
            limit=args.limit,
            batch_size=args.batch_size,
            device=args.device,
            offline=True if args.offline else None,
            val_files=args.val_files,
            val_tokens=args.val_tokens,
            val_records=args.val_records,
            precision=args.precision,
            bucket_files=args.bucket_files,
        )
    except (CheckpointError, DataError, FileNotFoundError, ValueError, KeyError) as e:
        return fail(e)
    print(json.dumps(summary["metrics"], indent=2))
    print(f"results: {summary['path']}")
    return 0


def _watch(args: argparse.Namespace) -> int:
    from pathlib import Path

    from data.shards import DataError
    from evals.watch import WatchSettings, watch
    from models.checkpoint_files import CheckpointError

    given = WatchSettings(tasks=[t for t in args.tasks.split(",") if t], task_dir=args.task_dir,
                          num_fewshot=args.num_fewshot, limit=args.limit, batch_size=args.batch_size,
                          device=args.device, precision=args.precision, val_files=args.val_files,
                          val_tokens=args.val_tokens, val_records=args.val_records, bucket_files=args.bucket_files,
                          interval=args.interval,
                          wandb=args.wandb, run_eval=not args.tasks)  # fmt: skip
    run_dir = Path(args.watch)
    try:
        watch(run_dir, given)
    except (CheckpointError, DataError, FileNotFoundError, ValueError, KeyError) as e:
        return fail(e)
    except KeyboardInterrupt:
        print(f"stopped: what is evaluated is recorded in {run_dir}/eval_watch; run again to go on", file=sys.stderr)
        return 130
    return 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
