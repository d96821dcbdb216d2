"""Coverage of ``seeds_t`` for a mean over prompts of a bounded score with a point mass at zero (ROUGE of short
replies, the fine-tuning study's primary metric), by simulation.

``evals/compare/coverage.py`` simulates token-weighted losses with normal noise; a per-prompt ROUGE score is
another shape: equal weight per prompt, in [0, 1], zero for a third or more of the prompts (a reply sharing no
word with the reference), skewed above. A study here has ``seeds`` seeds of two losses, paired (seed i of both saw
the same batches), scored on ``prompts`` prompts. Each run's score on prompt d is ``clip(x, 0, 1)`` with the latent

    x = mu (+ shift for loss A) + prompt level L_d + seed shift S_i (+ D_i for A)
        + seed x prompt part shared by both losses at seed i (J_id) + the run's own part E_lid

all normal and independent. The estimand is the expectation over seeds and prompts of A's score minus B's, exact
in closed form (``expected_score``); a method covers when its interval holds it. The defaults are calibrated to the
study's CE runs (240 greedy replies, 3 seeds: mean ROUGE-L 0.081, 37% of prompts at zero, per-prompt sd 0.094,
correlation 0.81 between seeds and 0.92 between CE and MiLe at one seed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from evals.compare.coverage import hash_case, mc_error
from evals.compare.stats import Estimate, Paired


@dataclass(frozen=True)
class ScoreCase:
    name: str
    prompts: int = 240
    seeds: int = 3
    shift: float = 0.0
    """A's latent shift (0: A and B alike; negative: A scores lower and is at zero more often)."""
    mu: float = 0.046
    prompt_sd: float = 0.124
    seed_sd: float = 0.003
    """sd of a seed's shift of both losses."""
    diff_seed_sd: float = 0.003
    """sd of a seed's effect on A alone (the seeds' spread of the difference)."""
    shared_sd: float = 0.046
    """sd of the seed x prompt part both losses share at one seed (the same batches)."""
    own_sd: float = 0.039
    """sd of each run's own part."""


SCORE_CASES: tuple[ScoreCase, ...] = (
    ScoreCase("240 prompts, 3 seeds, losses alike (CE vs MiLe)"),
    ScoreCase("240 prompts, 3 seeds, A lower (CE vs PDL 0.5)", shift=-0.035),
    ScoreCase("240 prompts, 3 seeds, seed spread dominates", diff_seed_sd=0.012),
    ScoreCase("240 prompts, 3 seeds, runs differ prompt by prompt", shared_sd=0.01, own_sd=0.07),
    ScoreCase("60 prompts, 3 seeds", prompts=60),
    ScoreCase("240 prompts, 2 seeds", seeds=2),
)


def expected_score(m: float, s: float) -> float:
    """E[clip(X, 0, 1)] for X ~ N(m, s^2): E[max(X, 0)] - E[max(X - 1, 0)], E[max(X - c, 0)] = (m - c) Phi(z) + s phi(z)
    with z = (m - c) / s."""

    def above(c: float) -> float:
        z = (m - c) / s
        return (m - c) * 0.5 * math.erfc(-z / math.sqrt(2)) + s * math.exp(-z * z / 2) / math.sqrt(2 * math.pi)

    return above(0.0) - above(1.0)


def truth(case: ScoreCase) -> float:
    common = case.prompt_sd**2 + case.seed_sd**2 + case.shared_sd**2 + case.own_sd**2
    return expected_score(case.mu + case.shift, math.sqrt(common + case.diff_seed_sd**2)) - expected_score(
        case.mu, math.sqrt(common)
    )


def simulate(case: ScoreCase, rng: np.random.Generator) -> Paired:
    """One simulated study of ``case``: [seeds, prompts] scores of A and of B, paired by seed."""
    k, n = case.seeds, case.prompts
    level = case.mu + rng.normal(0, case.prompt_sd, n)  # [n]
    seed = rng.normal(0, case.seed_sd, (k, 1))  # [k, 1]
    shared = rng.normal(0, case.shared_sd, (k, n))  # [k, n]
    b = level + seed + shared + rng.normal(0, case.own_sd, (k, n))  # [k, n]
    a = (
        level
        + seed
        + shared
        + case.shift
        + rng.normal(0, case.diff_seed_sd, (k, 1))
        + rng.normal(0, case.own_sd, (k, n))
    )
    return Paired.of(np.clip(a, 0, 1), np.clip(b, 0, 1), paired=True)


@dataclass(frozen=True)
class ScoreCoverage:
    case: ScoreCase
    studies: int
    covered: float
    """Share of studies whose 95% interval held the true difference."""
    covered90: float
    """... whose 90% interval held it (the equivalence test's interval)."""
    mean_half_width: float
    zero_share: float
    """Mean share of B's prompt scores at zero (the calibration's check: about 0.37)."""
    widen95: float
    """The factor by which every 95% interval would have to be widened (about its estimate) to hold the truth in
    95% of the studies: the 0.95 quantile of |estimate - truth| / half-width (above 1: the interval is narrow)."""
    widen90: float
    """The same for the 90% interval at 90%."""

    def error(self, covered: float) -> float:
        """Monte-Carlo error (95%) of ``covered`` or ``covered90``."""
        return mc_error(covered, self.studies)


def score_coverage(case: ScoreCase, method, studies: int = 2000, n_boot: int = 1000, seed: int = 0) -> ScoreCoverage:
    """Simulate ``studies`` studies of ``case`` and count how often ``method`` (``(Paired, n_boot=, seed=) ->
    Estimate``) covers the true difference with its 95% and its 90% interval."""
    rng = np.random.default_rng([seed, hash_case(case)])
    target = truth(case)
    hits = hits90 = 0
    widths, zeros, miss95, miss90 = [], [], [], []
    for i in range(studies):
        data = simulate(case, rng)
        est: Estimate = method(data, n_boot=n_boot, seed=i)
        hits += est.lo <= target <= est.hi
        hits90 += est.lo90 <= target <= est.hi90
        widths.append(est.half_width)
        zeros.append(float((data.b == 0).mean()))
        miss95.append(abs(est.diff - target) / max(est.hi - est.diff, 1e-300))
        miss90.append(abs(est.diff - target) / max(est.hi90 - est.diff, 1e-300))
    return ScoreCoverage(case, studies, hits / studies, hits90 / studies, float(np.mean(widths)), float(np.mean(zeros)),
                         float(np.quantile(miss95, 0.95)), float(np.quantile(miss90, 0.90)))  # fmt: skip
