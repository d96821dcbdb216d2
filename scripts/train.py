"""Train a model: ``python scripts/train.py CONFIG [key=value ...]`` (one process) or
``deepspeed [--num_gpus N | --hostfile H] scripts/train.py CONFIG [key=value ...]`` (many)."""

from __future__ import annotations

import argparse
import errno
import os
import sys

import _bootstrap  # noqa: F401  (this checkout first on sys.path)

from data.shards import DataError
from losslab.log import fail, get_logger
from models.checkpoint_files import CheckpointError
from trainer.config import ConfigError, load_config

log = get_logger(__name__)

# Failures of the inputs, reported in one line (exit 2): everything that can be checked is checked before the
# first step, and what can only fail later (an unreadable checkpoint at resume) is reported the same way.
INPUT_ERRORS = (ConfigError, DataError, CheckpointError, FileNotFoundError, FileExistsError)
# The storage failing (a checkpoint that cannot be written is reported with the space it needs): one line, exit 2.
STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("config", nargs="?", help="experiment YAML, e.g. configs/experiments/demo.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=10")
    parser.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher")
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config (derived fields filled) and exit"
    )
    parser.add_argument(
        "--list", action="store_true", help="list presets, losses and their parameters, task sets, DeepSpeed layouts"
    )
    args = parser.parse_intermixed_args(argv)
    if args.list:
        print(choices_listing())
        return 0
    if args.config is None:
        parser.error("the experiment config is required (or --list)")
    try:
        cfg = load_config(args.config, args.overrides)
        _warn_about_schedule(cfg)
        if args.print_config:
            print(print_config(cfg), end="")
            return 0
        # resume=auto on a finished run, relaunched as it was: nothing to do, nothing touched
        from trainer.resume_check import finished_run

        if (done := finished_run(cfg)) is not None:
            if os.environ.get("RANK", "0") == "0":
                print(done)
            return 0
    except ConfigError as e:
        return fail(e, prefix="config error: ")
    # imported only to train: deepspeed writes to stdout when imported, and --print-config's output is YAML
    from trainer.engine import exit_process

    # An exception still propagates as a traceback (an unexpected failure), without leaving the process group: a
    # rank that failed mid-collective would wait there for peers that never come (torchtitan does the same).
    exit_process(_train(cfg))


def _train(cfg) -> int:
    """Train, and report the result (or the one line of what stopped it) as the command's output."""
    from trainer.checkpoint_io import CheckpointWriteError
    from trainer.engine import EngineSetupError
    from trainer.lock import RunDirBusy
    from trainer.loop import NonFiniteLossError, train

    try:
        result = train(cfg)
    except ConfigError as e:
        return fail(e, prefix="config error: ")
    except (*INPUT_ERRORS, EngineSetupError, RunDirBusy, CheckpointWriteError) as e:
        return fail(e)
    except OSError as e:
        if e.errno not in STORAGE_ERRNOS:
            raise
        return fail(e)  # storage failing outside a checkpoint (metrics.jsonl, result.json)
    except NonFiniteLossError as e:
        return fail(e, code=3)
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


def _warn_about_schedule(cfg) -> None:
    from trainer.optim import schedule_warning

    if (warning := schedule_warning(cfg.train)) and os.environ.get("RANK", "0") == "0":
        log.warning(warning)


def print_config(cfg) -> str:
    """The config a launch would run, as YAML that loads back to itself (the world size from the launcher's
    WORLD_SIZE, else 1)."""
    from trainer.callbacks import run_names
    from trainer.config import resolved, to_yaml

    out = resolved(cfg, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    out.run.name, out.wandb.group, _ = run_names(out)
    return to_yaml(out)


def choices_listing() -> str:
    from evals.task_sets import TASK_SETS
    from losslab.losses.settings import listing
    from models.config import BLOCKS
    from models.presets import PRESETS
    from trainer.config import CONFIG_ROOT

    lines = ["model.preset (layers x width, heads, MLP width per block, context):"]
    for name, p in PRESETS.items():
        mlp = f"MLP {p.d_mlp('neox')} (neox, GELU) / {p.d_mlp('llama')} (llama, SwiGLU)"
        lines.append(f"  {name:<6} {p.n_layers} x {p.d_model}, {p.n_heads} heads, {mlp}, {p.max_seq_len}")
    lines.append(f"model.block: {', '.join(BLOCKS)}")
    lines.extend(listing())  # each loss with its declared parameters, then the modifiers
    lines.append("eval.tasks sets: " + "; ".join(f"{k} = {', '.join(v)}" for k, v in TASK_SETS.items()))
    layouts = sorted(p.stem for p in (CONFIG_ROOT / "deepspeed").glob("*.yaml"))
    lines.append(f"distributed.preset: {', '.join(layouts)}")
    experiments = sorted(str(p.relative_to(CONFIG_ROOT.parent)) for p in (CONFIG_ROOT / "experiments").rglob("*.yaml"))
    lines.append("experiments:\n  " + "\n  ".join(experiments))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
