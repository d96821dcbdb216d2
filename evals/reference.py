"""A reference model's per-token cross-entropy, written into a prepared corpus as the ``ref_ce`` stream (Rho-1).

Training reads windows of ``seq_len + 1`` tokens at multiples of ``seq_len + 1`` in each source's token file, and
token ``i`` of a window is predicted from tokens ``0..i-1`` of the same window. Scoring uses exactly those
windows, so ``ref_ce[t]`` is the reference's loss on token ``t`` in the context the trained model sees it in; the
first token of each window has no prediction (0). The stream is only valid for that ``seq_len``: the manifest
records it and training refuses another. Scoring is batched, shows progress, and resumes where it stopped
(``ref_ce.bin.partial`` plus a progress file, flushed every few batches).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from data.memmap import STREAM_FILES, PreparedCorpus
from data.prepare import MANIFEST
from data.shards import DataError
from evals.buckets import per_token_loss
from models.checkpoint import META, load_model
from models.checkpoint_files import load_json

STREAM = "ref_ce"


def score_prepared(
    prepared: str | Path,
    checkpoint: str | Path,
    *,
    seq_len: int,
    batch_size: int = 16,
    device: str = "cpu",
    flush_every: int = 8,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Write ``ref_ce.bin`` beside every source's ``tokens.bin``; returns the stream's manifest entry."""
    corpus = PreparedCorpus(prepared)
    model, ckpt = load_model(checkpoint, device=device)
    _check_same_tokenizer(corpus, ckpt, model.cfg.vocab_size)
    if seq_len > model.cfg.max_seq_len:
        raise DataError(f"seq_len={seq_len} exceeds the reference model's context ({model.cfg.max_seq_len})")
    window = seq_len + 1
    info = {"seq_len": seq_len, "checkpoint": str(ckpt), "step": load_json(ckpt / META).get("step")}
    for name in sorted(corpus.sources):
        _score_source(corpus, name, model, window, info, batch_size, flush_every, show_progress)
    manifest = json.loads((corpus.path / MANIFEST).read_text())
    manifest.setdefault("streams", {})[STREAM] = info
    tmp = corpus.path / f".{MANIFEST}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, corpus.path / MANIFEST)
    return info


def _check_same_tokenizer(corpus: PreparedCorpus, ckpt: Path, vocab_size: int) -> None:
    if corpus.manifest["vocab_size"] != vocab_size:
        raise DataError(
            f"the reference {ckpt} has a vocabulary of {vocab_size}, the corpus {corpus.path} of "
            f"{corpus.manifest['vocab_size']}: they must share the tokenizer"
        )
    trained_with = load_json(ckpt / META).get("tokenizer_sha256")
    prepared_with = corpus.manifest["fingerprint"]["tokenizer_sha256"]
    if trained_with and trained_with != prepared_with:
        raise DataError(f"the reference {ckpt} was trained with another tokenizer than {corpus.path} was prepared with")


def _score_source(
    corpus: PreparedCorpus,
    name: str,
    model: Any,
    window: int,
    info: dict[str, Any],
    batch_size: int,
    flush_every: int,
    show_progress: bool,
) -> None:
    out_path = corpus.source_file(name, STREAM_FILES[STREAM][0])
    partial = out_path.with_name(out_path.name + ".partial")
    progress_file = out_path.with_name(STREAM + ".progress.json")
    tokens = np.memmap(corpus.tokens_path(name), dtype=corpus.dtype, mode="r")
    n_windows = len(tokens) // window
    done = 0
    if partial.is_file() and progress_file.is_file():  # resume a scoring that stopped
        state = json.loads(progress_file.read_text())
        if {k: state.get(k) for k in ("seq_len", "checkpoint")} == {k: info[k] for k in ("seq_len", "checkpoint")}:
            # from the batch boundary an uninterrupted run would have: every batch then holds the same windows,
            # hence the same numbers bit for bit (a matmul's rounding can depend on its number of rows)
            done = int(state["windows_done"]) // batch_size * batch_size
    if done == 0:
        np.zeros(len(tokens), dtype=np.float32).tofile(partial)
    out = np.memmap(partial, dtype=np.float32, mode="r+")
    bar = tqdm(total=n_windows, initial=done, unit="window", desc=f"scoring {name}", disable=not show_progress)
    for i, start in enumerate(range(done, n_windows, batch_size)):
        stop = min(start + batch_size, n_windows)
        windows = torch.from_numpy(tokens[start * window : stop * window].astype(np.int64)).view(-1, window)
        with torch.no_grad():
            loss, _ = per_token_loss(model, windows, batch_size=batch_size)  # [n * (window - 1)]
        scores = out[start * window : stop * window].reshape(-1, window)  # a view: writes go to the file
        scores[:, 1:] = loss.view(-1, window - 1).numpy()
        bar.update(stop - start)
        if (i + 1) % flush_every == 0 or stop == n_windows:
            out.flush()
            progress_file.write_text(json.dumps({**info, "windows_done": stop}))
    bar.close()
    out.flush()
    del out
    os.replace(partial, out_path)
    progress_file.unlink(missing_ok=True)
