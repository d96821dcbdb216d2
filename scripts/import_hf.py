"""Import a Hugging Face GPTNeoXForCausalLM / LlamaForCausalLM folder as a losslab checkpoint directory (usable
by evaluate.py, export_hf.py and ``model.init_from``):
``python scripts/import_hf.py --hf HF_DIR --out CKPT_DIR [--tokenizer SP.model | tokenizer.json]``."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

import _bootstrap  # noqa: F401  (this checkout first on sys.path)
from safetensors.torch import save_file

from data.files import follow_umask
from data.shards import DataError
from data.tokenizer import Tokenizer
from losslab.log import fail
from models.checkpoint import META, describe_files, seal
from models.checkpoint_files import CheckpointError
from models.gpt import GPT
from models.hf import load_hf_folder


def import_hf(hf_dir: str, out: str, tokenizer: str = "") -> Path:
    model = load_hf_folder(hf_dir)
    try:  # the folder's own tokenizer (tokenizer.model, else tokenizer.json) unless another is given
        tok = Tokenizer(tokenizer or hf_dir)
    except DataError as e:
        raise FileNotFoundError(f"{e}; pass --tokenizer") from None
    return write_model_dir(model, tok, Path(out), {"step": 0, "tokens": 0, "imported_from": str(hf_dir)})


def write_model_dir(model: GPT, tok: Tokenizer, out_dir: Path, meta: dict) -> Path:
    """A checkpoint directory that ``models.checkpoint.load_model`` reads: weights, model config, the tokenizer's
    files and ``meta`` (no optimizer state)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out_dir / "model.safetensors"))
    follow_umask(out_dir / "model.safetensors")  # safetensors writes 0600 whatever the umask
    (out_dir / "model_config.json").write_text(json.dumps(asdict(model.cfg), indent=2))
    for name, src in tok.files.items():  # the tokenizer travels with the model, as in a training checkpoint
        shutil.copyfile(src, out_dir / name)
    meta = {**meta, **describe_files(out_dir)}
    (out_dir / META).write_text(json.dumps(seal(meta), indent=2))  # with every file's checksum
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hf", required=True, help="a transformers model folder (safetensors weights)")
    parser.add_argument("--out", required=True)
    parser.add_argument(
        "--tokenizer", default="", help="sentencepiece .model, tokenizer.json or a folder of either (default: HF_DIR)"
    )
    args = parser.parse_args(argv)
    try:
        out = import_hf(args.hf, args.out, args.tokenizer)
    except (CheckpointError, FileNotFoundError, ValueError, OSError, ImportError) as e:
        return fail(e)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
