"""Coverage of the intervals (``evals/compare/stats.py``) by simulation, on data shaped like real studies.

A simulated study has ``seeds`` paired seeds of two losses scored on ``docs`` held-out documents whose token
counts are lopsided (log-normal, ``size_sigma``: Kish's effective number is about ``docs * exp(-size_sigma^2)``),
optionally in ``domains`` domains. The per-document difference of the two losses' mean token loss is

    delta + seed effect a_i + document effect b_d (+ domain effect) + seed x document interaction c_id
          + token noise of sd tau / sqrt(tokens of d)

so the true difference (the expectation over seeds and documents, token-weighted) is ``delta``. Each loss's
per-document summed loss is tokens x (a document level both share + its own part), as a run's held-out file holds
it. Every case draws ``studies`` studies; an interval method covers when its 95% interval holds ``delta``.
Coverage is reported with its Monte-Carlo error (``1.96 * sqrt(c (1 - c) / studies)``, ±0.01 at 2,000 near 95%).

``scripts/coverage_sim.py`` runs the cases of ``CASES`` and writes the table into ``docs/statistics.md``; the test
suite runs a small version (``tests/test_stats.py``) and checks that methods dropping the seeds' or the documents'
spread fail it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from evals.compare.stats import Estimate, Paired, kish


@dataclass(frozen=True)
class Case:
    name: str
    docs: int
    seeds: int
    size_sigma: float = 1.0
    """sd of log(tokens): 1.0 makes Kish's n_eff about 0.37 x the documents (the CPU study's first held-out set:
    23 documents, about 8 effective)."""
    mean_tokens: float = 1500.0
    seed_sd: float = 0.005
    """sd of a seed's effect on the difference (nats/token)."""
    doc_sd: float = 0.02
    """sd of a document's effect on the difference, shared by every seed."""
    interaction_sd: float = 0.02
    """sd of the seed x document interaction."""
    token_sd: float = 0.5
    """sd of one token's loss difference (the per-document noise is this / sqrt(tokens))."""
    domains: int = 0
    """>1: documents in this many domains (equal counts) with a domain effect of ``domain_sd``, resampled within
    domains (the stratified held-out set)."""
    domain_sd: float = 0.0
    paired: bool = True


# Shaped like the studies this project runs (3-5 seeds; a few to a few hundred held-out documents of lopsided
# sizes; every noise source present) and around them: where the seeds dominate, where the documents do.
CASES: tuple[Case, ...] = (
    Case("23 lopsided documents, 3 seeds", 23, 3),
    Case("23 lopsided documents, 5 seeds", 23, 5),
    Case("23 lopsided documents, 3 seeds, seed spread dominates", 23, 3, seed_sd=0.02, doc_sd=0.005),
    Case("23 lopsided documents, 3 seeds, documents dominate", 23, 3, seed_sd=0.0, doc_sd=0.03, interaction_sd=0.005),
    Case("72 documents, 3 seeds", 72, 3),
    Case("150 documents, 3 seeds", 150, 3),
    Case("150 documents, 5 seeds", 150, 5),
    Case("150 very lopsided documents, 3 seeds", 150, 3, size_sigma=1.8),
    Case("8 documents, 3 seeds", 8, 3),
    Case("12 domains x 8 documents, 3 seeds, stratified", 96, 3, domains=12, domain_sd=0.01),
    Case("23 lopsided documents, 2 seeds", 23, 2),
    Case("23 lopsided documents, 1 seed", 23, 1),
    Case("23 lopsided documents, 1 seed, seed spread dominates", 23, 1, seed_sd=0.02, doc_sd=0.005),
    Case("23 documents, 3 seeds vs 3 other seeds (unpaired)", 23, 3, paired=False),
)


def simulate(case: Case, rng: np.random.Generator, delta: float = 0.01) -> tuple[Paired, float]:
    """One simulated study of ``case`` (see the module docstring) and its true difference: ``delta``, plus the
    mean of the domains' effects where the design fixes the domains."""
    n, k = case.docs, case.seeds
    tokens = np.maximum(1.0, np.round(case.mean_tokens * rng.lognormal(-(case.size_sigma**2) / 2, case.size_sigma, n)))
    strata = np.repeat(np.arange(case.domains), -(-n // case.domains))[:n] if case.domains > 1 else None
    doc = rng.normal(0, case.doc_sd, n)  # [n]
    truth = delta
    if strata is not None:  # the domains are fixed by the design: the estimand is the mean over these domains
        effect = rng.normal(0, case.domain_sd, case.domains)  # [domains]
        doc = doc + effect[strata]
        truth = delta + float(effect.mean())
    level = 3.0 + rng.normal(0, 0.8, n)  # [n] how hard each document is, for both losses
    base_seed = rng.normal(0, 0.05, (k, 1))  # [k, 1] a seed's shift of both losses
    diff_a = rng.normal(0, case.seed_sd, (k, 1))  # [k, 1]
    inter = rng.normal(0, case.interaction_sd, (k, n))  # [k, n]
    noise = rng.normal(0, 1, (k, n)) * case.token_sd / np.sqrt(tokens)  # [k, n]
    b_mean = level + base_seed + rng.normal(0, 1, (k, n)) * 1.5 / np.sqrt(tokens)  # [k, n] mean token loss of B
    a_mean = b_mean + delta + diff_a + doc + inter + noise
    if not case.paired:  # A's seeds are other seeds than B's: A's own seed shifts and interactions
        a_mean = (level + rng.normal(0, 0.05, (k, 1)) + rng.normal(0, 1, (k, n)) * 1.5 / np.sqrt(tokens) + delta
                  + diff_a + doc + inter + noise)  # fmt: skip
    return Paired.of(a_mean * tokens, b_mean * tokens, tokens, paired=case.paired, strata=strata), truth


@dataclass(frozen=True)
class Coverage:
    case: Case
    method: str
    studies: int
    covered: float
    """Share of studies whose 95% interval held the true difference."""
    mean_half_width: float
    mean_n_eff: float

    @property
    def error(self) -> float:
        """Monte-Carlo error (95%) of ``covered``."""
        return mc_error(self.covered, self.studies)


def mc_error(covered: float, studies: int) -> float:
    """The Monte-Carlo error (95%) of a coverage measured on ``studies`` simulated studies."""
    return 1.96 * math.sqrt(max(covered * (1 - covered), 1e-12) / studies)


def coverage(case: Case, method, studies: int = 2000, n_boot: int = 1000, seed: int = 0, name: str = "",
             delta: float = 0.01) -> Coverage:  # fmt: skip
    """Simulate ``studies`` studies of ``case`` and count how often ``method`` (``(Paired, n_boot=, seed=) ->
    Estimate``) covers the true difference."""
    rng = np.random.default_rng([seed, hash_case(case)])
    hits, widths, n_effs = 0, [], []
    for i in range(studies):
        data, truth = simulate(case, rng, delta)
        est: Estimate = method(data, n_boot=n_boot, seed=i)
        hits += est.lo <= truth <= est.hi
        widths.append(est.half_width)
        n_effs.append(kish(data.den))
    return Coverage(case, name or getattr(method, "__name__", str(method)), studies, hits / studies,
                    float(np.mean(widths)), float(np.mean(n_effs)))  # fmt: skip


def hash_case(case: Any) -> int:
    """A stable integer per case, from its ``name`` (the simulation's seed does not depend on Python's string
    hashing)."""
    return sum((i + 1) * ord(c) for i, c in enumerate(case.name)) % (2**31)
