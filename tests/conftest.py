from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.corpus import documents

os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if not torch.cuda.is_available():
    # Triton kernels run in its interpreter on CPU tensors; it must be chosen before triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> dict[str, str]:
    """Two training shards, a validation shard and a real sentencepiece model trained on them."""
    from data.shards import write_shard
    from data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("corpus")
    train = documents(240, seed=0)
    write_shard(str(root / "train_00.jsonl.zst"), train[:120])
    write_shard(str(root / "train_01.jsonl.zst"), train[120:])
    write_shard(str(root / "val.jsonl.zst"), documents(20, seed=1))
    model = train_tokenizer((d["text"] for d in train), str(root / "tok"), vocab_size=384, num_threads=1)
    return {
        "dir": str(root),
        "train_glob": str(root / "train_*.jsonl.zst"),
        "val": str(root / "val.jsonl.zst"),
        "tokenizer": model,
    }


@pytest.fixture(scope="session")
def dist_env():
    """One process group for the whole pytest process (DeepSpeed caches groups; never re-create them)."""
    from trainer.engine import init_distributed

    return init_distributed()


def debug_overrides(corpus: dict[str, str], run_dir: Path, **extra) -> list[str]:
    """key=value overrides for a seconds-long debug run on the test corpus."""
    base = {
        "run.dir": str(run_dir),
        "model.preset": "debug",
        "data.train_files": f"[{corpus['train_glob']}]",
        "data.val_files": f"[{corpus['val']}]",
        "data.tokenizer": corpus["tokenizer"],
        "data.seq_len": 32,
        "train.micro_batch_size": 8,
        "train.max_steps": 30,
        "train.lr": 3e-3,
        "train.warmup_steps": 5,
        "train.log_every": 5,
        "wandb.mode": "disabled",
        # the demo config's eval task lives in the demo's corpus, which a fresh clone does not have
        "eval.tasks": "[]",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]
