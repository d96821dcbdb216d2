"""The module DeepSpeed trains: a GPT plus its loss, fed packed windows."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from data.batch import mask_document_starts
from losslab.losses import IGNORE_INDEX, LossOutput, TokenLoss
from losslab.losses.paths import token_ce
from models.gpt import GPT


class CausalLMObjective(nn.Module):
    def __init__(self, model: GPT, loss_fn: TokenLoss, reference: GPT | None = None) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn  # holds no parameters or buffers
        # a frozen model that scores each batch (loss.reference): kept out of the module tree, so DeepSpeed
        # neither partitions nor optimises it and checkpoints do not hold it
        object.__setattr__(self, "reference", reference)

    def forward(
        self,
        windows: Tensor,
        denominator: Tensor | None = None,
        segment_ids: Tensor | None = None,
        labels: Tensor | None = None,
        token_inputs: dict[str, Tensor] | None = None,
    ) -> LossOutput:
        """``windows``: [B, T+1] token ids -> inputs [B, T] and labels [B, T] (the next token).

        ``segment_ids``: optional [B, T+1] document ids aligned with ``windows`` (packed documents kept apart:
        the model attends within a document only and restarts positions at each one, see ``models/gpt.py``);
        a position whose next token starts another document gets no loss. ``labels``: optional [B, T] targets
        replacing ``windows[:, 1:]`` (``IGNORE_INDEX`` where a token carries no loss, e.g. a fine-tuning
        prompt). ``token_inputs``: the loss's per-token inputs (``weight``, ``ref_ce``), [B*T] each, in the order
        of the flattened labels."""
        inputs = windows[:, :-1]
        if labels is None:
            labels = windows[:, 1:]
        elif labels.shape != inputs.shape:
            raise ValueError(f"labels {tuple(labels.shape)} != inputs {tuple(inputs.shape)}")
        seg_in = None
        if segment_ids is not None:
            if segment_ids.shape != windows.shape:
                raise ValueError(f"segment_ids {tuple(segment_ids.shape)} != windows {tuple(windows.shape)}")
            seg_in = segment_ids[:, :-1]  # [B, T]
            labels = mask_document_starts(labels, segment_ids)
        if self.reference is not None:
            token_inputs = {**(token_inputs or {}), "ref_ce": self._reference_ce(inputs, labels, seg_in)}
        hidden = self.model(inputs, segment_ids=seg_in)  # [B, T, d]
        # The loss runs inside the head's forward, so ZeRO-3 has the head weight gathered; its output, a named
        # tuple of a tensor and a dict, is a structure DeepSpeed's hooks see through.
        return self.model.head(
            hidden, lambda h, w: self.loss_fn(h, w, labels, denominator=denominator, token_inputs=token_inputs)
        )

    @torch.no_grad()
    def _reference_ce(self, inputs: Tensor, labels: Tensor, segment_ids: Tensor | None) -> Tensor:
        """[B*T] the reference model's CE of each target (0 where ignored), in the order of the flattened labels."""
        ref = self.reference
        assert ref is not None
        hidden = ref(inputs, segment_ids=segment_ids)  # [B, T, d]
        weight = ref.head.weight[: ref.cfg.vocab_size]  # [V, d]
        y = labels.reshape(-1)
        return token_ce(hidden.reshape(-1, hidden.shape[-1]), weight, y).float().masked_fill(y == IGNORE_INDEX, 0.0)
