"""What checksums cost a checkpoint's save, and why ``xxh3_128``: in one run,

- hash throughput of xxh3_128, blake2b and sha256 over the largest file of a real checkpoint (read back from the
  page cache, as the background hasher reads a file it has just written);
- ``save_checkpoint`` of a DeepSpeed engine (ZeRO-0, fp32 AdamW state, so the states file is 12 bytes per
  parameter and ``model.safetensors`` 4 more), with checksums and with the hashing taken out (the same code,
  DeepSpeed writing straight to its files and nothing hashed), alternating, ``--repeats`` of each; reported: the
  median save time of each, every time, and the difference.

    python scripts/bench_checkpoint.py --layers 12 --d-model 1024 --out /tmp/bench_ckpt
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import statistics
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import _bootstrap  # noqa: F401  (this checkout first on sys.path)
import torch
import xxhash

from losslab.losses import build_loss
from models import GPT, GPTConfig
from trainer import checkpoint, checkpoint_io
from trainer.config import DistributedSection, TrainSection
from trainer.engine import build_engine, build_optimizer, init_distributed
from trainer.objective import CausalLMObjective
from trainer.optim import build_scheduler, param_groups

HASHES: dict[str, Callable[[], object]] = {
    "xxh3_128": xxhash.xxh3_128,
    "blake2b": hashlib.blake2b,
    "sha256": hashlib.sha256,
}


def hash_file(path: Path, make: Callable[[], object]) -> float:
    """Seconds to hash ``path`` with ``make()`` (read in 16 MiB blocks into one buffer, as data.files does)."""
    h = make()
    buf = bytearray(16 << 20)
    view = memoryview(buf)
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            h.update(view[:n])  # type: ignore[attr-defined]
    return time.perf_counter() - start


class _NoDigests(checkpoint_io.FileDigests):
    def add(self, path: Path | str) -> None:
        self._jobs[str(Path(path).relative_to(self.root))] = self._pool.submit(str, "")


@contextmanager
def without_checksums():
    """The save's code as it is, its hashing taken out (the baseline): DeepSpeed writes through its own engine
    (plain ``torch.save`` to the path), nothing is hashed after writing."""
    saved = checkpoint.FileDigests, checkpoint.file_digest, checkpoint.HashingCheckpointEngine
    checkpoint.FileDigests, checkpoint.file_digest = _NoDigests, lambda path: ""
    checkpoint.HashingCheckpointEngine = lambda inner, errors, digests: inner
    try:
        yield
    finally:
        checkpoint.FileDigests, checkpoint.file_digest, checkpoint.HashingCheckpointEngine = saved


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--d-model", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="/tmp/bench_checkpoint", help="scratch directory (removed at the end)")
    args = parser.parse_args(argv)
    init_distributed()
    d = args.d_model
    cfg = GPTConfig(vocab_size=args.vocab, n_layers=args.layers, d_model=d, n_heads=d // 64, d_mlp=4 * d,
                    max_seq_len=64)  # fmt: skip
    train, layout = TrainSection(precision="fp32", micro_batch_size=1), DistributedSection(zero_stage=0)
    model = GPT(cfg)
    opt = build_optimizer(param_groups(model, train), train, layout)
    engine = build_engine(
        CausalLMObjective(model, build_loss({"name": "ce"})), opt, build_scheduler(opt, train), train, layout
    )
    batch = torch.randint(0, args.vocab, (1, 9))
    engine.backward(engine(batch).loss)
    engine.step()  # Adam's moments exist: the states file has its full size
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    print(f"model: {model.num_params() / 1e6:.0f}M parameters ({args.layers} x {d}, vocab {args.vocab}), ZeRO-0 fp32")

    def save(step: int) -> float:
        start = time.perf_counter()
        checkpoint.save_checkpoint(engine, out, step, meta={"step": step}, config_yaml="", model_cfg=cfg,
                                   tokenizer_files={}, keep=1)  # fmt: skip
        return time.perf_counter() - start

    save(1)  # warm-up: first-write costs (directory creation, page cache)
    times: dict[str, list[float]] = {"checksums": [], "none": []}
    for i in range(args.repeats):
        times["checksums"].append(save(2 + 2 * i))
        with without_checksums():
            times["none"].append(save(3 + 2 * i))
    ckpt = checkpoint_io.newest(out / "checkpoints")
    assert ckpt is not None
    sizes = {f.name: f.stat().st_size for f in ckpt.iterdir()}
    total = sum(sizes.values())
    largest = max(sizes, key=sizes.__getitem__)
    print(f"checkpoint: {total / 1e9:.2f} GB in {len(sizes)} files; largest {largest} {sizes[largest] / 1e9:.2f} GB")
    print("hash throughput over the largest file (page cache), best of 3:")
    for name, make in HASHES.items():
        best = min(hash_file(ckpt / largest, make) for _ in range(3))
        print(f"  {name:<9} {sizes[largest] / best / 1e9:6.2f} GB/s  ({best:.2f} s)")
    with_sums, without = statistics.median(times["checksums"]), statistics.median(times["none"])
    print(f"save_checkpoint, median of {args.repeats} (alternating):")
    each = {k: " ".join(f"{t:.2f}" for t in v) for k, v in times.items()}
    print(f"  with checksums    {with_sums:6.2f} s   {total / with_sums / 1e9:.2f} GB/s   (each: {each['checksums']})")
    print(f"  without           {without:6.2f} s   {total / without / 1e9:.2f} GB/s   (each: {each['none']})")
    print(f"  cost of checksums {with_sums - without:+6.2f} s ({(with_sums / without - 1) * 100:+.1f}%)")
    shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    from trainer.engine import exit_process

    exit_process(main())  # as scripts/train.py ends: no C++ teardown, where a gloo rank can abort after finishing
