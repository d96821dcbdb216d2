"""Export a losslab checkpoint as a Hugging Face transformers folder (GPTNeoXForCausalLM or LlamaForCausalLM,
safetensors, config, tokenizer), e.g. for ``lm_eval --model hf --model_args pretrained=OUT``:
``python scripts/export_hf.py --checkpoint RUN_OR_CKPT_DIR --out OUT``."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import _bootstrap  # noqa: F401  (this checkout first on sys.path)

from data.files import follow_umask
from data.hf_tokenizer import to_hf_tokenizer
from data.tokenizer import Tokenizer
from losslab.log import fail
from models.checkpoint import CheckpointError, load_model
from models.hf import make_portable, to_hf_model


def export(checkpoint: str, out: str) -> Path:
    model, ckpt = load_model(checkpoint)
    tok = Tokenizer(ckpt)  # the checkpoint's own: a sentencepiece .model or a tokenizer.json
    if tok.vocab_size != model.cfg.vocab_size:  # a checkpoint's tokenizer is the one it was trained with
        raise CheckpointError(
            f"{tok.path} has {tok.vocab_size} tokens but the model's vocabulary is {model.cfg.vocab_size}: "
            "not the tokenizer this checkpoint was trained with"
        )
    hf_model = to_hf_model(model, bos_id=tok.bos_id if tok.bos_id >= 0 else None, eos_id=tok.eos_id)
    out_dir = Path(out)
    hf_model.save_pretrained(out_dir, safe_serialization=True)
    if "tokenizer.model" in tok.files:  # sentencepiece: a fast tokenizer that encodes exactly like it
        to_hf_tokenizer(tok.path).save_pretrained(out_dir)
    for name, src in tok.files.items():  # tokenizer.json (+ config, chat template) as is; tokenizer.model for
        shutil.copyfile(src, out_dir / name)  # the reverse import
    make_portable(out_dir, model.cfg)  # loadable by transformers 4.44+ and 5.x alike
    for weights in out_dir.glob("*.safetensors"):  # safetensors writes 0600 whatever the umask
        follow_umask(weights)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    try:
        out = export(args.checkpoint, args.out)
    except (CheckpointError, FileNotFoundError, ValueError, ImportError) as e:
        return fail(e)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
