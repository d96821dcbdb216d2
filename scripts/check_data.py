"""Check a run's data before any GPU time is spent: ``python scripts/check_data.py CONFIG [key=value ...]``
(or ``losslab check-data ...``).

Loads the config as training would, checks the tokenizer against the prepared data, the held-out files and
``data.mix`` against the domains present (a missing one is an error naming it unless
``data.mix_missing=renormalise``), and prints the mixture the run will get: each domain's tokens, its weight,
and how many times the run's planned tokens (``train.max_steps`` x the global batch) go over it. Builds no model
and needs no GPU. Exit 2, with one line naming the key or file, when the run would not start.
"""

from __future__ import annotations

import argparse
import json
import sys

import _bootstrap  # noqa: F401  (this checkout first on sys.path)

from data.mixture import describe
from data.shards import DataError, resolve_files
from data.source import build_source
from data.tokenizer import Tokenizer
from losslab.log import fail
from trainer.config import ConfigError, load_config


def planned_tokens(cfg) -> int:
    """Tokens the run trains on: ``max_steps`` x the global batch (a micro-batch per step on one rank if none)."""
    t = cfg.train
    per_step = t.global_batch_tokens or t.global_batch_size * cfg.data.seq_len
    return t.max_steps * (per_step or t.micro_batch_size * t.grad_accum * cfg.data.seq_len)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="experiment YAML, e.g. configs/experiments/paper/468m_mile.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, as for train.py")
    parser.add_argument("--json", action="store_true", help="print the mixture as JSON (as mixture.json holds it)")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        tokenizer = Tokenizer(cfg.data.tokenizer)
        build_source(cfg.data, tokenizer, batch_size=cfg.train.micro_batch_size, seed=0, rank=0, world_size=1)
        resolve_files(cfg.data.val_files)
        report = describe(cfg.data, planned_tokens=planned_tokens(cfg))
    except ConfigError as e:
        return fail(e, prefix="config error: ")
    except (DataError, FileNotFoundError) as e:
        return fail(e)
    if report is None:
        print("fine-tuning records: no domains to mix")
    elif args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        print(report.render())
        over = [d.name for d in report.domains if d.epochs and d.epochs > 1]
        if over:
            print(f"note: the run sees {', '.join(over)} more than once (epochs > 1); more shards would avoid it")
    matches = " matches the prepared data" if cfg.data.prepared else ""
    print(f"tokenizer {tokenizer.path} ({tokenizer.vocab_size} pieces){matches}; "
          f"{len(cfg.data.val_files)} held-out file(s) found")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
