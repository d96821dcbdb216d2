"""The read side of losslab checkpoints, with no DeepSpeed import: layout, file checks, and rebuilding the model and
its tokenizer from a checkpoint's own files. Evaluation, export, import, comparison and ``model.init_from`` read
checkpoints through this module; writing and resuming (DeepSpeed's state) live in ``trainer/checkpoint.py``.

Layout: ``RUN_DIR/checkpoints/step_0000300/{model.safetensors, config.yaml, model_config.json, tokenizer files,
meta.json, rng_rank<r>.json, <DeepSpeed files>}`` and ``RUN_DIR/checkpoints/latest`` (the newest tag). A
checkpoint is complete when its ``meta.json`` (written last) is in place.

Integrity: ``meta.json`` lists every file with its size and its checksum (``data.files.DIGEST``), and carries a
checksum of its own content. Every reader checks the files it reads before reading them (``verify_files``):
resuming all of them, evaluation, export, ``model.init_from`` and reference models the model's own
(``model_files``), so a flipped byte is one line naming the file instead of a model trained or scored on
garbage. A checkpoint written before checksums existed is read with a warning that it is unverified.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from data.files import DIGEST, file_digest, text_digest
from data.tokenizer import Tokenizer
from losslab.log import get_logger
from models.checkpoint_files import CheckpointError, load_json, load_safetensors
from models.config import GPTConfig
from models.gpt import GPT

log = get_logger(__name__)

CHECKPOINTS = "checkpoints"
META = "meta.json"
LATEST = "latest"
COUNTS_FILE = "token_counts.safetensors"
PORTABLE_FILE = "optimizer_full.safetensors"
DIGESTS = "digests"
"""meta.json: {file: its ``DIGEST``}, for every file listed under ``files``."""
PUBLISHED_RECORD = "published_record.json"
"""In a run directory restored from a published record (``evals/published_runs.py``): its checkpoints hold their
evaluations, configs, tokenizer and counts, not their weights or training state."""
SEAL = "meta_digest"
"""meta.json: the ``DIGEST`` of meta.json's other keys (``seal``), so an edited or damaged meta.json is caught too."""


def step_tag(step: int) -> str:
    return f"step_{step:07d}"


def seal(meta: dict[str, Any]) -> dict[str, Any]:
    """``meta`` with its own checksum (``SEAL``): of its canonical JSON, which a JSON round trip preserves."""
    body = {k: v for k, v in meta.items() if k != SEAL}
    return {**body, SEAL: text_digest(json.dumps(body, sort_keys=True))}


def describe_files(folder: Path) -> dict[str, Any]:
    """meta.json's file list for a checkpoint written in one process (``import_hf.py``): every file's size and
    checksum. (Training's checkpoints hash their files while they are written: ``trainer/checkpoint_io.py``.)"""
    files = sorted(f for f in folder.rglob("*") if f.is_file() and f.name != META)
    names = [str(f.relative_to(folder)) for f in files]
    return {
        "files": {n: f.stat().st_size for n, f in zip(names, files, strict=True)},
        DIGESTS: {n: file_digest(f) for n, f in zip(names, files, strict=True)},
        "digest": DIGEST,
    }


def read_meta(ckpt: Path) -> dict[str, Any]:
    """The checkpoint's ``meta.json``, refused when its content is not what it was written with."""
    meta = load_json(ckpt / META)
    if not isinstance(meta, dict):
        raise CheckpointError(f"{ckpt / META}: not a checkpoint's meta (a JSON object)")
    if SEAL in meta and seal(meta)[SEAL] != meta[SEAL]:
        raise CheckpointError(f"{ckpt / META}: its content does not match the checksum it was written with (corrupted)")
    return meta


def training_state(name: str) -> bool:
    """Files read only to resume training: DeepSpeed's state, the RNG states, the layout-free optimizer."""
    return name.endswith(".pt") or name.startswith(("rng_rank", "offloaded_tensors/")) or name == PORTABLE_FILE


def model_files(meta: dict[str, Any]) -> list[str]:
    """The files that define the model without its training state: weights, configs, tokenizer, token counts."""
    return [name for name in meta.get("files") or {} if not training_state(name)]


def file_problems(ckpt: Path, meta: dict[str, Any], names: list[str] | None = None) -> list[str]:
    """One line for each of the checkpoint's files (all, or ``names``) that is missing, has another size, or
    (where the checkpoint records checksums) another content than it was written with."""
    listed = meta.get("files") or {}
    digests = meta.get(DIGESTS)
    problems = []
    for name in listed if names is None else [n for n in names if n in listed]:
        path = ckpt / name
        if not path.is_file():
            problems.append(f"{path}: missing ({_why_missing(ckpt)})")
        elif path.stat().st_size != listed[name]:
            problems.append(
                f"{path}: {path.stat().st_size} bytes, but it was written with {listed[name]} (truncated or replaced)"
            )
        elif digests is not None:
            if name not in digests:
                problems.append(f"{path}: no checksum recorded for it in {META} (the file list was edited)")
                continue
            try:
                found = file_digest(path)
            except OSError as e:
                problems.append(f"{path}: unreadable: {e}")
                continue
            if found != digests[name]:
                problems.append(
                    f"{path}: its content does not match the checksum it was written with (corrupted; {DIGEST} "
                    f"{found}, written {digests[name]})"
                )
    return problems


