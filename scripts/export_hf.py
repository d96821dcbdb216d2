"""Export a losslab checkpoint as a Hugging Face transformers folder (GPTNeoXForCausalLM or LlamaForCausalLM,
safetensors, config, tokenizer), e.g. for ``lm_eval --model hf --model_args pretrained=OUT``:
``python scripts/export_hf.py --checkpoint RUN_OR_CKPT_DIR --out OUT``."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from data.hf_tokenizer import to_hf_tokenizer
from data.tokenizer import Tokenizer
from models.hf import to_hf_model
from trainer.checkpoint import load_model


def export(checkpoint: str, out: str) -> Path:
    model, ckpt = load_model(checkpoint)
    sp = Tokenizer(str(ckpt / "tokenizer.model"))
    hf_model = to_hf_model(model, bos_id=sp.bos_id if sp.bos_id >= 0 else None, eos_id=sp.eos_id)
    out_dir = Path(out)
    hf_model.save_pretrained(out_dir, safe_serialization=True)
    to_hf_tokenizer(str(ckpt / "tokenizer.model")).save_pretrained(out_dir)
    shutil.copyfile(ckpt / "tokenizer.model", out_dir / "tokenizer.model")  # for the reverse import
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    try:
        out = export(args.checkpoint, args.out)
    except (FileNotFoundError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
