"""Every loss x {fused, reference} x {with, without ignored labels} against an independent float64 reference."""

from __future__ import annotations

import math

import pytest
import torch

from losslab.losses import IGNORE_INDEX, LOSSES, LossConfig, build_loss

N, D, V = 96, 24, 70


def naive_loss(hidden, weight, labels, cfg: LossConfig, counts=None, inputs=None) -> torch.Tensor:
    """Written from the papers' formulas, sharing no code with losslab.losses."""
    z = hidden.double() @ weight.double().T  # [N, V]
    logp = torch.log_softmax(z, dim=-1)
    valid = labels != IGNORE_INDEX
    y = labels.clamp(min=0)
    ce = -logp[torch.arange(len(y), device=y.device), y] * valid  # [N]
    e = cfg.label_smoothing
    ce_loss = ((1 - e) * ce - e * logp.mean(-1)) * valid  # the CE of the loss term: smoothed, masked
    p_all = logp.detach().exp()
    entropy = -(p_all * logp.detach()).sum(-1)
    if cfg.entropy_clamp:  # the official MiLe code: probs = clamp(softmax, eps, 1); -sum probs log probs
        clamped = p_all.clamp(cfg.entropy_clamp, 1.0)
        entropy = -(clamped * clamped.log()).sum(-1)
    counted = torch.ones_like(valid) if cfg.count_ignored else valid
    n_valid = valid.sum()
    z_loss = cfg.z_loss * (torch.logsumexp(z, -1) ** 2 * valid).sum() / n_valid
    if cfg.name == "ce":
        return ce_loss.sum() / n_valid + z_loss
    if cfg.name == "dft":
        return (torch.exp(-ce.detach()) * ce_loss).sum() / n_valid + z_loss
    if cfg.name == "focal_lin":
        pt = torch.exp(-ce)
        return (cfg.focal_alpha * (1 - pt) ** cfg.gamma * ce_loss).sum() / n_valid + z_loss
    if cfg.name == "rho1":
        excess = (ce.detach() - inputs["ref_ce"].double()).tolist()
        k = math.ceil(cfg.keep_ratio * int(n_valid))
        ranked = sorted((i for i in range(len(y)) if valid[i]), key=lambda i: (-excess[i], i))  # ties: earlier
        return ce_loss[ranked[:k]].sum() / (n_valid if cfg.normalise == "tokens" else k) + z_loss
    if cfg.name == "mile":
        w = (1 + entropy) ** cfg.gamma
    elif cfg.name == "focal":
        w = (1 - torch.exp(-ce.detach())) ** cfg.gamma
    elif cfg.name == "pdl":
        table = (counts.double() + cfg.smoothing + cfg.eps) ** (-cfg.alpha)
        # mean 1 per corpus occurrence: no change to the ratio of the official form, the scale of the token-mean one
        table = table / ((table * counts).sum() / counts.sum())
        w = table[y]
    elif cfg.name == "weighted":
        w = inputs["weight"].double()
    else:
        raise AssertionError(cfg.name)
    w = w * counted
    n = counted.sum()
    if cfg.normalise == "tokens":  # the weighted sum over the target tokens, as CE divides
        return (w * ce_loss).sum() / n_valid + z_loss
    return (w * ce_loss).sum() / n * (n / w.sum()) + z_loss  # official form: mean(a * w * ce), a = 1 / mean(w)


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


