"""The training objective pinned to an independent truth: on a real batch from the data source, the loss the
trainer backpropagates is the mean next-token cross-entropy written out by hand in float64 (labels are the
inputs shifted by one), and so are its gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from data.stream import PackedStream
from data.tokenizer import Tokenizer
from losslab.losses import build_loss
from models import GPT, GPTConfig
from trainer.objective import CausalLMObjective


@pytest.fixture(scope="module")
def batch_and_model(corpus):
    tok = Tokenizer(corpus["tokenizer"])
    stream = PackedStream([corpus["train_glob"]], tok, seq_len=24, batch_size=3, seed=0)
    windows = next(iter(stream))  # [3, 25]: a real batch of packed windows, as the trainer gets them
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, n_layers=2, d_model=32, n_heads=2, d_mlp=64, max_seq_len=32))
    with torch.no_grad():  # far from uniform, so that every choice of labels gives a clearly different loss
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return windows, model.double()


def hand_ce(model: GPT, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over every position t of -log softmax(logits[t])[labels[t]], float64, nothing shared with the loss."""
    logits = model.logits(inputs).double()  # [B, T, V]
    logp = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
    return -logp.gather(-1, labels[..., None]).mean()


@pytest.mark.parametrize("fused", ["true", "false"])
def test_objective_is_the_mean_next_token_cross_entropy(batch_and_model, fused):
    windows, model = batch_and_model
    assert windows.shape == (3, 25) and windows.dtype == torch.long
    objective = CausalLMObjective(model, build_loss({"name": "ce", "fused": fused, "chunk_size": 16}))
    out = objective(windows)
    inputs, next_tokens = windows[:, :-1], windows[:, 1:]
    expected = hand_ce(model, inputs, next_tokens)
    assert abs(out.loss.item() - expected.item()) < 1e-10, (out.loss.item(), expected.item())
    # the truth is sharp: labels equal to the inputs, or shifted the wrong way, give a different loss
    assert abs(hand_ce(model, inputs, inputs).item() - expected.item()) > 0.05
    assert abs(hand_ce(model, windows[:, 1:], windows[:, :-1]).item() - expected.item()) > 0.05
    assert out.metrics["tokens"].item() == next_tokens.numel()
    assert abs(out.metrics["ce"].item() - expected.item()) < 1e-10

    params = [p for p in model.parameters() if p.requires_grad]
    got = torch.autograd.grad(out.loss, params, allow_unused=True)
    ref = torch.autograd.grad(hand_ce(model, inputs, next_tokens), params, allow_unused=True)
    for (name, _), g, r in zip(model.named_parameters(), got, ref, strict=True):
        g = torch.zeros_like(_) if g is None else g
        r = torch.zeros_like(_) if r is None else r
        assert torch.allclose(g, r, rtol=1e-9, atol=1e-12), name


def test_objective_with_a_denominator_divides_the_summed_loss_by_it(batch_and_model):
    """The trainer's global-token denominator: the loss is sum of CE / denominator, not this batch's mean."""
    windows, model = batch_and_model
    objective = CausalLMObjective(model, build_loss({"name": "ce", "fused": "true"}))
    denominator = torch.tensor(50.0, dtype=torch.float64)
    out = objective(windows, denominator=denominator)
    total = hand_ce(model, windows[:, :-1], windows[:, 1:]) * windows[:, 1:].numel()
    assert abs(out.loss.item() - (total / 50.0).item()) < 1e-9


def test_cross_entropy_helper_agrees_with_torch(batch_and_model):
    """The hand-written reference itself, checked once against torch's cross-entropy."""
    windows, model = batch_and_model
    with torch.no_grad():
        logits = model.logits(windows[:, :-1])
        ref = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
        assert abs(hand_ce(model, windows[:, :-1], windows[:, 1:]).item() - ref.item()) < 1e-12


@pytest.mark.parametrize("fused", ["true", "false"])
def test_ignored_labels_are_left_out_of_the_loss_and_its_metrics(batch_and_model, fused):
    """A padded final label (-100, the only place the inputs allow one): the loss and the logged CE are the mean
    over the remaining labels, and the token count leaves it out."""
    windows, model = batch_and_model
    padded = windows.clone()
    padded[0, -1] = padded[2, -1] = -100
    out = CausalLMObjective(model, build_loss({"name": "ce", "fused": fused}))(padded)
    logits = model.logits(padded[:, :-1]).double()
    logp = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
    labels = padded[:, 1:]
    valid = labels != -100
    expected = -(logp.gather(-1, labels.clamp_min(0)[..., None])[..., 0] * valid).sum() / valid.sum()
    assert out.metrics["tokens"].item() == labels.numel() - 2
    assert abs(out.loss.item() - expected.item()) < 1e-10
    assert abs(out.metrics["ce"].item() - expected.item()) < 1e-10


def test_packed_documents_are_scored_as_if_each_were_alone(batch_and_model):
    """With segment ids, the objective is the mean next-token CE of each document run through the model on its
    own (attention and rotary positions restart at a document); no position predicts the next document's first
    token."""
    windows, model = batch_and_model  # [3, 25]
    runs = [[(0, 10), (10, 25)], [(0, 25)], [(0, 4), (4, 16), (16, 25)]]  # [start, end) of each document
    segment_ids = torch.zeros_like(windows)
    for row, spans in enumerate(runs):
        for doc, (a, b) in enumerate(spans):
            segment_ids[row, a:b] = doc % 2  # ids may repeat in a row: a document is a run of equal ids
    out = CausalLMObjective(model, build_loss({"name": "ce", "fused": "true"}))(windows, segment_ids=segment_ids)
    total, count = 0.0, 0
    for row, spans in enumerate(runs):
        for a, b in spans:
            doc = windows[row, a:b]
            total += hand_ce(model, doc[None, :-1], doc[None, 1:]).item() * (b - a - 1)
            count += b - a - 1
    assert out.metrics["tokens"].item() == count == 3 * 24 - 3
    assert abs(out.loss.item() - total / count) < 1e-10


def test_given_labels_replace_the_next_tokens(batch_and_model):
    """Explicit labels (a fine-tuning prompt masked with -100): the loss is the mean CE of the kept labels."""
    windows, model = batch_and_model
    labels = windows[:, 1:].clone()
    labels[:, :7] = -100  # the prompt
    labels[1, 10] = 5  # a target that is not the next input token
    out = CausalLMObjective(model, build_loss({"name": "ce", "fused": "true"}))(windows, labels=labels)
    logits = model.logits(windows[:, :-1]).double()
    logp = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
    valid = labels != -100
    expected = -(logp.gather(-1, labels.clamp_min(0)[..., None])[..., 0] * valid).sum() / valid.sum()
    assert out.metrics["tokens"].item() == 3 * (24 - 7)
    assert abs(out.loss.item() - expected.item()) < 1e-10
