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
        # The loss runs inside the head's forward, so ZeRO-3 has the head weight gathered. It crosses the
        # module boundary as a tuple of tensors and a dict: DeepSpeed's hooks see through those, not a dataclass.
        loss, metrics = self.model.head(hidden, lambda h, w: self._loss_tuple(h, w, labels, denominator))
        return LossOutput(loss=loss, metrics=metrics)

    def _loss_tuple(
        self, hidden: Tensor, weight: Tensor, labels: Tensor, denominator: Tensor | None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        out = self.loss_fn(hidden, weight, labels, denominator=denominator)
        return out.loss, out.metrics
