"""Coverage of the distinct-n intervals (``scripts/generation_table.py``) by simulation.

Distinct-n is a corpus-level number: the different n-grams of all replies over all their n-grams. A study draws
two models' replies to the same ``prompts`` prompts. A reply has 1 + Poisson(``mean_words`` - 1) words; each word
is, with probability ``topic_share``, one of the prompt's own ``topic_words`` words (drawn once per prompt and shared
by both models: what makes the two models' numbers move together, as replies to the same prompt do), else a word
of a Zipf law over ``vocab`` words with the model's exponent (a higher exponent: more repetitive replies). The
quantity an interval should hold is the expectation of the statistic over studies of this size — of one model's
distinct-n, or of the difference between the models' — computed by drawing ``truth_studies`` further studies.

Two intervals are measured: the delete-1 jackknife over the prompts (``jackknife_estimate``, what the report
uses) and the percentile bootstrap over the prompts (what it used before): a resample repeats some prompts and all
their n-grams, so its replicates sit below the sample's value and the interval misses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from evals.compare.coverage import mc_error
from evals.compare.stats import Estimate, jackknife_estimate, prompt_bootstrap, seeds_jackknife
from evals.generation_metrics import distinct_n, distinct_n_left_out


@dataclass(frozen=True)
class DistinctCase:
    name: str
    prompts: int = 240
    n: int = 1
    """distinct-n's n."""
    vocab: int = 3000
    mean_words: float = 10.0
    exponents: tuple[float, float] = (1.05, 1.2)
    """The Zipf exponents of model A and model B."""
    topic_share: float = 0.3
    topic_words: int = 12
    seeds: int = 1
    """Runs per model, seed i of A paired with seed i of B (``seeds_jackknife``)."""
    seed_sd: float = 0.0
    """The sd of a seed's shift of both models' Zipf exponents (what a seed's data order does to both)."""
    interaction_sd: float = 0.0
    """The sd of each run's own further shift (what the seed does to one model and not the other)."""


DISTINCT_CASES = (
    DistinctCase("240 prompts, distinct-1"),
    DistinctCase("240 prompts, distinct-2", n=2),
    DistinctCase("60 prompts, distinct-1", prompts=60),
    DistinctCase("240 prompts, distinct-1, models alike", exponents=(1.1, 1.1)),
    DistinctCase("240 prompts, distinct-2, short replies", n=2, mean_words=4.0),
)


def draw(case: DistinctCase, rng: np.random.Generator, topics: np.ndarray | None = None,
         shifts: tuple[float, float] = (0.0, 0.0)) -> tuple[list[str], list[str]]:  # fmt: skip
    """Model A's and model B's reply to each prompt (``topics`` [P, K] each prompt's own words: new prompts when
    None), their exponents shifted by ``shifts``."""
    ranks = np.arange(1, case.vocab + 1, dtype=np.float64)
    laws = [ranks ** -(a + s) / (ranks ** -(a + s)).sum() for a, s in zip(case.exponents, shifts, strict=True)]
    if topics is None:
        topics = rng.integers(0, case.vocab, (case.prompts, case.topic_words))
    replies: tuple[list[str], list[str]] = ([], [])
    for law, out in zip(laws, replies, strict=True):
        lengths = 1 + rng.poisson(case.mean_words - 1, case.prompts)  # [P]
        prompt = np.repeat(np.arange(case.prompts), lengths)  # [W] the prompt of each word of all replies
        from_topic = rng.random(len(prompt)) < case.topic_share
        word = np.where(from_topic, topics[prompt, rng.integers(0, case.topic_words, len(prompt))],
                        rng.choice(case.vocab, len(prompt), p=law))  # fmt: skip
        ends = np.cumsum(lengths)
        out.extend(" ".join(f"w{w}" for w in word[end - k : end]) for k, end in zip(lengths, ends, strict=True))
    return replies


@dataclass(frozen=True)
class DistinctCoverage:
    case: DistinctCase
    method: str
    """``jackknife`` or ``bootstrap``."""
    target: str
    """``one model`` (A's value) or ``difference`` (A - B, paired over the prompts)."""
    covered: float
    error: float
    mean_half_width: float
    studies: int


