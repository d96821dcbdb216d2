"""Intervals for differences between runs (evals/stats.py) on synthetic data whose true difference is known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from evals.stats import BETTER, NO_DIFFERENCE, WORSE, difference, seed_interval


def _documents(rng: np.random.Generator, n: int, delta: float, seeds: int = 1, seed_sd: float = 0.0):
    """Per-seed summed losses of two runs on ``n`` shared documents (token counts 20..200) whose token-mean loss
    differs by ``delta`` in expectation: documents vary a lot (shared by both runs), the runs' per-document
    difference a little, and each seed shifts both runs by its own amount (seed_sd: on the difference)."""
    tokens = rng.integers(20, 200, n).astype(np.float64)  # [n]
    doc_level = 3.0 + rng.normal(0, 0.8, n)  # [n] how hard each document is, for every run
    b = np.stack([tokens * (doc_level + rng.normal(0, 0.1)) for _ in range(seeds)])  # [k, n]
    a = np.stack([
        b[s] + tokens * (delta + rng.normal(0, seed_sd) + rng.normal(0, 0.4, n)) for s in range(seeds)
    ])  # fmt: skip
    return a, b, tokens


@pytest.mark.parametrize("seeds,seed_sd", [(1, 0.0), (3, 0.2)])
def test_interval_covers_the_true_difference_at_the_nominal_rate(seeds, seed_sd):
    rng = np.random.default_rng(1234)
    delta, draws, covered, widths = 0.05, 200, 0, []
    for i in range(draws):
        a, b, tokens = _documents(rng, 150, delta, seeds, seed_sd)
        iv = difference(a, b, tokens, paired_seeds=True, n_boot=800, seed=i)
        covered += iv.lo <= delta <= iv.hi
        widths.append(iv.half_width)
        # the point estimate: the mean over seeds of each run's token-weighted loss, differenced
        assert iv.diff == pytest.approx(float(np.mean(a.sum(1) / tokens.sum() - b.sum(1) / tokens.sum())))
    assert 0.90 <= covered / draws <= 0.99, covered / draws
    assert all(w > 0 for w in widths)


def test_document_interval_matches_a_plain_index_bootstrap():
    rng = np.random.default_rng(7)
    a, b, tokens = _documents(rng, 120, 0.1)
    iv = difference(a, b, tokens, n_boot=4000, seed=0)
    # float64 reference: resample document indices one draw at a time
    ref_rng = np.random.default_rng(99)
    diffs = []
    for _ in range(4000):
        idx = ref_rng.integers(0, 120, 120)
        diffs.append(a[0, idx].sum() / tokens[idx].sum() - b[0, idx].sum() / tokens[idx].sum())
    lo, hi = np.quantile(diffs, [0.025, 0.975])
    assert iv.lo == pytest.approx(lo, abs=0.15 * (hi - lo)) and iv.hi == pytest.approx(hi, abs=0.15 * (hi - lo))
    assert iv.method.startswith("paired bootstrap over 120 documents")
    assert difference(a, b, tokens, n_boot=500, seed=3) == difference(a, b, tokens, n_boot=500, seed=3)  # seeded


def test_verdicts_on_clear_cases():
    rng = np.random.default_rng(0)
    a, b, tokens = _documents(rng, 300, -0.3)  # A's loss clearly lower
    assert difference(a, b, tokens).verdict == BETTER
    assert difference(b, a, tokens).verdict == WORSE
    a0, b0, t0 = _documents(rng, 40, 0.0)
    a0 = b0 + 0.0 * a0 + t0 * rng.choice([-2.0, 2.0], 40)  # big noise, no shift: no verdict either way
    iv = difference(a0, b0, t0)
    assert iv.lo < 0 < iv.hi and iv.verdict == NO_DIFFERENCE and iv.half_width > 0.3
    # accuracy: higher is better; per-document 0/1 scores, den = 1
    hits_a, hits_b = (rng.random(500) < 0.8).astype(float), (rng.random(500) < 0.5).astype(float)
    assert difference(hits_a, hits_b, lower_is_better=False).verdict == BETTER
    assert difference(hits_b, hits_a, lower_is_better=False).verdict == WORSE


def test_seed_spread_widens_the_interval_and_seed_only_intervals_are_t_intervals():
    rng = np.random.default_rng(5)
    a, b, tokens = _documents(rng, 200, 0.05, seeds=3, seed_sd=0.2)
    docs_only = difference(a[:1], b[:1], tokens)
    with_seeds = difference(a, b, tokens, paired_seeds=True)
    assert with_seeds.half_width > docs_only.half_width and "3 seed pairs" in with_seeds.method
    d = np.array([1.0, 1.2, 0.9]) - np.array([0.5, 0.9, 0.4])  # per-seed differences 0.5, 0.3, 0.5
    iv = seed_interval([1.0, 1.2, 0.9], [0.5, 0.9, 0.4], paired_seeds=True)
    half = 4.302652729911275 * d.std(ddof=1) / math.sqrt(3)  # t(0.975, df=2)
    assert iv.diff == pytest.approx(d.mean()) and iv.half_width == pytest.approx(half)
    assert iv.verdict == WORSE  # a loss 0.43 higher on every seed
    one = seed_interval([1.0], [0.5])
    assert one.verdict == NO_DIFFERENCE and math.isinf(one.half_width)
    with pytest.raises(ValueError, match="same documents"):
        difference(np.ones((1, 3)), np.ones((1, 4)))
