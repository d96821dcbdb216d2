"""``losslab COMMAND [ARGS ...]``: one entry point that fronts the scripts in ``scripts/`` (each command runs
that script's ``main(argv)``; ``losslab COMMAND --help`` shows its options).

The framework is installed editable from a checkout (``pip install -e '.[framework]'``, as ``scripts/setup.sh``
does): the command finds the checkout through this file's location and runs its code. A copy of this package
installed any other way (a wheel: the loss library alone, ``losslab.losses`` and ``losslab.hf``) has no checkout
beside it and says so instead of importing unrelated ``data`` / ``trainer`` modules.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from losslab.log import fail

# command -> (module in scripts/, one-line summary)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("train", "train a model: losslab train CONFIG [key=value ...]"),
    "eval": ("evaluate", "evaluate a checkpoint with lm-eval and frequency-bucket perplexity"),
    "export": ("export_hf", "export a checkpoint as a Hugging Face transformers folder"),
    "verify": ("verify_checkpoint", "check a checkpoint's files against their checksums, without loading it"),
    "import": ("import_hf", "import a Hugging Face GPTNeoX / Llama folder as a losslab checkpoint"),
    "prepare": ("prepare_data", "pre-tokenise shards into memory-mapped files"),
    "compare": ("compare_runs", "compare run directories: plots, markdown and CSV"),
    "publish": ("publish_runs", "publish finished runs without their weights (pack), or rebuild them (restore)"),
    "wandb-report": ("wandb_report", "build a W&B comparison report of a study"),
    "tokenizer": ("train_tokenizer", "train a sentencepiece tokenizer from shards"),
    "fetch-eval-data": ("fetch_eval_data", "build local lm-eval tasks for offline machines"),
    "fetch-data": ("fetch_data", "download Pile-format shards from the Hugging Face Hub, resumably"),
    "fetch-tokenizer": ("fetch_tokenizer", "download the MiLe runs' LLaMA 32k tokenizer from the Hub"),
    "check-data": ("check_data", "check a run's data and print the domain mixture it will get, without a GPU"),
}
PACKAGES = ("data", "models", "trainer", "evals", "scripts")


def checkout_root() -> Path:
    """The source checkout this package belongs to (the folder above ``losslab/``)."""
    root = Path(__file__).resolve().parents[1]
    missing = [p for p in PACKAGES if not (root / p).is_dir()]
    if missing:
        raise SystemExit(
            fail(
                f"no source checkout at {root} (missing {', '.join(missing)}): losslab runs from a checkout; "
                "clone it and install it editable with `pip install -e 'CHECKOUT[framework]'` (an installed wheel is "
                "the loss library alone: from losslab.losses import build_loss)",
                prefix="losslab: ",
            )
        )
    return root


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    return (
        "usage: losslab COMMAND [ARGS ...]\n\ncommands:\n"
        + "\n".join(lines)
        + ("\n\n`losslab COMMAND --help` shows a command's options.")
    )


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        return fail(f"unknown command {command!r}; one of: {', '.join(COMMANDS)}", prefix="losslab: ")
    root = str(checkout_root())
    if sys.path[:1] != [root]:
        sys.path.insert(0, root)
    module = importlib.import_module(f"scripts.{COMMANDS[command][0]}")
    sys.argv = [f"losslab {command}", *rest]  # argparse's usage line names the command the user typed
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
