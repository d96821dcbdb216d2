"""The fused path's CPU choices (issue #18) against the float64 reference: the head in fp32 under autocast where
the CPU only emulates bf16, smaller blocks, and the entropy computed only when something reads it."""

from __future__ import annotations

import math

import pytest
import torch

from losslab.losses import LOSSES, LossConfig, TokenWeighting, build_loss
from losslab.losses.paths import (
    CHUNK_BYTES,
    CPU_CHUNK_BYTES,
    default_chunk_rows,
    entropy_from_logits,
    slow_low_precision_cpu,
)
from tests.test_losses import LOSS_PARAMS, make_inputs, naive_loss, rel_err


def fused_loss_and_grads(name: str, hidden, weight, labels, counts, autocast: bool, **extra):
    cfg = LossConfig(name=name, fused="true", chunk_size=40, **LOSS_PARAMS[name], **extra)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = build_loss(cfg, counts)(hidden, weight, labels)
    return out, *torch.autograd.grad(out.loss, (hidden, weight))


@pytest.mark.parametrize("name", ["ce", "mile", "pdl"])
def test_bf16_autocast_on_the_cpu_matches_float64(name):
    """Where the CPU has no native bf16 the fused head runs in fp32 (more exact than the bf16 it was asked for):
    the result is fp32's, to rounding; where it has, bf16's tolerance. Gradients come back in the inputs' dtype."""
    hidden, weight, labels, counts = make_inputs(torch.float32, ignore=True)
    out, gh, gw = fused_loss_and_grads(name, hidden, weight, labels, counts, autocast=True)
    assert gh.dtype == hidden.dtype and gw.dtype == weight.dtype
    cfg = LossConfig(name=name, **LOSS_PARAMS[name])
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    ref = naive_loss(h64, w64, labels, cfg, counts)
    rh, rw = torch.autograd.grad(ref, (h64, w64))
    tol = 1e-5 if slow_low_precision_cpu(torch.bfloat16) else 3e-2
    errs = (abs(out.loss.item() - ref.item()) / abs(ref.item()), rel_err(gh, rh), rel_err(gw, rw))
    assert max(errs) < tol, errs
    if slow_low_precision_cpu(torch.bfloat16):  # exactly the fp32 computation
        out32, gh32, gw32 = fused_loss_and_grads(name, hidden, weight, labels, counts, autocast=False)
        assert out.loss.item() == out32.loss.item() and torch.equal(gh, gh32) and torch.equal(gw, gw32)


def test_a_bf16_hidden_state_gets_a_bf16_gradient():
    """A low-precision model (no autocast): the head runs as the CPU allows, the gradients keep the dtypes."""
    hidden, weight, labels, counts = make_inputs(torch.float32, ignore=False)
    hb, wb = hidden.detach().bfloat16().requires_grad_(), weight.detach().bfloat16().requires_grad_()
    out, gh, gw = fused_loss_and_grads("ce", hb, wb, labels, counts, autocast=False)
    assert gh.dtype == gw.dtype == torch.bfloat16
    ref = build_loss({"name": "ce", "fused": "false"})(hb.detach().double(), wb.detach().double(), labels)
    assert abs(out.loss.item() - ref.loss.item()) < 1e-3 * ref.loss.item()


