"""losslab's losses in Hugging Face causal LMs: ``patch(model, loss="mile", gamma=1.0)`` makes
``model(input_ids, labels=...)`` compute the chosen loss with the fused path from the final hidden states and the
LM head — the ``[N, V]`` logits never exist — in ``transformers.Trainer``, TRL and a plain loop alike
(``docs/hf.md``). Needs torch; transformers only for ``from_pretrained``.

How: the model's own forward runs unchanged (every transformers version's signature, attention and cache code
stays its own); only its LM head, for the duration of a training call, computes the loss from the hidden states
it receives and hands it back in place of the logits. The head is called as a module, so DeepSpeed ZeRO-3 and
FSDP gather its weight around the call as they would for the logits; a tied head is the embedding matrix and
gets its gradient there. Generation, evaluation and calls without labels build logits as before.

Labels are shifted as transformers does (position t predicts ``labels[t + 1]``; -100 masks a position), or taken
as given from ``shift_labels``. ``num_items_in_batch`` (what ``Trainer`` passes under gradient accumulation since
transformers 4.46) is the token-mean losses' denominator, as in losslab's own loop; weight-normalised losses
(mile, focal, pdl, weighted, rho1) normalise each call by its own weights (the official MiLe code's normaliser)
and tell ``Trainer`` (``accepts_loss_kwargs = False``) to average the micro-steps, as losslab's loop does.
"""

from __future__ import annotations

import inspect
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from losslab.losses import IGNORE_INDEX, MODIFIERS, TokenLoss, build_loss, resolve_loss
from losslab.losses.paths import token_ce

FAMILIES: set[str] = {"llama", "gpt_neox", "qwen2", "qwen3", "mistral"}
"""``config.model_type`` of the families whose forward is known to hand the LM head's output back untouched
(tested); ``declare`` adds another."""
SCALED_LOGITS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier",
                 "lm_head_multiplier")  # fmt: skip
"""Config keys of models that change the logits after the head: the fused loss would compute another function."""
BATCH_KEYS = {"weight": "token_weights", "ref_ce": "ref_ce"}
"""The batch key (a forward keyword, [B, T] aligned with ``labels``) that carries each token input of a loss."""


def declare(model_type: str) -> None:
    """Allow ``patch`` on another family: one whose ``*ForCausalLM.forward`` passes the final (normed) hidden
    states through ``get_output_embeddings()`` (an ``nn.Linear`` without bias) and returns what it gives as
    ``logits``, doing nothing to them but a dtype cast. Check it: the patched loss must equal the model's own
    cross-entropy for ``loss="ce"`` (``tests/test_hf_patch.py`` does so for the built-in families)."""
    FAMILIES.add(model_type)


@dataclass
class _State:
    """What a patched model carries (``model.losslab``)."""

    loss_fn: TokenLoss
    forward: Callable[..., Any]
    """The model's own forward, bound."""
    reference: nn.Module | None = None
    pending: Callable[[Tensor, Tensor], Tensor] | None = None
    """Set for the duration of a fused call: the head hands its input and weight to it instead of projecting."""
    metrics: dict[str, Tensor] = field(default_factory=dict)
    """The last call's loss metrics (ce, weight, tokens, z_loss, entropy when computed), detached."""
    warned: set[str] = field(default_factory=set)

    @property
    def batch_keys(self) -> dict[str, str]:
        """Forward keyword -> token input of the loss."""
        return {BATCH_KEYS.get(k, k): k for k in self.loss_fn.weighting.token_inputs}


