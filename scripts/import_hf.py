"""Import a Hugging Face GPTNeoXForCausalLM / LlamaForCausalLM folder as a losslab checkpoint directory (usable
by evaluate.py, export_hf.py and ``model.init_from``):
``python scripts/import_hf.py --hf HF_DIR --out CKPT_DIR [--tokenizer SP.model | tokenizer.json]``."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run this checkout's code, never an installed copy

import argparse
import json
import shutil
from dataclasses import asdict

from safetensors.torch import save_file

from data.shards import DataError
from data.tokenizer import Tokenizer
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
    (out_dir / "model_config.json").write_text(json.dumps(asdict(model.cfg), indent=2))
    for name, src in tok.files.items():  # the tokenizer travels with the model, as in a training checkpoint
        shutil.copyfile(src, out_dir / name)
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2))
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
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