def test_cpu_blocks_are_smaller_than_gpu_blocks_but_never_fewer_rows_than_d():
    fp32 = torch.float32
    assert default_chunk_rows(8000, 128, fp32, "cpu") == CPU_CHUNK_BYTES // (8000 * 4)
    assert default_chunk_rows(8000, 128, fp32, "cuda") == CHUNK_BYTES // (8000 * 4)
    for device in ("cpu", "cuda"):  # never fewer rows than d: the head-weight gradient's addmm stays compute-bound
        assert default_chunk_rows(2**20, 512, fp32, device) == 512
    # every chunking gives the same numbers (the blocks are independent)
    hidden, weight, labels, _ = make_inputs(torch.float64, ignore=True)
    results = []
    for chunk in (0, 7, 96):
        cfg = LossConfig(name="mile", fused="true", chunk_size=chunk, gamma=1.3)
        results.append(build_loss(cfg)(hidden, weight, labels).loss.item())
    assert max(results) - min(results) < 1e-12 * abs(results[0])


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_the_entropy_metric_is_there_exactly_when_computed(name):
    """Only mile reads the entropy; any loss logs it with loss.log_entropy, and then it is the float64 one."""
    hidden, weight, labels, counts = make_inputs(torch.float64, ignore=True)
    inputs = {"weight": torch.rand(len(labels), dtype=torch.float64), "ref_ce": torch.rand(len(labels)) * 5}
    valid = labels != -100
    h_ref = entropy_from_logits(hidden.detach() @ weight.detach().T)[valid].mean().item()
    for fused in ("true", "false"):
        for log_entropy in (False, True):
            cfg = LossConfig(name=name, fused=fused, log_entropy=log_entropy, **LOSS_PARAMS[name])
            out = build_loss(cfg, counts)(hidden, weight, labels, token_inputs=inputs)
            assert math.isfinite(out.loss.item())
            if log_entropy or name == "mile":
                assert abs(out.metrics["entropy"].item() - h_ref) < 1e-10
            else:
                assert "entropy" not in out.metrics


class ReadsEntropyButSaysNot(TokenWeighting):
    """A plug-in that declares it does not read the entropy, and does."""

    needs_entropy = False

    def row_terms(self, ce, rows):
        return (1.0 + rows.entropy) * ce, torch.ones_like(ce)


class ReadsEntropy(ReadsEntropyButSaysNot):
    needs_entropy = True  # the default of every plug-in


def test_a_plugin_gets_the_entropy_unless_it_declares_it_does_not_read_it():
    """A wrong declaration gives NaN, loudly, never a number computed from stale memory."""
    hidden, weight, labels, _ = make_inputs(torch.float64, ignore=True)
    here = __name__
    wrong = build_loss({"name": f"{here}:ReadsEntropyButSaysNot", "fused": "true"})(hidden, weight, labels)
    assert math.isnan(wrong.loss.item())
    right = build_loss({"name": f"{here}:ReadsEntropy", "fused": "true"})(hidden, weight, labels)
    naive = build_loss({"name": f"{here}:ReadsEntropy", "fused": "false"})(hidden, weight, labels)
    assert abs(right.loss.item() - naive.loss.item()) < 1e-10 * abs(naive.loss.item())


@pytest.mark.parametrize("name", ["ce", "mile"])
def test_a_target_whose_probability_underflows_keeps_its_exact_loss(name):
    """The torch kernel reads the CE as -log p_y from the softmax; where p_y underflows fp32 (CE above ~87, e.g.
    a confidently wrong model) it must fall back to the logsumexp, not report an infinite or capped loss."""
    hidden, weight, labels, counts = make_inputs(torch.float32, ignore=True)
    with torch.no_grad():
        hidden[:5] *= 60  # logits spread over hundreds of units: the label's probability is 0 in fp32
    assert (torch.softmax(hidden[:5] @ weight.T, -1).gather(1, labels[:5, None].clamp_min(0)) == 0).any()
    out, gh, gw = fused_loss_and_grads(name, hidden, weight, labels, counts, autocast=False)
    cfg = LossConfig(name=name, **LOSS_PARAMS[name])
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    ref = naive_loss(h64, w64, labels, cfg, counts)
    rh, rw = torch.autograd.grad(ref, (h64, w64))
    assert math.isfinite(out.loss.item())
    errs = (abs(out.loss.item() - ref.item()) / abs(ref.item()), rel_err(gh, rh), rel_err(gw, rw))
    assert max(errs) < 1e-4, errs  # fp32 rounding of logits hundreds of units apart (the entropy cancels them)
