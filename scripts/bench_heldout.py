"""Held-out loss speed (forward only): the held-out set of a checkpoint scored the way ``evals/runner.py`` does, each
batch cut to its longest row (right-padded fine-tuning records), against every row at the set's full width (how it
was scored before issue #33), with the same numbers checked:

    python scripts/bench_heldout.py --checkpoint CKPT --val-files corpus/dialogue/val.jsonl --val-records \\
        --val-tokens 2000 --batch-size 8

Prints one JSON line per mode: forwarded tokens/s, scored (target) tokens/s, seconds, and the largest
difference of the per-token losses between the two modes. Compare with training's ``tokens_per_s``
(``metrics.jsonl``) of a run of the same model on the same machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import _bootstrap  # noqa: F401  (this checkout first on sys.path)
import torch

from losslab.log import fail


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--val-files", nargs="+", required=True)
    parser.add_argument("--val-records", action="store_true")
    parser.add_argument("--val-tokens", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=0, help="window (documents) / cut (records); 0: the model's")
    args = parser.parse_args(argv)

    from data.shards import DataError
    from evals.buckets import per_token_loss
    from evals.heldout import SampleSpec, pack, sample_held_out
    from models.checkpoint import checkpoint_tokenizer, load_model
    from models.checkpoint_files import CheckpointError

    try:
        model, ckpt = load_model(args.checkpoint)
        tokenizer = checkpoint_tokenizer(ckpt, model.cfg)
        held, pieces = sample_held_out(args.val_files, tokenizer, args.seq_len or model.cfg.max_seq_len,
                                       SampleSpec(tokens=args.val_tokens), records=args.val_records)  # fmt: skip
    except (CheckpointError, DataError, FileNotFoundError, ValueError) as e:
        return fail(e)
    inputs = pack(held, pieces, tokenizer.eos_id)
    model.eval()
    scored = int(inputs.scored[:, 1:].sum()) if inputs.scored is not None else inputs.windows[:, 1:].numel()
    lengths = (inputs.document >= 0).sum(1)  # [n]
    results = {}
    for mode, lens in (("full width (before)", None), ("cut to each batch's longest row (now)", lengths)):
        start = time.perf_counter()
        loss, _ = per_token_loss(model, inputs.windows, batch_size=args.batch_size, lengths=lens)
        seconds = time.perf_counter() - start
        n, width = inputs.windows.shape
        forwarded = n * (width - 1) if lens is None else _forwarded(lens, args.batch_size)
        results[mode] = loss
        print(json.dumps({"mode": mode, "rows": n, "width": width, "forwarded_tokens": forwarded,
                          "scored_tokens": scored, "seconds": round(seconds, 2),
                          "forwarded_tokens_per_s": round(forwarded / seconds, 1),
                          "scored_tokens_per_s": round(scored / seconds, 1),
                          "threads": torch.get_num_threads()}))  # fmt: skip
    keep = inputs.scored[:, 1:].reshape(-1) if inputs.scored is not None else slice(None)
    before, now = (results[m][keep] for m in results)
    print(json.dumps({"max_abs_loss_difference": float((before - now).abs().max())}))
    return 0


def _forwarded(lengths: torch.Tensor, batch_size: int) -> int:
    """Tokens the model reads when each batch (rows longest first) is cut to its longest row."""
    ordered = torch.sort(lengths, descending=True, stable=True).values
    return sum(int(ordered[s]) - 1 for s in range(0, len(ordered), batch_size) for _ in ordered[s : s + batch_size])


if __name__ == "__main__":
    sys.exit(main())