def _why_missing(ckpt: Path) -> str:
    if (ckpt.parent.parent / PUBLISHED_RECORD).is_file():
        return (
            f"the run was restored from a published record ({PUBLISHED_RECORD}), which keeps its evaluations, not its "
            "weights or training state: train the run again to have them"
        )
    return "the checkpoint was written with it"


def verified(meta: dict[str, Any]) -> bool:
    """The checkpoint records checksums (written since they exist)."""
    return meta.get(DIGESTS) is not None


_warned_unverified: set[Path] = set()


def warn_unverified(ckpt: Path, meta: dict[str, Any]) -> None:
    """Once per checkpoint: it predates checksums, so only its files' sizes could be checked (or, before the
    file list, nothing)."""
    if ckpt not in _warned_unverified:
        _warned_unverified.add(ckpt)
        checked = "only their sizes were checked" if meta.get("files") else "it lists none of them"
        log.warning(
            f"warning: {ckpt} was written before checkpoints carried checksums: its files are unverified ({checked})"
        )


def verify_files(ckpt: Path, names: list[str] | None = None) -> dict[str, Any]:
    """The checkpoint's meta, after checking that its files (all, or ``names``) are there with the sizes and
    the content they were written with; the first damaged file is one ``CheckpointError`` line. A checkpoint
    written before checksums is checked for sizes (with a warning), one written before the file list not at
    all."""
    meta = read_meta(ckpt)
    problems = file_problems(ckpt, meta, names)
    if problems:
        more = f" (and {len(problems) - 1} more damaged file(s); `losslab verify {ckpt}` lists them)"
        raise CheckpointError(problems[0] + (more if len(problems) > 1 else ""))
    if not verified(meta):
        warn_unverified(ckpt, meta)
    return meta


def verify_model_files(ckpt: Path) -> dict[str, Any]:
    """``verify_files`` over the files that define the model (what evaluation, export and ``init_from`` read)."""
    return verify_files(ckpt, model_files(read_meta(ckpt)))


def complete_checkpoints(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("step_*") if (p / META).is_file())


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run directory, or None."""
    root = run_dir / CHECKPOINTS
    if (root / LATEST).is_file():
        named = root / (root / LATEST).read_text().strip()
        if (named / META).is_file():
            return named
    found = complete_checkpoints(root) if root.is_dir() else []
    return found[-1] if found else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory (its latest complete checkpoint)."""
    p = Path(path)
    if (p / META).is_file():
        return p
    found = latest_checkpoint(p)
    if found is None:
        raise CheckpointError(f"no complete checkpoint at {str(p)!r} (expected {META} in a step_* directory)")
    return found


def check_model_fits(ckpt: Path, model_cfg: GPTConfig, what: str) -> None:
    """Refuse, before loading any tensor, a checkpoint whose model is not this run's model."""
    saved = asdict(saved_model_config(ckpt))
    mine = asdict(model_cfg)
    diff = {k: (saved.get(k), v) for k, v in mine.items() if saved.get(k) != v}
    if diff:
        shown = ", ".join(f"{k}: checkpoint {a!r} vs this run {b!r}" for k, (a, b) in sorted(diff.items()))
        raise CheckpointError(f"{what} {ckpt} holds another model ({shown})")


def saved_model_config(ckpt: Path) -> GPTConfig:
    """The checkpoint's model config; fields added since it was written take their defaults."""
    path = ckpt / "model_config.json"
    try:
        return GPTConfig(**load_json(path))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: not a model config this losslab can build: {e}") from None


def checkpoint_tokenizer(ckpt: Path, model_cfg: GPTConfig) -> Tokenizer:
    """The tokenizer saved with a checkpoint, refused when its vocabulary is not the model's (a model read
    with another tokenizer scores at chance, and nothing else would say so)."""
    tokenizer = Tokenizer(ckpt)
    if tokenizer.vocab_size != model_cfg.vocab_size:
        raise CheckpointError(
            f"{tokenizer.path} has {tokenizer.vocab_size} tokens but the model in {ckpt} was trained on "
            f"{model_cfg.vocab_size}: it is not this model's tokenizer"
        )
    return tokenizer


def load_model(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[GPT, Path]:
    """Rebuild the model of a checkpoint from its own files (safetensors: no pickled code runs)."""
    ckpt = resolve_checkpoint(path)
    verify_model_files(ckpt)
    model = GPT(saved_model_config(ckpt))
    state = load_safetensors(ckpt / "model.safetensors")
    wrong = [k for k, v in model.state_dict().items() if k in state and state[k].shape != v.shape]
    missing, unexpected = set(model.state_dict()) - set(state), set(state) - set(model.state_dict())
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{ckpt / 'model.safetensors'} does not match its model config: missing {sorted(missing)}, "
            f"unexpected {sorted(unexpected)}, other shape {wrong}"
        )
    model.load_state_dict(state)
    return model.to(device=device, dtype=dtype).eval(), ckpt
