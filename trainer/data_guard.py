"""The data a run trains on, recorded when it starts and compared when it resumes (``data/fingerprint.py``).

A checkpoint's ``meta.json`` holds the fingerprint of the data its run started on; a resume whose data differ
stops with one line naming the file (a shard reshuffled in place would otherwise be read from the saved
position of another stream without a word), unless ``data.allow_changed=true``: then the differences are kept,
with the step they appeared at, in ``run_info.json``, on W&B (the run's config) and in every later checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch.distributed as dist

from data.config import DataConfig
from data.fingerprint import differences, fingerprint
from data.shards import DataError
from losslab.log import get_logger
from trainer.collectives import from_rank0

log = get_logger(__name__)

FINGERPRINT = "data_fingerprint"
CHANGES = "data_changes"


def check_data(
    cfg: DataConfig, stream_files: list[str], ckpt: Path | None, meta: dict[str, Any] | None
) -> dict[str, Any]:
    """Collective. The entries a run records about its data (``FINGERPRINT``, ``CHANGES``; on rank 0, whose
    records are written), after comparing them with the checkpoint ``ckpt`` it resumes from (its ``meta``)."""
    record: dict[str, Any] = {}
    error = None
    if dist.get_rank() == 0:
        try:
            now = fingerprint(cfg, stream_files)
        except OSError as e:  # a file gone since it was resolved: every rank must stop, not rank 0 alone
            now, error = {}, f"cannot read the training data to fingerprint it: {e}"
        changes = list(meta.get(CHANGES, [])) if meta else []
        before = meta.get(FINGERPRINT) if meta else None
        if meta is not None and before is None:
            log.warning(f"warning: {ckpt} predates data fingerprints: the data are not checked for changes")
        found = differences(before, now) if before and not error else []
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        if error:
            pass
        elif found and not cfg.allow_changed:
            error = (
                f"the training data changed since {ckpt} was written: {found[0]}{more}; resume on the data it was "
                "trained on, or set data.allow_changed=true to go on with these"
            )
        elif found:
            log.warning(
                f"warning: the training data changed since {ckpt} was written: {found[0]}{more}; going on "
                "(data.allow_changed=true), recorded in run_info.json"
            )
            changes.append({"step": meta["step"], "changes": found})
        record = {FINGERPRINT: now, CHANGES: changes}
    error = from_rank0(error)
    if error is not None:
        raise DataError(error)
    return record
