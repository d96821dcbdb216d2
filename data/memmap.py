"""The fast path: batches of packed windows read from the memory-mapped output of ``scripts/prepare_data.py``.

Every source's token stream is cut into windows of ``seq_len + 1`` tokens (lossless packing: documents are
already separated by EOS). Global sample ``g`` is assigned to a source by the deterministic ``Mixture``; the
source's ``i``-th sample is window ``perm_e(i mod n)`` of epoch ``e = i // n``, with a fresh seeded
permutation per epoch. Batch ``k`` of rank ``r`` holds global samples ``k*B*world + r*B + [0, B)``, so ranks
are disjoint, any batch can be read directly (``__getitem__(k)``), and the order is the same for any number
of dataloader workers: resuming needs only the number of global samples consumed (which also carries over
to another number of ranks with the same global batch).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from data.mixing import Mixture
from data.packing import Window
from data.permutation import Permutation
from data.prepare import MANIFEST
from data.shards import DataError, ReadStats

STREAM_FILES = {
    # per-token stream -> (file beside tokens.bin, dtype on disk, dtype in a batch)
    "loss_mask": ("loss_mask.bin", np.uint8, np.bool_),
    "weight": ("weight.bin", np.float32, np.float32),
    "ref_ce": ("ref_ce.bin", np.float32, np.float32),
}


class PreparedCorpus:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not (self.path / MANIFEST).is_file():
            raise DataError(f"no prepared data at {str(self.path)!r} (run scripts/prepare_data.py first)")
        self.manifest = json.loads((self.path / MANIFEST).read_text())
        self.dtype = np.dtype(self.manifest["dtype"])
        self.sources: dict[str, dict] = self.manifest["sources"]
        self.records = self.manifest.get("kind") == "records"
        """Fine-tuning records: a loss mask beside the tokens, and documents kept apart when packed."""

    def tokens_path(self, source: str) -> Path:
        return self.path / self.sources[source]["dir"] / "tokens.bin"

    def source_file(self, source: str, name: str) -> Path:
        return self.path / self.sources[source]["dir"] / name

    def streams(self, names: list[str]) -> list[str]:
        """The per-token streams (``STREAM_FILES``) that the sources ``names`` carry; all of them, or none."""
        held = {s: [self.source_file(n, STREAM_FILES[s][0]).is_file() for n in names] for s in STREAM_FILES}
        partial = [s for s, has in held.items() if any(has) and not all(has)]
        if partial:
            raise DataError(f"{self.path}: the streams {partial} exist for some of the sources {names} only")
        return [s for s, has in held.items() if all(has)]

    def stream_info(self, name: str) -> dict:
        """What a stream added after preparation records about itself (``streams`` in the manifest)."""
        return self.manifest.get("streams", {}).get(name, {})

    def token_counts(self, targets_only: bool = True) -> torch.Tensor:
        """Frequencies over every token, or (fine-tuning records, ``targets_only``) over those carrying loss."""
        name = "target_counts.npy" if targets_only and self.records else "token_counts.npy"
        return torch.from_numpy(np.load(self.path / name))


class MemmapBatches(Dataset):
    def __init__(
        self,
        corpus: PreparedCorpus,
        mix: dict[str, float],
        *,
        seq_len: int,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        unknown = sorted(set(mix) - set(corpus.sources))
        if unknown:
            raise DataError(f"data.mix names unknown sources {unknown}; available: {sorted(corpus.sources)}")
        weights = mix or {name: float(s["tokens"]) for name, s in corpus.sources.items()}
        self.names = [n for n in sorted(weights) if weights[n] > 0]
        self.window = seq_len + 1
        self.num_windows = [corpus.sources[n]["tokens"] // self.window for n in self.names]
        empty = [n for n, w in zip(self.names, self.num_windows, strict=True) if w == 0]
        if empty:
            raise DataError(f"sources {empty} hold fewer than {self.window} tokens (one window)")
        self.mixture = Mixture([weights[n] for n in self.names])
        self.paths = [str(corpus.tokens_path(n)) for n in self.names]
        self.records = corpus.records
        self.streams = corpus.streams(self.names)
        self.stream_paths = {
            s: [str(corpus.source_file(n, STREAM_FILES[s][0])) for n in self.names] for s in self.streams
        }
        for name in self.streams:  # a stream scored over windows of another length does not line up with these
            scored = corpus.stream_info(name).get("seq_len")
            if scored is not None and scored != seq_len:
                raise DataError(f"{corpus.path}: {name} was scored with seq_len={scored}, training uses {seq_len}")
        self.offsets = [np.load(corpus.source_file(n, "doc_offsets.npy")) for n in self.names] if self.records else []
        self.dtype = corpus.dtype
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self._maps: list[np.memmap] | None = None  # opened lazily in each worker (a memmap must not be pickled)
        self._streams: dict[str, list[np.memmap]] = {}
        self._perms: dict[tuple[int, int], Permutation] = {}

    def __len__(self) -> int:  # batches are indexed without end; DataLoader needs a length only for samplers
        return 2**62

    def _perm(self, source: int, epoch: int) -> Permutation:
        key = (source, epoch)
        if key not in self._perms:
            if len(self._perms) > 64:
                self._perms.clear()
            self._perms[key] = Permutation(self.num_windows[source], seed=[self.seed, source, epoch])
        return self._perms[key]

    def __getitem__(self, k: int) -> Window:
        if self._maps is None:
            self._maps = [np.memmap(p, dtype=self.dtype, mode="r") for p in self.paths]
            self._streams = {
                s: [np.memmap(p, dtype=STREAM_FILES[s][1], mode="r") for p in paths]
                for s, paths in self.stream_paths.items()
            }
        B = self.batch_size
        g = k * B * self.world_size + self.rank * B + np.arange(B)  # [B] global sample ids
        sources, local = self.mixture.locate(g)
        out = np.empty((B, self.window), dtype=np.int64)
        streams = {s: np.empty((B, self.window), dtype=STREAM_FILES[s][2]) for s in self.streams}
        segments = np.empty((B, self.window), dtype=np.int32)
        for row, (s, i) in enumerate(zip(sources.tolist(), local.tolist(), strict=True)):
            n = self.num_windows[s]
            w = int(self._perm(s, i // n)(i % n))
            span = slice(w * self.window, (w + 1) * self.window)
            out[row] = self._maps[s][span]
            for name, maps in self._streams.items():
                streams[name][row] = maps[s][span]
            if self.records:
                # each token's document, from the document offsets; numbered from 0 within the window
                doc = np.searchsorted(self.offsets[s], np.arange(span.start, span.stop), side="right")
                segments[row] = doc - doc[0]
        if not self.records and not self.streams:
            return torch.from_numpy(out)  # [B, T+1]
        batch = {"tokens": torch.from_numpy(out), **{k: torch.from_numpy(v) for k, v in streams.items()}}
        if self.records:
            batch["segments"] = torch.from_numpy(segments)
        return batch  # [B, T+1] each


class _CountFrom:
    """An endless sampler of batch indices, starting where a resumed run left off."""

    def __init__(self, start: int) -> None:
        self.start = start

    def __iter__(self) -> Iterator[int]:
        return itertools.count(self.start)


class MemmapSource:
    """Batch source over prepared data; ``num_workers`` dataloader processes read ahead."""

    def __init__(self, batches: MemmapBatches, corpus: PreparedCorpus, num_workers: int = 0) -> None:
        self.batches = batches
        self.num_workers = num_workers
        self.batches_consumed = 0
        # bad input was skipped and counted when the data were prepared
        self.stats = ReadStats(**corpus.manifest["read_stats"])
        self.files = [str(corpus.path)]

    @property
    def streams(self) -> tuple[str, ...]:
        """The per-token streams the batches carry beside the tokens."""
        return tuple(self.batches.streams)

    def state_dict(self) -> dict[str, int]:
        # in global samples, so a run can resume on another number of ranks with the same global batch
        return {"samples_consumed": self.batches_consumed * self.batches.batch_size * self.batches.world_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        per_batch = self.batches.batch_size * self.batches.world_size
        samples = int(state["samples_consumed"])
        if samples % per_batch:
            raise DataError(f"cannot resume at sample {samples} with {per_batch} samples per micro-step on all ranks")
        self.batches_consumed = samples // per_batch

    def __iter__(self) -> Iterator[torch.Tensor]:
        loader = DataLoader(
            self.batches,
            batch_size=None,
            sampler=_CountFrom(self.batches_consumed),
            num_workers=self.num_workers,
            persistent_workers=False,
        )
        for batch in loader:
            self.batches_consumed += 1
            yield batch
