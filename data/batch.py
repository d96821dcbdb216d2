"""What the trainer reads from a batch. A batch is a [B, T+1] int64 tensor of packed windows (pretraining), or
a dict of [B, T+1] tensors: ``tokens`` plus the per-token streams of ``data.packing`` (``loss_mask``,
``weight``, ``ref_ce``) and ``segments``. Position t predicts token t+1, so everything about targets is read
at [:, 1:] and everything about inputs at [:, :-1]."""

from __future__ import annotations

import torch
from torch import Tensor

from data.packing import Window
from losslab.losses.config import IGNORE_INDEX

TOKEN_INPUTS = ("weight", "ref_ce")
"""Streams handed to the loss as ``token_inputs`` (per target token)."""


def to_device(batch: Window, device: torch.device) -> Window:
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def tokens(batch: Window) -> Tensor:
    return batch if isinstance(batch, Tensor) else batch["tokens"]  # [B, T+1]


def inputs(batch: Window) -> Tensor:
    return tokens(batch)[:, :-1]  # [B, T]


def labels(batch: Window) -> Tensor:
    """[B, T] next-token targets, ``IGNORE_INDEX`` where the target carries no loss: masked out by
    ``loss_mask``, or the first token of another packed document (the previous one cannot see it)."""
    targets = tokens(batch)[:, 1:]
    if isinstance(batch, dict) and "loss_mask" in batch:
        targets = targets.masked_fill(~batch["loss_mask"][:, 1:], IGNORE_INDEX)
    if isinstance(batch, dict) and "segments" in batch:
        targets = mask_document_starts(targets, batch["segments"])
    return targets


def mask_document_starts(targets: Tensor, segments: Tensor) -> Tensor:
    """[B, T] targets with the first token of each packed document ignored: it is predicted from the end of
    another document, which the model, keeping documents apart, cannot see. ``segments``: [B, T+1]."""
    return targets.masked_fill(segments[:, 1:] != segments[:, :-1], IGNORE_INDEX)


def segment_ids(batch: Window) -> Tensor | None:
    """[B, T] document index of each input token within its row, or None (attention crosses documents)."""
    return batch["segments"][:, :-1] if isinstance(batch, dict) and "segments" in batch else None


def token_inputs(batch: Window) -> dict[str, Tensor] | None:
    """Per-target-token loss inputs, flattened to [B*T] as the loss sees its rows."""
    if not isinstance(batch, dict):
        return None
    found = {k: batch[k][:, 1:].reshape(-1) for k in TOKEN_INPUTS if k in batch}
    return found or None


def model_inputs(batch: Window) -> dict[str, Tensor | None]:
    """The arguments of ``CausalLMObjective.forward``: the windows, and for a batch with streams its [B, T+1]
    segments (or None), [B, T] labels, so the objective computes the loss over the targets the loop counted, and the
    loss's per-token inputs."""
    if isinstance(batch, Tensor):
        return {"windows": batch}
    return {
        "windows": tokens(batch),
        "segment_ids": batch.get("segments"),
        "labels": labels(batch),
        "token_inputs": token_inputs(batch),
    }