def _head_forward(self: nn.Module, hidden: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    """The patched head's forward. What it needs is read from the module at each call (not closed over), so a
    deep copy of a patched model is a patched model of its own."""
    pending = self._losslab_state.pending
    if pending is None:
        return self._losslab_original(hidden, *args, **kwargs)
    return pending(hidden, self.weight)


def _install_head(model: nn.Module, state: _State) -> nn.Module:
    """The model's LM head, made to answer ``state.pending`` (looked up at each call: PEFT, FSDP or
    ``resize_token_embeddings`` may replace it after ``patch``)."""
    head = model.get_output_embeddings()
    if getattr(head, "_losslab_state", None) is not state:
        original = head.forward if getattr(head, "_losslab_state", None) is None else head._losslab_original
        head._losslab_original = original
        head._losslab_state = state
        head.forward = types.MethodType(_head_forward, head)
    return head


def _shift(x: Tensor, fill: float) -> Tensor:
    """[B, T] aligned with labels -> [B, T] aligned with the predictions: position t gets x[t + 1]."""
    return F.pad(x[..., 1:], (0, 1), value=fill)


def _check_model(model: nn.Module) -> nn.Linear:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(f"losslab.hf.patch: {type(model).__name__} (model_type {model_type!r}) is not a known "
                         f"family ({', '.join(sorted(FAMILIES))}); if its forward passes the final hidden states "
                         "through get_output_embeddings() and returns its output as the logits, "
                         "losslab.hf.declare(model_type) first")  # fmt: skip
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError("losslab.hf.patch: encoder-decoder models are not supported (a causal LM is)")
    scaled = [k for k in SCALED_LOGITS if getattr(config, k, None) not in (None, 1, 1.0)]
    if scaled or getattr(config, "pretraining_tp", 1) > 1:
        what = ", ".join(scaled) or "pretraining_tp"
        raise ValueError(f"losslab.hf.patch: {type(model).__name__} changes its logits after the head ({what}): "
                         "the fused loss would compute another function")  # fmt: skip
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear) or head.bias is not None:
        raise ValueError(f"losslab.hf.patch: {type(model).__name__}'s output embeddings are not an nn.Linear "
                         "without bias (the fused path takes the head's weight alone)")  # fmt: skip
    return head


def patch(
    model: nn.Module,
    loss: str = "ce",
    *,
    token_counts: Tensor | None = None,
    reference: nn.Module | None = None,
    **settings: Any,
) -> nn.Module:
    """Make ``model(..., labels=...)`` compute ``loss`` (a registered loss or "package.module:Class") with its
    ``settings`` (the loss's parameters and modifiers, e.g. ``gamma=1.0``, ``z_loss=1e-4``) on the fused path.
    Returns the model (patched in place); patching again replaces the loss.

    ``token_counts``: [V] corpus counts for ``pdl`` (``losslab.losses.token_counts``); shorter than the head
    (a tokenizer smaller than the padded vocabulary) it is padded with zeros. ``reference``: a frozen HF causal
    LM with the same tokenizer, for ``rho1``: it scores each batch without gradient (otherwise a ``ref_ce`` batch
    key carries the reference CE). Weights for ``weighted`` come as a ``token_weights`` batch key. Both keys are
    [B, T], aligned with ``labels`` (the value of position t belongs to ``labels[t]``).

    Call with ``return_logits=True`` to get the logits too (then materialised, as without the patch); in eval
    mode (``model.eval()``) and without labels they are built by default. Patch before creating a ``Trainer``:
    it reads ``model.accepts_loss_kwargs`` when it is created."""
    head = _check_model(model)
    if token_counts is not None:
        counts = torch.as_tensor(token_counts).reshape(-1)
        if counts.numel() > head.out_features:
            raise ValueError(f"token_counts has {counts.numel()} entries for a head of {head.out_features} rows")
        token_counts = F.pad(counts, (0, head.out_features - counts.numel()))
    loss_fn = build_loss(loss, token_counts=token_counts, **settings)
    if reference is not None:
        if "ref_ce" not in loss_fn.weighting.token_inputs:
            raise ValueError(f"losslab.hf.patch: reference= scores a reference CE, which loss {loss!r} does not read")
        ref_head = _check_model(reference)
        if ref_head.out_features != head.out_features:
            raise ValueError(f"reference has a vocabulary of {ref_head.out_features}, the model {head.out_features}")
        reference.requires_grad_(False).eval()
    state = getattr(model, "losslab", None)
    original = state.forward if isinstance(state, _State) else model.forward
    state = _State(loss_fn, original, reference)
    model.losslab = state
    _install_head(model, state)
    if reference is not None:
        ref_state = getattr(reference, "losslab", None)
        ref_state = ref_state if isinstance(ref_state, _State) else _State(loss_fn, reference.forward)
        reference.losslab = ref_state
        _install_head(reference, ref_state)
    model.forward = _patched_forward(model, state)
    # Trainer: token-mean losses take num_items_in_batch and are not divided again by the accumulation steps;
    # weight-normalised ones normalise each call and Trainer averages the micro-steps (losslab's own loop)
    model.accepts_loss_kwargs = not loss_fn.normalised
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo ``patch``: the model's own forward and loss again."""
    state = getattr(model, "losslab", None)
    if isinstance(state, _State):
        del model.forward  # the instance attribute: the class's forward is the model's own again
        head = model.get_output_embeddings()
        if getattr(head, "_losslab_state", None) is not None:
            head.forward = head._losslab_original
            del head._losslab_state, head._losslab_original
        del model.losslab, model.accepts_loss_kwargs
    return model


