"""The loss module the trainer calls: ``loss_fn(hidden, head_weight, labels, token_inputs=None) -> LossOutput``."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from losslab.losses import paths
from losslab.losses.config import IGNORE_INDEX, LossConfig
from losslab.losses.settings import resolve
from losslab.losses.weighting import Rows, TokenWeighting, build_weighting


class LossOutput(NamedTuple):
    """A named tuple rather than a dataclass: DeepSpeed's ZeRO-3 module hooks see through tuples and dicts
    (and warn that they cannot through anything else)."""

    loss: Tensor
    """Scalar to backpropagate."""
    metrics: dict[str, Tensor]
    """Detached per-step statistics (device tensors: the caller decides when to sync)."""


class _Normaliser:
    """The factor K with loss = K * sum_i l_i, computed once per call (it may all-reduce): ``a / n`` with the
    rank-averaged ``a = mean_r(n_r / sum_i w_i)`` for weight-normalised losses, else ``1 / tokens``."""

    def __init__(self, normalised: bool, n: Tensor, tokens: Tensor) -> None:
        self.normalised, self.n, self.tokens = normalised, n, tokens
        self.k: Tensor | None = None

    def __call__(self, w: Tensor) -> Tensor:
        if self.k is None:
            if self.normalised:  # the official rank-averaged normaliser
                w_sum = w.sum()
                scale = self.n / w_sum.clamp_min(torch.finfo(w_sum.dtype).tiny)  # a_r = 1 / mean_r(w)
                if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                    dist.all_reduce(scale, op=dist.ReduceOp.SUM)
                    scale = scale / dist.get_world_size()
                self.k = scale / self.n.clamp_min(1.0)
            else:
                self.k = 1.0 / self.tokens
        return self.k


class TokenLoss(nn.Module):
    """Weighted next-token loss over a batch: ``L = (sum_i l_i / n) * a`` with ``a = mean_ranks(n / sum_i w_i)``,
    plus ``z_loss * sum_valid lse_i^2 / tokens`` when the z-loss is on.

    On one rank that is ``sum l / sum w``; across data-parallel ranks the normaliser is averaged the way the
    official MiLe code does (all-reduce of the per-rank scalar ``a``), so each rank's gradient stays local.
    ``n`` counts the non-ignored tokens (or all positions when ``count_ignored`` reproduces the official code).
    For unnormalised losses (ce, dft, focal_lin) ``a`` is 1 and no communication happens.
    """

    def __init__(self, cfg: LossConfig, weighting: TokenWeighting) -> None:
        """``cfg``: complete and checked (``settings.resolve``, as ``build_loss`` does)."""
        super().__init__()
        self.cfg = cfg
        self.weighting = weighting
        self.fused = cfg.fused != "false"
        self.computes_entropy = weighting.needs_entropy or cfg.log_entropy
        self.normalised = weighting.normalised and cfg.normalise == "weights"
        """Divided by the sum of its weights (the official normaliser), else by the token count (``loss.normalise``)."""
        """Whether the entropy is computed (and ``entropy`` is among the metrics)."""

    def _terms(self, ce_loss: Tensor, rows: Rows) -> tuple[Tensor, Tensor, Tensor]:
        """-> (masked loss terms, normaliser weights, the detached multiplier of ce_loss when linear_in_ce)."""
        terms, w = self.weighting.row_terms(ce_loss, rows)
        valid = rows.valid
        counted = torch.ones_like(valid) if self.weighting.counts_ignored else valid
        return terms * valid, (w * counted).detach(), (w * valid).detach()

    def _smoothed(self, ce: Tensor, lse: Tensor, mean_z: Tensor | None) -> Tensor:
        """(1 - e) CE + e mean_v(-log p_v), with mean_v(-log p_v) = lse - mean_v z_v."""
        e = self.cfg.label_smoothing
        return ce if not e else (1.0 - e) * ce + e * (lse - mean_z)

    def _block(self, b: paths.Block, need_coefs: bool) -> tuple[Tensor, Tensor, paths.Coefs | None]:
        """The fused path's row terms of a block, and the coefficients of their gradient w.r.t. the logits."""
        e = self.cfg.label_smoothing
        if need_coefs and not self.weighting.linear_in_ce:  # differentiate the row terms with autograd
            with torch.enable_grad():
                # leaves: CE (d/dz = softmax - onehot), and with smoothing lse (softmax) and the mean logit (1/V)
                ce = b.ce.detach().requires_grad_()
                leaves = [ce]
                if e:
                    lse, mz = b.lse.detach().requires_grad_(), b.mean_z.detach().requires_grad_()
                    leaves += [lse, mz]
                ce_loss = self._smoothed(ce, lse, mz) if e else ce
                rows = Rows(ce, b.entropy, b.lse, b.labels, b.valid, b.inputs)
                terms, w, _ = self._terms(ce_loss, rows)
                grads = torch.autograd.grad(terms.sum(), leaves)
            if not e:
                return terms.detach(), w, paths.Coefs(grads[0], grads[0])
            return terms.detach(), w, paths.Coefs(grads[0] + grads[1], grads[0], -grads[2] / b.vocab)
        ce_loss = self._smoothed(b.ce, b.lse, b.mean_z)
        terms, w, m = self._terms(ce_loss, Rows(b.ce, b.entropy, b.lse, b.labels, b.valid, b.inputs))
        if not need_coefs:
            return terms, w, None
        # terms = m * ce_loss, ce_loss = lse - (1 - e) z_y - e mean_z: the three coefficients in closed form
        return terms, w, paths.Coefs(m, m * (1.0 - e), m * (e / b.vocab) if e else None)

    def _token_inputs(self, token_inputs: dict[str, Tensor] | None, n: int, like: Tensor) -> dict[str, Tensor]:
        token_inputs = token_inputs or {}
        missing = [k for k in self.weighting.token_inputs if k not in token_inputs]
        if missing:
            raise ValueError(f"loss.name={self.cfg.name} needs token_inputs {missing} ([N] tensors carried with "
                             "the data)")  # fmt: skip
        out = {}
        for key, value in token_inputs.items():
            value = value.detach().reshape(-1)
            if value.numel() != n:
                raise ValueError(f"token_inputs[{key!r}] has {value.numel()} values for {n} tokens")
            out[key] = value.to(device=like.device, dtype=paths.accumulation_dtype(like.dtype))
        return out

    def forward(
        self,
        hidden: Tensor,
        head_weight: Tensor,
        labels: Tensor,
        denominator: Tensor | float | None = None,
        token_inputs: dict[str, Tensor] | None = None,
    ) -> LossOutput:
        """``hidden`` [N, d] (or [..., d]) final hidden states, ``head_weight`` [V, d], ``labels`` [N] targets.

        ``denominator`` (unnormalised losses and the z-loss): divide by it instead of this batch's token count
        — the trainer passes global valid tokens / (micro-steps x ranks), which makes gradient accumulation and
        data parallelism exact when batches hold different numbers of valid tokens. ``token_inputs``: optional
        [N] (or labels-shaped) tensors carried with the data — ``weight`` (loss ``weighted``), ``ref_ce``
        (``rho1``) or a plug-in's own."""
        h = hidden.reshape(-1, hidden.shape[-1])  # [N, d]
        y = labels.reshape(-1)  # [N]
        if h.shape[0] != y.shape[0]:
            raise ValueError(f"hidden has {h.shape[0]} rows but labels has {y.shape[0]}")
        clamp = self.cfg.entropy_clamp
        return self._loss(y, h, denominator, token_inputs, lambda: paths.reference(h, head_weight, y, clamp),
                          head_weight if self.fused else None)  # fmt: skip

    def forward_logits(
        self,
        logits: Tensor,
        labels: Tensor,
        denominator: Tensor | float | None = None,
        token_inputs: dict[str, Tensor] | None = None,
    ) -> LossOutput:
        """The same loss from materialised ``logits`` [N, V] (or [..., V]), for a caller that has them anyway
        (an evaluation, a model asked for its logits): the unfused path, autograd through the logits."""
        z = logits.reshape(-1, logits.shape[-1])  # [N, V]
        y = labels.reshape(-1)  # [N]
        if z.shape[0] != y.shape[0]:
            raise ValueError(f"logits has {z.shape[0]} rows but labels has {y.shape[0]}")
        return self._loss(y, z, denominator, token_inputs, lambda: _from_logits(z, y, self.cfg.entropy_clamp), None)

    def _loss(
        self,
        y: Tensor,
        h: Tensor,
        denominator: Tensor | float | None,
        token_inputs: dict[str, Tensor] | None,
        reference: Callable[[], paths.Reference],
        head_weight: Tensor | None,
    ) -> LossOutput:
        """``h``: [N, d] hidden states (fused, with ``head_weight``) or [N, V] logits / hidden states (unfused,
        ``reference`` computes the per-row statistics with autograd)."""
        inputs = self._token_inputs(token_inputs, y.numel(), h)
        acc = paths.accumulation_dtype(h.dtype)
        valid = y != IGNORE_INDEX
        num_valid = valid.sum().to(acc)
        n = torch.full_like(num_valid, y.numel()) if self.weighting.counts_ignored else num_valid
        denom = None if denominator is None else torch.as_tensor(denominator, device=h.device).to(acc)
        tokens = (n if denom is None else denom).clamp_min(1.0)
        norm = _Normaliser(self.normalised, n, tokens)
        c = self.cfg.z_loss
        # the z-loss is a mean over valid tokens (or over the trainer's denominator), whatever the loss divides by
        z_tokens = (num_valid if denom is None else denom).clamp_min(1.0)
        if not self.normalised:
            z_tokens = tokens  # the same divisor as the loss: the fused path folds both into one numerator
        if head_weight is not None:
            z_lambda: float | Callable[[Tensor], Tensor] = c

            def relative_z(w: Tensor) -> Tensor:  # the z-loss's factor over the loss's, once the weights are known
                return c / z_tokens / norm(w)

            if c and self.normalised:
                z_lambda = relative_z
            opts = paths.FusedOptions(mean_z=self.cfg.label_smoothing > 0, z_lambda=z_lambda, inputs=inputs,
                                      two_pass=self.weighting.needs_all_rows or callable(z_lambda),
                                      entropy_clamp=self.cfg.entropy_clamp, entropy=self.computes_entropy)  # fmt: skip
            numerator, ce, entropy, w, lse = paths.fused(
                h, head_weight, y, self._block, self.cfg.chunk_size, self.cfg.kernel, opts
            )
            loss = numerator * norm(w)
        else:
            ref = reference()
            rows = Rows(ref.ce, ref.entropy, ref.lse.detach(), y, valid, inputs)
            terms, w, _ = self._terms(self._smoothed(ref.ce, ref.lse, ref.mean_z), rows)
            loss = terms.sum() * norm(w)
            if c:
                loss = loss + c * (ref.lse.square() * valid).sum() / z_tokens
            ce, entropy, lse = ref.ce.detach(), ref.entropy, ref.lse.detach()
        safe_valid = num_valid.clamp_min(1.0)
        metrics = {
            "ce": (ce * valid).sum() / safe_valid,
            "weight": w.sum() / n.clamp_min(1.0),
            "tokens": num_valid,
            # always present (0 when off), so a trainer can log a fixed set of keys
            "z_loss": c * (lse.square() * valid).sum() / z_tokens,
        }
        if self.computes_entropy:  # else not computed (fused) or not asked for: absent, never a made-up number
            metrics["entropy"] = (entropy * valid).sum() / safe_valid
        return LossOutput(loss=loss, metrics=metrics)


