"""The module DeepSpeed trains: a GPT plus its loss, fed packed windows."""

from __future__ import annotations

from torch import Tensor, nn

from models.gpt import GPT
from trainer.losses import LossOutput, TokenLoss


class CausalLMObjective(nn.Module):
    def __init__(self, model: GPT, loss_fn: TokenLoss) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn  # holds no parameters or buffers

    def forward(self, windows: Tensor, denominator: Tensor | None = None) -> LossOutput:
        # windows: [B, T+1] -> inputs [B, T], labels [B, T] (the next token)
        inputs, labels = windows[:, :-1], windows[:, 1:]
        hidden = self.model(inputs)  # [B, T, d]
        # The loss runs inside the head's forward, so ZeRO-3 has the head weight gathered; its output, a named
        # tuple of a tensor and a dict, is a structure DeepSpeed's hooks see through.
        return self.model.head(hidden, lambda h, w: self.loss_fn(h, w, labels, denominator=denominator))