def _patched_forward(model: nn.Module, state: _State) -> Callable[..., Any]:
    """The model's forward, bound, with the loss keywords added to its signature: Trainer keeps the dataset
    columns the forward names, and passes num_items_in_batch to a forward with **kwargs."""
    original = state.forward

    def forward(self: nn.Module, *args: Any, labels: Tensor | None = None, **kwargs: Any) -> Any:
        return _forward(self, self.losslab, args, labels, kwargs)  # read at each call: a deep copy has its own

    sig = inspect.signature(original)
    ours = ["labels", *state.batch_keys, "num_items_in_batch", "return_logits", "shift_labels"]
    params = [p for p in sig.parameters.values() if p.name not in ours]
    params += [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=None) for k in ours]
    params.insert(0, inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD))
    forward.__doc__ = original.__doc__
    forward.__signature__ = sig.replace(parameters=sorted(params, key=lambda p: p.kind))  # type: ignore[attr-defined]
    return types.MethodType(forward, model)


def _token_inputs(state: _State, kwargs: dict[str, Any], shifted: bool) -> dict[str, Tensor]:
    inputs = {}
    for key, name in state.batch_keys.items():
        value = kwargs.pop(key, None)
        if value is not None:
            value = torch.as_tensor(value)
            inputs[name] = value if shifted else _shift(value, 0.0)
    return inputs


def _forward(model: nn.Module, state: _State, args: tuple, labels: Tensor | None, kwargs: dict[str, Any]) -> Any:
    """One call of the patched forward: the model's own without labels; with them, the fused loss from the
    head's input (or, asked for logits, the loss from the logits)."""
    if kwargs.get("fused_lm_head"):  # TRL's own loss head called through this forward: it would bypass the patch
        raise ValueError("losslab.hf: TRL's trainer computes a loss of its own (fused_lm_head=True); mix in "
                         "losslab.hf.ModelLoss so that it trains the patched model's loss (docs/hf.md)")  # fmt: skip
    num_items = kwargs.pop("num_items_in_batch", None)
    return_logits = kwargs.pop("return_logits", None)
    shift_labels = kwargs.pop("shift_labels", None)
    if labels is None and shift_labels is None:  # generation, inference: the model's own forward
        for key in state.batch_keys:
            kwargs.pop(key, None)
        return state.forward(*args, **kwargs)
    y = shift_labels if shift_labels is not None else _shift(labels, IGNORE_INDEX)  # [B, T] the targets
    inputs = _token_inputs(state, kwargs, shifted=shift_labels is not None)
    if state.reference is not None:
        inputs["ref_ce"] = _reference_ce(state.reference, args, kwargs, y)
    missing = [k for k, name in state.batch_keys.items() if name not in inputs]
    if missing:
        source = " (or patch(..., reference=a frozen HF model))" if "ref_ce" in missing else ""
        raise ValueError(f"loss {state.loss_fn.cfg.name} needs the batch key(s) {missing}: [B, T] tensors aligned "
                         f"with labels{source}")  # fmt: skip
    loss_fn = state.loss_fn
    denominator = num_items
    if num_items is not None and loss_fn.normalised:
        # A Trainer that passes num_items_in_batch to a weight-normalised loss anyway (one that does not read
        # accepts_loss_kwargs) will not average the micro-steps: weigh each call by its share of the tokens.
        if "num_items" not in state.warned:
            state.warned.add("num_items")
            print(f"losslab.hf: num_items_in_batch given to the weight-normalised loss {loss_fn.cfg.name}: each "
                  "micro-batch's loss is weighted by its share of the step's tokens", file=sys.stderr)  # fmt: skip
        denominator = None
    return_dict = kwargs.pop("return_dict", None)
    want_logits = (not model.training) if return_logits is None else bool(return_logits)
    if want_logits:
        out = state.forward(*args, return_dict=True, **kwargs)
        logits = out.logits
        if logits.shape[:-1] != y.shape:
            raise ValueError(f"logits {tuple(logits.shape)} do not cover labels {tuple(y.shape)} (logits_to_keep?)")
        result = loss_fn.forward_logits(logits, y.to(logits.device), denominator=denominator, token_inputs=inputs)
    else:
        _install_head(model, state)
        captured: dict[str, Any] = {}

        def in_head(hidden: Tensor, weight: Tensor) -> Tensor:
            h = hidden.reshape(-1, hidden.shape[-1])  # [B*T, d]
            if h.shape[0] != y.numel():
                raise ValueError(f"the LM head saw {h.shape[0]} positions for {y.numel()} labels (logits_to_keep?)")
            out = loss_fn(h, weight, y.reshape(-1).to(h.device), denominator=denominator, token_inputs=inputs)
            captured["loss"], captured["metrics"] = out.loss.detach(), out.metrics
            return out.loss  # handed back as the "logits": through the head's hooks, so ZeRO-3 sees it

        kwargs.setdefault("use_cache", False)
        state.pending = in_head
        try:
            out = state.forward(*args, return_dict=True, **kwargs)
        finally:
            state.pending = None
        carried = out.logits  # the head's output: our loss, a scalar, at most cast (transformers 4.x: .float())
        if carried is None or carried.dim() != 0 or "loss" not in captured:
            raise RuntimeError(f"{type(model).__name__}'s forward changed what its LM head returned: it cannot be "
                               "patched (see losslab.hf.declare)")  # fmt: skip
        # the value as computed (no cast), the gradient through what the head returned (and its hooks)
        loss = captured["loss"] + (carried - carried.detach())
        result = types.SimpleNamespace(loss=loss, metrics=captured["metrics"])
        logits = None
    state.metrics = {k: v.detach() for k, v in result.metrics.items()}
    fields = {k: v for k, v in out.items() if k not in ("loss", "logits")}
    new = type(out)(loss=result.loss, logits=logits, **fields)
    user_return_dict = return_dict if return_dict is not None else getattr(model.config, "return_dict", True)
    return new if user_return_dict else new.to_tuple()


