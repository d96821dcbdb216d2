"""Import a Hugging Face GPTNeoXForCausalLM / LlamaForCausalLM folder as a losslab checkpoint directory (usable
by evaluate.py, export_hf.py and ``model.init_from``):
``python scripts/import_hf.py --hf HF_DIR --out CKPT_DIR [--tokenizer SP.model]``."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

from safetensors.torch import save_file

from models.hf import from_hf_model


def import_hf(hf_dir: str, out: str, tokenizer: str = "") -> Path:
    import transformers

    hf_model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype="float32")
    model = from_hf_model(hf_model)
    sp_model = Path(tokenizer) if tokenizer else Path(hf_dir) / "tokenizer.model"
    if not sp_model.is_file():
        raise FileNotFoundError(f"no sentencepiece model at {str(sp_model)!r}; pass --tokenizer")
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out_dir / "model.safetensors"))
    (out_dir / "model_config.json").write_text(json.dumps(asdict(model.cfg), indent=2))
    shutil.copyfile(sp_model, out_dir / "tokenizer.model")
    (out_dir / "meta.json").write_text(json.dumps({"step": 0, "tokens": 0, "imported_from": str(hf_dir)}, indent=2))
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hf", required=True, help="a transformers model folder")
    parser.add_argument("--out", required=True)
    parser.add_argument("--tokenizer", default="", help="sentencepiece .model (default: HF_DIR/tokenizer.model)")
    args = parser.parse_args(argv)
    try:
        out = import_hf(args.hf, args.out, args.tokenizer)
    except (FileNotFoundError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