def distinct_coverage(case: DistinctCase, studies: int = 1000, truth_studies: int = 4000, n_boot: int = 0,
                      seed: int = 0) -> list[DistinctCoverage]:  # fmt: skip
    """Coverage of the jackknife intervals (and of the percentile bootstrap's, with ``n_boot`` > 0) for model A's
    distinct-n and for the paired difference A - B."""
    rng = np.random.default_rng(seed)
    truth = np.array([[distinct_n(r, case.n) for r in draw(case, rng)] for _ in range(truth_studies)])  # [S, 2]
    true_a, true_diff = truth[:, 0].mean(), (truth[:, 0] - truth[:, 1]).mean()
    hits: dict[tuple[str, str], list[tuple[bool, float]]] = {}

    def record(method: str, target: str, lo: float, hi: float, true: float) -> None:
        hits.setdefault((method, target), []).append((lo <= true <= hi, (hi - lo) / 2))

    for _ in range(studies):
        a, b = draw(case, rng)
        va, vb = distinct_n(a, case.n), distinct_n(b, case.n)
        la, lb = np.asarray(distinct_n_left_out(a, case.n)), np.asarray(distinct_n_left_out(b, case.n))
        one, diff = jackknife_estimate(va, la, "jackknife"), jackknife_estimate(va - vb, la - lb, "jackknife")
        record("jackknife", "one model", one.lo, one.hi, true_a)
        record("jackknife", "difference", diff.lo, diff.hi, true_diff)
        if n_boot:
            stats = [lambda idx, o=o: distinct_n([o[i] for i in idx], case.n) for o in (a, b)]
            boot = prompt_bootstrap(stats, case.prompts, n_boot, seed=int(rng.integers(1 << 31)))  # [B, 2]
            record("bootstrap", "one model", *np.quantile(boot[:, 0], [0.025, 0.975]), true_a)
            record("bootstrap", "difference", *np.quantile(boot[:, 0] - boot[:, 1], [0.025, 0.975]), true_diff)
    out = []
    for (method, target), rows in hits.items():
        c = float(np.mean([h for h, _ in rows]))
        out.append(DistinctCoverage(case, method, target, c, mc_error(c, len(rows)),
                                    float(np.mean([w for _, w in rows])), len(rows)))  # fmt: skip
    return out


SEEDED_CASES = (
    DistinctCase("240 prompts, distinct-1, 3 seeds", seeds=3, seed_sd=0.03, interaction_sd=0.01),
    DistinctCase("240 prompts, distinct-2, 3 seeds", n=2, seeds=3, seed_sd=0.03, interaction_sd=0.01),
    DistinctCase("240 prompts, distinct-1, 3 seeds, seed spread dominates", seeds=3, seed_sd=0.03, interaction_sd=0.04),
    DistinctCase("60 prompts, distinct-1, 3 seeds, prompts dominate", prompts=60, seeds=3, seed_sd=0.01),
)


def seeded_study(case: DistinctCase, rng: np.random.Generator) -> tuple[list[list[str]], list[list[str]]]:
    """``case.seeds`` runs of each model on the same prompts: each seed shifts both models' exponents alike
    (``seed_sd``) and each run its own (``interaction_sd``)."""
    topics = rng.integers(0, case.vocab, (case.prompts, case.topic_words))  # [P, K] shared by every run
    runs_a, runs_b = [], []
    for _ in range(case.seeds):
        shared = rng.normal(0.0, case.seed_sd)
        own = rng.normal(0.0, case.interaction_sd, 2)
        a, b = draw(case, rng, topics, (shared + own[0], shared + own[1]))
        runs_a.append(a)
        runs_b.append(b)
    return runs_a, runs_b


def seeded_coverage(case: DistinctCase, studies: int = 1000, truth_studies: int = 2000, seed: int = 0,
                    method: Callable[..., Estimate] = seeds_jackknife) -> DistinctCoverage:  # fmt: skip
    """Coverage of ``method`` (``seeds_jackknife``'s arguments) for the difference of the two models' seed-mean
    distinct-n (paired seeds); the truth is its expectation over seeds, prompts and replies."""
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(truth_studies):
        a, b = draw(case, rng, None, tuple(rng.normal(0.0, case.seed_sd) + rng.normal(0.0, case.interaction_sd, 2)))
        diffs.append(distinct_n(a, case.n) - distinct_n(b, case.n))
    true = float(np.mean(diffs))
    hits = []
    for _ in range(studies):
        runs_a, runs_b = seeded_study(case, rng)
        values = [[distinct_n(r, case.n) for r in runs] for runs in (runs_a, runs_b)]
        left = [np.array([distinct_n_left_out(r, case.n) for r in runs]) for runs in (runs_a, runs_b)]
        e = method(values[0], left[0], values[1], left[1], paired=True)
        hits.append((e.lo <= true <= e.hi, e.half_width))
    c = float(np.mean([h for h, _ in hits]))
    name, error = getattr(method, "__name__", "method"), mc_error(c, studies)
    return DistinctCoverage(case, name, "difference", c, error, float(np.mean([w for _, w in hits])), studies)