@torch.no_grad()
def _reference_ce(reference: nn.Module, args: tuple, kwargs: dict[str, Any], y: Tensor) -> Tensor:
    """[B*T] the reference model's CE of each target (0 where ignored), from its hidden states, chunked."""
    ref_state: _State = reference.losslab
    captured: dict[str, Tensor] = {}

    def in_head(hidden: Tensor, weight: Tensor) -> Tensor:
        h = hidden.reshape(-1, hidden.shape[-1])  # [B*T, d]
        labels = y.reshape(-1).to(h.device)
        captured["ce"] = token_ce(h, weight, labels).float().masked_fill(labels == IGNORE_INDEX, 0.0)
        return captured["ce"].sum()

    ref_kwargs = {k: v for k, v in kwargs.items() if k not in ("return_dict",)}
    ref_kwargs["use_cache"] = False
    _install_head(reference, ref_state)
    ref_state.pending = in_head
    try:
        ref_state.forward(*args, return_dict=True, **ref_kwargs)
    finally:
        ref_state.pending = None
    return captured["ce"]


def loss_settings(loss: str) -> set[str]:
    """The keywords that configure ``loss``: its declared parameters and every modifier."""
    return {p.name for p in resolve_loss(loss).params} | {p.name for p in MODIFIERS}


def from_pretrained(
    pretrained: str,
    loss: str = "ce",
    *,
    token_counts: Tensor | None = None,
    reference: nn.Module | None = None,
    **kwargs: Any,
) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained(pretrained, ...)``, patched with ``loss``: keywords that are the
    loss's settings (its parameters, the modifiers) configure it, the rest go to ``from_pretrained``
    (``dtype``, ``device_map``, ...)."""
    from transformers import AutoModelForCausalLM

    own = loss_settings(loss)
    settings = {k: kwargs.pop(k) for k in list(kwargs) if k in own}
    model = AutoModelForCausalLM.from_pretrained(pretrained, **kwargs)
    return patch(model, loss, token_counts=token_counts, reference=reference, **settings)


class ModelLoss:
    """Mix into a ``Trainer`` subclass whose ``compute_loss`` computes a loss of its own (TRL's ``SFTTrainer``
    since 1.0 projects the hidden states itself), so that training uses the patched model's loss:
    ``class SFT(losslab.hf.ModelLoss, trl.SFTTrainer): pass``. It is ``transformers.Trainer.compute_loss``:
    ``num_items_in_batch`` and the accumulation average as there."""

    def compute_loss(
        self, model: Any, inputs: Any, return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        from transformers import Trainer

        return Trainer.compute_loss(self, model, inputs, return_outputs=return_outputs,  # type: ignore[arg-type]
                                    num_items_in_batch=num_items_in_batch)  # fmt: skip


__all__ = ["FAMILIES", "ModelLoss", "declare", "from_pretrained", "loss_settings", "patch", "unpatch"]