def _from_logits(z: Tensor, y: Tensor, entropy_clamp: float) -> paths.Reference:
    """``paths.reference``'s per-row statistics from logits already materialised: z [N, V], y [N]."""
    z = z.to(paths.accumulation_dtype(z.dtype))
    ce = F.cross_entropy(z, y, ignore_index=IGNORE_INDEX, reduction="none")  # [N], 0 where ignored
    return paths.Reference(
        ce, torch.logsumexp(z, dim=-1), z.mean(-1), paths.entropy_from_logits(z.detach(), entropy_clamp)
    )


def build_loss(
    loss: str | LossConfig | Mapping[str, Any] = "ce", token_counts: Tensor | None = None, **settings: Any
) -> TokenLoss:
    """The loss module: ``build_loss("mile", gamma=1.0)``, ``build_loss({"name": "mile", "gamma": 1.0})`` or
    ``build_loss(LossConfig(...))``; keywords (the loss's parameters and the modifiers) add to or override what
    ``loss`` gives. ``token_counts``: [V] corpus counts, for a loss that needs them (pdl). Every setting is
    checked against its declaration first: a ValueError names the key."""
    if isinstance(loss, str):
        cfg = LossConfig(loss, **settings)
    else:
        flat = (loss if isinstance(loss, LossConfig) else LossConfig.from_mapping(loss)).to_mapping()
        cfg = LossConfig(**{**flat, **settings})
    cfg = resolve(cfg)
    return TokenLoss(cfg, build_weighting(cfg, token_counts))