def make_token_inputs(n: int = N, seed: int = 0) -> dict[str, torch.Tensor]:
    """Data-carried per-token streams: weights in [0, 2) with a fifth of them exactly 0, and reference CEs."""
    g = torch.Generator().manual_seed(seed + 1)
    weight = torch.rand(n, generator=g, dtype=torch.float64) * 2
    weight[torch.randperm(n, generator=g)[: n // 5]] = 0.0
    return {"weight": weight, "ref_ce": torch.rand(n, generator=g, dtype=torch.float64) * 5}


def loss_and_grads(loss_fn, hidden, weight, labels, token_inputs=None):
    out = loss_fn(hidden, weight, labels, token_inputs=token_inputs)
    gh, gw = torch.autograd.grad(out.loss, (hidden, weight))
    return out, gh, gw


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


LOSS_PARAMS = {
    "ce": {},
    "dft": {},
    "mile": {"gamma": 1.3},
    "focal": {"gamma": 1.5},
    "focal_lin": {"gamma": 2.0, "focal_alpha": 0.25},
    "pdl": {"alpha": 0.7},
    "rho1": {"keep_ratio": 0.6},
    "weighted": {},
}
MODIFIERS = {"smoothing": {"label_smoothing": 0.1}, "z_loss": {"z_loss": 0.05}, "both": {"label_smoothing": 0.2,
             "z_loss": 0.02}}  # fmt: skip
FUSED_CASES = (
    [(name, {"name": name, **params}) for name, params in sorted(LOSS_PARAMS.items())]
    + [
        (f"{name}+ls+z", {"name": name, **LOSS_PARAMS[name], **MODIFIERS["both"]})
        for name in ("ce", "mile", "focal_lin", "rho1")  # closed-form, normalised, autograd and two-pass gradients
    ]
    + [("mile+clamp", {"name": "mile", **LOSS_PARAMS["mile"], "entropy_clamp": 1e-8})]
)
"""(label, loss config) of every fused configuration that the GPU check runs (scripts/gpu/check_losses.py):
each loss, both modifiers on a loss of each kind of gradient, and MiLe with the official clamped entropy."""


def test_every_registered_loss_is_covered():
    assert set(LOSS_PARAMS) == set(LOSSES)
    assert {cfg["name"] for _, cfg in FUSED_CASES} == set(LOSSES)


def check_against_naive(cfg: LossConfig, ignore: bool, tol: float = 1e-6) -> None:
    hidden, weight, labels, counts = make_inputs(torch.float64, ignore)
    inputs = make_token_inputs()
    out, gh, gw = loss_and_grads(build_loss(cfg, token_counts=counts), hidden, weight, labels, inputs)
    ref = naive_loss(hidden, weight, labels, cfg, counts, inputs)
    rh, rw = torch.autograd.grad(ref, (hidden, weight))
    assert abs(out.loss.item() - ref.item()) / abs(ref.item()) < tol
    assert rel_err(gh, rh) < tol
    assert rel_err(gw, rw) < tol
    assert out.metrics["tokens"].item() == (labels != IGNORE_INDEX).sum().item()


@pytest.mark.parametrize("name", sorted(LOSS_PARAMS))
@pytest.mark.parametrize("fused", ["true", "false"])
@pytest.mark.parametrize("ignore", [False, True])
def test_float64_matches_naive_reference(name, fused, ignore):
    # chunk 17: a ragged last chunk
    check_against_naive(LossConfig(name=name, fused=fused, chunk_size=17, **LOSS_PARAMS[name]), ignore)


@pytest.mark.parametrize("name", sorted(LOSS_PARAMS))
@pytest.mark.parametrize("modifier", sorted(MODIFIERS))
@pytest.mark.parametrize("fused", ["true", "false"])
@pytest.mark.parametrize("ignore", [False, True])
def test_modifiers_compose_with_every_loss(name, modifier, fused, ignore):
    cfg = LossConfig(name=name, fused=fused, chunk_size=17, **LOSS_PARAMS[name], **MODIFIERS[modifier])
    check_against_naive(cfg, ignore)


@pytest.mark.parametrize("fused", ["true", "false"])
@pytest.mark.parametrize(
    "name,neutral",
    [
        ("ce", {"label_smoothing": 0.0, "z_loss": 0.0}),
        ("rho1", {"keep_ratio": 1.0}),  # with ref_ce = 0: every valid token kept
        ("weighted", {}),  # with unit weights
        ("dft", {}),  # only where p_y = 1 would it be CE; checked below to differ
    ],
)
def test_neutral_settings_reduce_exactly_to_ce(name, neutral, fused):
    hidden, weight, labels, _ = make_inputs(torch.float64, ignore=True)
    inputs = {"weight": torch.ones(N, dtype=torch.float64), "ref_ce": torch.zeros(N, dtype=torch.float64)}
    ce, gh_ce, gw_ce = loss_and_grads(build_loss({"name": "ce", "fused": fused}), hidden, weight, labels)
    out, gh, gw = loss_and_grads(build_loss({"name": name, "fused": fused, **neutral}), hidden, weight, labels, inputs)
    same = torch.allclose(out.loss, ce.loss, rtol=1e-12, atol=0)
    if name == "dft":
        assert not same  # sg(p_y) weights: not CE
        return
    assert same
    assert torch.allclose(gh, gh_ce, rtol=1e-10, atol=1e-15) and torch.allclose(gw, gw_ce, rtol=1e-10, atol=1e-15)
    assert out.metrics["z_loss"].item() == 0.0


@pytest.mark.parametrize("fused", ["true", "false"])
@pytest.mark.parametrize("ignore", [False, True])
def test_official_clamped_entropy(fused, ignore):
    """entropy_clamp = 1e-8 reproduces the official MiLe entropy; at peaked distributions it is not the exact one."""
    hidden, weight, labels, _ = make_inputs(torch.float64, ignore)
    hidden = (hidden.detach() * 6).requires_grad_()  # peaked: many probabilities below 1e-8
    results = {}
    for clamp in (0.0, 1e-8):
        cfg = LossConfig(name="mile", fused=fused, chunk_size=17, entropy_clamp=clamp, **LOSS_PARAMS["mile"])
        out, gh, gw = loss_and_grads(build_loss(cfg), hidden, weight, labels)
        ref = naive_loss(hidden, weight, labels, cfg)
        rh, rw = torch.autograd.grad(ref, (hidden, weight))
        assert abs(out.loss.item() - ref.item()) / abs(ref.item()) < 1e-10
        assert rel_err(gh, rh) < 1e-10 and rel_err(gw, rw) < 1e-10
        results[clamp] = (out.loss.item(), out.metrics["entropy"].item())
    assert abs(results[1e-8][1] - results[0.0][1]) > 1e-7  # the clamp adds entropy from the tiny probabilities
    assert results[1e-8][0] != results[0.0][0]


@pytest.mark.parametrize("fused", ["true", "false"])
def test_z_loss_stays_a_mean_over_valid_tokens_with_the_official_counting(fused):
    """count_ignored makes MiLe divide by all positions; the z-loss still averages over the valid ones."""
    cfg = LossConfig(name="mile", fused=fused, chunk_size=17, count_ignored=True, **MODIFIERS["both"])
    check_against_naive(cfg, ignore=True)


@pytest.mark.parametrize("fused", ["true", "false"])
def test_tokens_of_weight_zero_contribute_no_gradient(fused):
    hidden, weight, labels, _ = make_inputs(torch.float64, ignore=False)
    inputs = make_token_inputs()
    zero = inputs["weight"] == 0
    assert zero.any()
    out, gh, _ = loss_and_grads(build_loss({"name": "weighted", "fused": fused}), hidden, weight, labels, inputs)
    assert (gh[zero] == 0).all() and (gh[~zero].abs().sum(-1) > 0).all()
    # and changing a zero-weight token's label changes nothing
    labels2 = labels.clone()
    labels2[zero] = (labels2[zero] + 1) % V
    out2 = build_loss({"name": "weighted", "fused": fused})(hidden, weight, labels2, token_inputs=inputs)
    assert out2.loss.item() == pytest.approx(out.loss.item(), rel=1e-12)


@pytest.mark.parametrize("fused", ["true", "false"])
def test_rho1_trains_only_the_kept_tokens(fused):
    hidden, weight, labels, _ = make_inputs(torch.float64, ignore=True)
    inputs = make_token_inputs()
    valid = labels != IGNORE_INDEX
    out, gh, _ = loss_and_grads(build_loss({"name": "rho1", "fused": fused, "keep_ratio": 0.25}), hidden, weight,
                                labels, inputs)  # fmt: skip
    kept = gh.abs().sum(-1) > 0
    assert kept.sum().item() == math.ceil(0.25 * valid.sum().item()) and not kept[~valid].any()
    assert out.metrics["weight"].item() == pytest.approx(kept.sum().item() / valid.sum().item())


@pytest.mark.parametrize("fused", ["true", "false"])
def test_z_loss_is_logged_separately(fused):
    hidden, weight, labels, _ = make_inputs(torch.float64, ignore=True)
    valid = labels != IGNORE_INDEX
    out = build_loss({"name": "mile", "fused": fused, "z_loss": 1e-4})(hidden, weight, labels)
    lse = torch.logsumexp(hidden.detach() @ weight.detach().T, -1)
    expected = 1e-4 * (lse[valid] ** 2).mean()
    assert out.metrics["z_loss"].item() == pytest.approx(expected.item(), rel=1e-10)
    plain = build_loss({"name": "mile", "fused": fused})(hidden, weight, labels)
    assert out.loss.item() == pytest.approx(plain.loss.item() + expected.item(), rel=1e-10)


def test_token_inputs_are_checked():
    hidden, weight, labels, _ = make_inputs(torch.float64, ignore=False)
    with pytest.raises(ValueError, match=r"loss.name=weighted needs token_inputs \['weight'\]"):
        build_loss({"name": "weighted"})(hidden, weight, labels)
    with pytest.raises(ValueError, match=r"token_inputs\['ref_ce'\] has 5 values for 96 tokens"):
        build_loss({"name": "rho1"})(hidden, weight, labels, token_inputs={"ref_ce": torch.zeros(5)})
    with pytest.raises(ValueError, match=r"loss.label_smoothing=1.0 is out of range: it must be in \[0, 1\)"):
        build_loss({"name": "ce", "label_smoothing": 1.0})
    with pytest.raises(ValueError, match=r"loss.keep_ratio=0.0 is out of range: it must be in \(0, 1\]"):
        build_loss({"name": "rho1", "keep_ratio": 0.0})
    with pytest.raises(ValueError, match=r"loss.entropy_clamp=-1e-08 is out of range"):
        build_loss({"name": "mile", "entropy_clamp": -1e-8})


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
    inputs = make_token_inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
        out, gh, gw = loss_and_grads(build_loss(cfg, counts), hidden, weight, labels, inputs)
    h64 = hidden.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    ref = naive_loss(h64, w64, labels, cfg, counts, inputs)
    rh, rw = torch.autograd.grad(ref, (h64, w64))
    assert gh.dtype == dtype and gw.dtype == dtype
    assert abs(out.loss.item() - ref.item()) / abs(ref.item()) < 2e-2
    assert rel_err(gh, rh) < 3e-2 and rel_err(gw, rw) < 3e-2


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_closed_form_coefficient_is_the_derivative(name):
    """A loss declaring ``linear_in_ce`` gets dl/dce = w without autograd in the fused path: check the claim."""
    from losslab.losses import Rows

    weighting = LOSSES[name](LossConfig(name=name, **LOSS_PARAMS[name]), torch.randint(1, 50, (V,)))
    ce = (torch.rand(N, dtype=torch.float64) * 5).requires_grad_()
    entropy, labels = torch.rand(N, dtype=torch.float64) * 3, torch.randint(0, V, (N,))
    rows = Rows(ce, entropy, entropy + 2, labels, labels >= 0, make_token_inputs())
    terms, w = weighting.row_terms(ce, rows)
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
    from losslab.losses import pdl_weights

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
    with pytest.raises(ValueError, match=r"loss.gama is not a setting of loss.name=ce \(it has no parameters;"):
        build_loss({"name": "ce", "gama": 1.0})


@pytest.mark.parametrize("name", sorted(LOSS_PARAMS))
@pytest.mark.parametrize("modifiers", [{}, MODIFIERS["both"]])
def test_fused_never_materialises_full_logits(name, modifiers):
    """With chunk_size c, the largest float tensor allocated is c x V, not N x V — for every loss, with the
    modifiers and in the two-pass mode (rho1; mile with a z-loss)."""
    hidden, weight, labels, counts = make_inputs(torch.float32, ignore=False)
    inputs = make_token_inputs()
    seen = []

    class Spy(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            if isinstance(result, torch.Tensor):
                seen.append(result.numel())
            return result

    loss_fn = build_loss({"name": name, "fused": "true", "chunk_size": 8, **LOSS_PARAMS[name], **modifiers}, counts)
    with Spy():
        out = loss_fn(hidden, weight, labels, token_inputs=inputs)
    out.loss.backward()
    assert max(seen) <= max(8 * V, V * D, N * D)


NORMALISED = sorted(name for name, cls in LOSSES.items() if cls.normalised)


@pytest.mark.parametrize("name", NORMALISED)
@pytest.mark.parametrize("fused", ["true", "false"])
@pytest.mark.parametrize("ignore", [False, True])
def test_token_normalisation_matches_naive_reference(name, fused, ignore):
    cfg = LossConfig(name=name, fused=fused, chunk_size=17, normalise="tokens", **LOSS_PARAMS[name])
    check_against_naive(cfg, ignore)
    check_against_naive(LossConfig(name=name, normalise="tokens", z_loss=0.05, **LOSS_PARAMS[name]), ignore)


@pytest.mark.parametrize("fused", ["true", "false"])
def test_token_normalised_mile_accumulates_to_the_large_batch(fused):
    """With loss.normalise=tokens a weight-normalised loss divides by the step's token count, so two micro-batches
    averaged with the global denominator give the large batch's loss and gradients; with the official per-call
    normaliser they do not."""
    hidden, weight, labels, _ = make_inputs(torch.float64, ignore=True)
    halves = [slice(0, N // 3), slice(N // 3, N)]  # unequal halves, different entropies
    valid = (labels != IGNORE_INDEX).sum().double()
    for normalise, exact in (("tokens", True), ("weights", False)):
        loss_fn = build_loss("mile", gamma=1.3, fused=fused, normalise=normalise)
        accumulated = sum(loss_fn(hidden[s], weight, labels[s], denominator=valid / 2).loss for s in halves) / 2
        full = loss_fn(hidden, weight, labels).loss
        g_acc, g_full = (torch.autograd.grad(x, hidden)[0] for x in (accumulated, full))
        if exact:
            assert abs(accumulated.item() - full.item()) < 1e-12 and rel_err(g_acc, g_full) < 1e-10
        else:
            assert abs(accumulated.item() - full.item()) > 1e-4


def test_token_normalisation_is_refused_for_a_token_mean_loss():
    with pytest.raises(ValueError, match=r"loss\.normalise=tokens"):
        build_loss("ce", normalise="tokens")


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
    from losslab.losses.grads import MIXED_ADDMM, pick_mixed_addmm

    def broken(acc, g, h):  # runs, but wrong
        acc.add_(1.0)

    def missing(acc, g, h):
        raise NotImplementedError

    cpu = torch.device("cpu")

    def exact(acc, g, h):
        acc.addmm_(g.T.float(), h.float())

    assert pick_mixed_addmm(cpu, torch.bfloat16, torch.float32, (broken, missing, exact, MIXED_ADDMM[-1])) is exact
    assert pick_mixed_addmm(cpu, torch.bfloat16, torch.float32, (broken, missing, MIXED_ADDMM[-1])) is MIXED_ADDMM[-1]
