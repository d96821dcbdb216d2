"""Score a prepared corpus with a reference model for Rho-1 (``loss.name=rho1``): its per-token cross-entropy is
written beside the tokens as the ``ref_ce`` stream, for the windows of ``--seq-len`` that training will read:
``python scripts/score_reference.py --checkpoint REF_RUN_OR_CKPT --prepared DIR --seq-len 128``.
Batched, with a progress bar, and resumable: run the same command again after an interruption."""

from __future__ import annotations

import argparse
import json
import sys

import _bootstrap  # noqa: F401  (this checkout first on sys.path)

from losslab.log import fail


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", required=True, help="the reference model: a checkpoint or run directory")
    parser.add_argument("--prepared", required=True, help="a directory written by prepare_data.py")
    parser.add_argument("--seq-len", type=int, required=True, help="data.seq_len of the runs that will train on it")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    args = parser.parse_args(argv)

    from data.shards import DataError
    from evals.reference import score_prepared
    from models.checkpoint_files import CheckpointError

    try:
        info = score_prepared(
            args.prepared, args.checkpoint, seq_len=args.seq_len, batch_size=args.batch_size, device=args.device
        )
    except (CheckpointError, DataError) as e:
        return fail(e)
    print(json.dumps({"ref_ce": info}, indent=2))
    return 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
