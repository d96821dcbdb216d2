from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from tests.corpus import documents

os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if not torch.cuda.is_available():
    # Triton kernels run in its interpreter on CPU tensors; it must be chosen before triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")


_cpu_adam_build: subprocess.Popen | None = None


def pytest_collection_finish(session: pytest.Session) -> None:
    """Where scripts/setup.sh did not compile DeepSpeedCPUAdam ahead of time (scripts/prebuild_cpu_adam.py: a
    machine with a GPU, a failed build), DeepSpeed JIT-compiles it at first use (~90 s on 2 cores, then cached in
    ~/.cache/torch_extensions): when a selected test will need it, start that build now, in the background at low
    priority, so that it overlaps the tests before it instead of stalling the first one that needs it (which
    waits on the build's own lock if it is still running)."""
    from scripts.prebuild_cpu_adam import op_installed

    global _cpu_adam_build
    if torch.cuda.is_available() or not any(item.get_closest_marker("cpu_adam") for item in session.items):
        return
    if op_installed():
        return
    if os.environ.get("PYTEST_XDIST_WORKER", "gw0") != "gw0":  # one build for all pytest-xdist workers
        return
    build = "from deepspeed.ops.op_builder import CPUAdamBuilder; CPUAdamBuilder().load(verbose=False)"
    _cpu_adam_build = subprocess.Popen(["nice", "-n", "10", sys.executable, "-c", build],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Files that hold tests marked ``slow`` go first, those with the most of them before the others. Under
    ``--dist loadfile`` a file is one unit of work, handed out in this order (scripts/test.sh turns off
    pytest-xdist's own order, by number of tests, which put these files of one or two long tests last: one worker
    then ran them alone while the other had nothing left)."""
    slow = Counter(path for path, _ in {(i.path, i.originalname) for i in items if i.get_closest_marker("slow")})
    items.sort(key=lambda item: -slow[item.path])  # stable: otherwise the collection's order


def pytest_sessionfinish(session: pytest.Session) -> None:
    if _cpu_adam_build is not None:  # never leave a half-written extension (or its lock) behind
        try:
            _cpu_adam_build.wait(timeout=900)
        except subprocess.TimeoutExpired:
            _cpu_adam_build.kill()


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


def flip(path: Path) -> None:
    """4 x 256 bytes inverted inside the file: the same size, so only a checksum can tell."""
    data = bytearray(path.read_bytes())
    for i in range(1, 5):
        at = len(data) * i // 5
        data[at : at + 256] = bytes(b ^ 0xFF for b in data[at : at + 256])
    path.write_bytes(bytes(data))


def relist(path: Path) -> None:
    """Make the checkpoint's ``meta.json`` agree with ``path`` as it is now (its size and checksum, and the meta's
    own checksum), as whoever replaced the file on purpose would."""
    import json

    from data.files import file_digest
    from models.checkpoint import DIGESTS, seal

    meta_file = path.parent / "meta.json"
    meta = json.loads(meta_file.read_text())
    meta["files"][path.name] = path.stat().st_size
    meta[DIGESTS][path.name] = file_digest(path)
    meta_file.write_text(json.dumps(seal(meta)))
