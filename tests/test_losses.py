"""Every loss x {fused, reference} x {with, without ignored labels} against an independent float64 reference."""

from __future__ import annotations

import pytest
import torch

from trainer.losses import IGNORE_INDEX, LOSSES, LossConfig, build_loss

N, D, V = 96, 24, 70


def naive_loss(hidden, weight, labels, cfg: LossConfig, counts=None) -> torch.Tensor:
    """Written from the papers' formulas, sharing no code with trainer.losses."""
    z = hidden.double() @ weight.double().T  # [N, V]
    logp = torch.log_softmax(z, dim=-1)
    valid = labels != IGNORE_INDEX
    y = labels.clamp(min=0)
    ce = -logp[torch.arange(len(y), device=y.device), y] * valid  # [N]
    p_all = logp.detach().exp()
    entropy = -(p_all * logp.detach()).sum(-1)
    counted = torch.ones_like(valid) if cfg.count_ignored else valid
    if cfg.name == "ce":
        return ce.sum() / valid.sum()
    if cfg.name == "focal_lin":
        pt = torch.exp(-ce)
        return (cfg.focal_alpha * (1 - pt) ** cfg.gamma * ce * valid).sum() / valid.sum()
    if cfg.name == "mile":
        w = (1 + entropy) ** cfg.gamma
    elif cfg.name == "focal":
        w = (1 - torch.exp(-ce.detach())) ** cfg.gamma
    elif cfg.name == "pdl":
        table = (counts.double() + cfg.smoothing + cfg.eps) ** (-cfg.alpha)
        w = table[y]
    else:
        raise AssertionError(cfg.name)
    w = w * counted
    n = counted.sum()
    return (w * ce).sum() / n * (n / w.sum())  # official form: mean(a * w * ce), a = 1 / mean(w)


