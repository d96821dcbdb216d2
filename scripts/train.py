"""Train a model: ``python scripts/train.py CONFIG [key=value ...]`` (one process) or
``deepspeed [--num_gpus N | --hostfile H] scripts/train.py CONFIG [key=value ...]`` (many)."""

from __future__ import annotations

import argparse
import sys

from data.shards import DataError
from trainer.checkpoint import CheckpointError
from trainer.config import ConfigError, load_config
from trainer.engine import EngineSetupError
from trainer.loop import NonFiniteLossError, train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("config", help="experiment YAML, e.g. configs/experiments/demo.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=10")
    parser.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher")
    args = parser.parse_intermixed_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    try:
        result = train(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except (DataError, FileNotFoundError, FileExistsError, CheckpointError, EngineSetupError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    import torch.distributed as dist

    if dist.get_rank() == 0 and result.preempted:
        print(f"pre-empted after step {result.steps}; resume with train.resume=auto (checkpoint {result.checkpoint})")
        return 0
    if dist.get_rank() == 0:
        print(f"final training loss: {result.final_loss:.4f} after {result.steps} steps ({result.tokens} tokens)")
        print(f"checkpoint: {result.checkpoint or 'none (checkpoint.at_end=false)'}")
        if result.eval is not None:
            for key, value in sorted(result.eval["metrics"].items()):
                if not key.endswith(("_stderr", "sample_len", "_tokens", "_loss", "/loss", "/tokens")):
                    print(f"eval {key}: {value:.4f}")
        print(f"run directory: {result.run_dir.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