def make_inputs(dtype, ignore: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    weight = (torch.randn(V, D, generator=g, dtype=torch.float64) * 0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (N,), generator=g)
    if ignore:
        labels[torch.randperm(N, generator=g)[: N // 4]] = IGNORE_INDEX
    counts = torch.randint(0, 500, (V,), generator=g)
    counts[:3] = 0  # tokens never seen (specials)
    return hidden, weight, labels, counts


def loss_and_grads(loss_fn, hidden, weight, labels):
    out = loss_fn(hidden, weight, labels)
    gh, gw = torch.autograd.grad(out.loss, (hidden, weight))
    return out, gh, gw


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


LOSS_PARAMS = {
    "ce": {},
    "mile": {"gamma": 1.3},
    "focal": {"gamma": 1.5},
    "focal_lin": {"gamma": 2.0, "focal_alpha": 0.25},
    "pdl": {"alpha": 0.7},
}


def test_every_registered_loss_is_covered():
    assert set(LOSS_PARAMS) == set(LOSSES)


@pytest.mark.parametrize("name", sorted(LOSS_PARAMS))
@pytest.mark.parametrize("fused", ["true", "false"])
@pytest.mark.parametrize("ignore", [False, True])
def test_float64_matches_naive_reference(name, fused, ignore):
    hidden, weight, labels, counts = make_inputs(torch.float64, ignore)
    cfg = LossConfig(name=name, fused=fused, chunk_size=17, **LOSS_PARAMS[name])  # 17: a ragged last chunk
    out, gh, gw = loss_and_grads(build_loss(cfg, token_counts=counts), hidden, weight, labels)
    ref = naive_loss(hidden, weight, labels, cfg, counts)
    rh, rw = torch.autograd.grad(ref, (hidden, weight))
    assert abs(out.loss.item() - ref.item()) / abs(ref.item()) < 1e-6
    assert rel_err(gh, rh) < 1e-6
    assert rel_err(gw, rw) < 1e-6
    assert out.metrics["tokens"].item() == (labels != IGNORE_INDEX).sum().item()


@pytest.mark.parametrize("name", ["mile", "focal"])
@pytest.mark.parametrize("fused", ["true", "false"])
def test_official_ignored_counting(name, fused):
    hidden, weight, labels, _ = make_inputs(torch.float64, ignore=True)
    cfg = LossConfig(name=name, fused=fused, chunk_size=17, count_ignored=True)
    out, gh, gw = loss_and_grads(build_loss(cfg), hidden, weight, labels)
    ref = naive_loss(hidden, weight, labels, cfg)
    rh, rw = torch.autograd.grad(ref, (hidden, weight))
    assert abs(out.loss.item() - ref.item()) / abs(ref.item()) < 1e-6
    assert rel_err(gh, rh) < 1e-6 and rel_err(gw, rw) < 1e-6
    # the quirk changes the value whenever positions are ignored (mile: ignored rows still add (1+H)^gamma)
    clean = build_loss(LossConfig(name=name, fused=fused, count_ignored=False))(hidden, weight, labels)
    if name == "mile":
        assert abs(clean.loss.item() - out.loss.item()) > 1e-6


@pytest.mark.parametrize("name,zero", [("mile", {"gamma": 0.0}), ("focal", {"gamma": 0.0}), ("pdl", {"alpha": 0.0})])
@pytest.mark.parametrize("fused", ["true", "false"])
def test_zero_exponent_is_exactly_ce(name, zero, fused):
    hidden, weight, labels, counts = make_inputs(torch.float64, ignore=True)
    ce, gh_ce, gw_ce = loss_and_grads(build_loss({"name": "ce", "fused": fused}), hidden, weight, labels)
    out, gh, gw = loss_and_grads(build_loss({"name": name, "fused": fused, **zero}, counts), hidden, weight, labels)
    assert torch.allclose(out.loss, ce.loss, rtol=1e-12, atol=0)
    assert torch.allclose(gh, gh_ce, rtol=1e-10, atol=1e-15) and torch.allclose(gw, gw_ce, rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("name", sorted(LOSS_PARAMS))
@pytest.mark.parametrize("mode", ["bf16", "autocast"])
def test_low_precision_fused_within_tolerance_of_float64(name, mode):
    """bf16 inputs; or fp32 parameters under bf16 autocast (the benchmark's and a plain-torch user's set-up),
    whose gradients come out in fp32."""
    dtype = torch.bfloat16 if mode == "bf16" else torch.float32
    hidden, weight, labels, counts = make_inputs(dtype, ignore=True, seed=3)
    cfg = LossConfig(name=name, fused="true", chunk_size=32, **LOSS_PARAMS[name])
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
        out, gh, gw = loss_and_grads(build_loss(cfg, counts), hidden, weight, labels)
    h64 = hidden.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    ref = naive_loss(h64, w64, labels, cfg, counts)
    rh, rw = torch.autograd.grad(ref, (h64, w64))
    assert gh.dtype == dtype and gw.dtype == dtype
    assert abs(out.loss.item() - ref.item()) / abs(ref.item()) < 2e-2
    assert rel_err(gh, rh) < 3e-2 and rel_err(gw, rw) < 3e-2


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_closed_form_coefficient_is_the_derivative(name):
    """A loss declaring ``linear_in_ce`` gets dl/dce = w without autograd in the fused path: check the claim."""
    weighting = LOSSES[name](LossConfig(name=name, **LOSS_PARAMS[name]), torch.randint(1, 50, (V,)))
    ce = (torch.rand(N, dtype=torch.float64) * 5).requires_grad_()
    entropy, labels = torch.rand(N, dtype=torch.float64) * 3, torch.randint(0, V, (N,))
    terms, w = weighting.row_terms(ce, entropy, labels)
    (dl,) = torch.autograd.grad(terms.sum(), ce)
    assert torch.allclose(dl, w.detach()) == weighting.linear_in_ce


def test_fused_backward_runs_once():
    hidden, weight, labels, _ = make_inputs(torch.float64, ignore=False)
    out = build_loss({"name": "mile", "fused": "true"})(hidden, weight, labels)
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward runs once"):
        out.loss.backward()


def test_mile_weight_bounds_and_metrics():
    hidden, weight, labels, _ = make_inputs(torch.float64, ignore=False)
    out = build_loss({"name": "mile", "gamma": 1.0})(hidden, weight, labels)
    mean_w = out.metrics["weight"].item()
    assert 1.0 <= mean_w <= 1.0 + torch.log(torch.tensor(float(V))).item()
    assert abs(mean_w - (1.0 + out.metrics["entropy"].item())) < 1e-9  # gamma 1: w = 1 + H


def test_pdl_smoothing_keeps_unseen_tokens_bounded():
    counts = torch.tensor([0, 0, 10, 1000, 100000])
    official = LossConfig(name="pdl", smoothing=0.0, eps=1e-7)
    smoothed = LossConfig(name="pdl", smoothing=1.0)
    from trainer.losses import pdl_weights

    w_off, w_s = pdl_weights(counts, official), pdl_weights(counts, smoothed)
    assert w_off[0] / w_off[2] > 1e6  # the official pitfall: unseen tokens swamp the batch
    assert w_s[0] / w_s[2] < 20
    # weights are normalised to mean 1 per corpus occurrence; clipping caps them
    assert torch.isclose((w_s * counts).sum() / counts.sum(), torch.tensor(1.0, dtype=torch.float64))
    clipped = pdl_weights(counts, LossConfig(name="pdl", smoothing=1.0, max_weight=5.0))
    assert clipped.max().item() == 5.0


def test_pdl_needs_counts_and_unknown_names_fail_clearly():
    with pytest.raises(ValueError, match="token_counts"):
        build_loss({"name": "pdl"})
    with pytest.raises(ValueError, match="valid losses"):
        build_loss({"name": "nope"})
    with pytest.raises(ValueError, match="unknown loss keys"):
        build_loss({"name": "ce", "gama": 1.0})


def test_fused_never_materialises_full_logits():
    """With chunk_size c, the largest float tensor allocated is c x V, not N x V."""
    hidden, weight, labels, _ = make_inputs(torch.float32, ignore=False)
    seen = []

    class Spy(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            if isinstance(result, torch.Tensor):
                seen.append(result.numel())
            return result

    loss_fn = build_loss({"name": "mile", "fused": "true", "chunk_size": 8})
    with Spy():
        out = loss_fn(hidden, weight, labels)
    out.loss.backward()
    assert max(seen) <= max(8 * V, V * D, N * D)


@pytest.mark.parametrize("fused", ["true", "false"])
def test_global_token_denominator_makes_accumulation_exact(fused):
    """Two micro-batches with different numbers of ignored labels: averaging their losses (what gradient
    accumulation does) equals the mean over all tokens only with the global denominator."""
    hidden, weight, labels, _ = make_inputs(torch.float64, ignore=False)
    labels = labels.clone()
    labels[: N // 2 : 3] = IGNORE_INDEX  # the first half loses a third of its labels, the second half none
    halves = [slice(0, N // 2), slice(N // 2, N)]
    valid = (labels != IGNORE_INDEX).sum().double()
    loss_fn = build_loss({"name": "ce", "fused": fused})
    accumulated = sum(loss_fn(hidden[s], weight, labels[s], denominator=valid / 2).loss for s in halves) / 2
    naive = sum(loss_fn(hidden[s], weight, labels[s]).loss for s in halves) / 2
    full = torch.nn.functional.cross_entropy(hidden @ weight.T, labels, ignore_index=IGNORE_INDEX)
    assert abs(accumulated.item() - full.item()) < 1e-12
    assert abs(naive.item() - full.item()) > 1e-4  # per-micro-batch means are biased here
    g_acc = torch.autograd.grad(accumulated, hidden)[0]
    g_full = torch.autograd.grad(full, hidden)[0]
    assert rel_err(g_acc, g_full) < 1e-10


def test_mixed_precision_accumulation_is_checked_before_it_is_trusted():
    """On CUDA the fused path accumulates bf16 products into fp32 with whichever overload this PyTorch gets
    right; a build that raises or returns wrong numbers falls through to the next candidate."""
    from trainer.losses.paths import MIXED_ADDMM, pick_mixed_addmm

    def broken(acc, g, h):  # runs, but wrong
        acc.add_(1.0)

    def missing(acc, g, h):
        raise NotImplementedError

    cpu = torch.device("cpu")

    def exact(acc, g, h):
        acc.addmm_(g.T.float(), h.float())

    assert pick_mixed_addmm(cpu, torch.bfloat16, torch.float32, (broken, missing, exact, MIXED_ADDMM[-1])) is exact
    assert pick_mixed_addmm(cpu, torch.bfloat16, torch.float32, (broken, missing, MIXED_ADDMM[-1])) is MIXED_ADDMM[-1]
