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

import math
from dataclasses import dataclass

import numpy as np

from evals.compare.stats import jackknife_estimate, prompt_bootstrap
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


DISTINCT_CASES = (
    DistinctCase("240 prompts, distinct-1"),
    DistinctCase("240 prompts, distinct-2", n=2),
    DistinctCase("60 prompts, distinct-1", prompts=60),
    DistinctCase("240 prompts, distinct-1, models alike", exponents=(1.1, 1.1)),
    DistinctCase("240 prompts, distinct-2, short replies", n=2, mean_words=4.0),
)


def draw(case: DistinctCase, rng: np.random.Generator) -> tuple[list[str], list[str]]:
    """One study: model A's and model B's reply to each prompt."""
    ranks = np.arange(1, case.vocab + 1, dtype=np.float64)
    laws = [ranks**-a / (ranks**-a).sum() for a in case.exponents]
    topics = rng.integers(0, case.vocab, (case.prompts, case.topic_words))  # [P, K] each prompt's own words
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
        out.append(DistinctCoverage(case, method, target, c, 1.96 * math.sqrt(c * (1 - c) / len(rows)),
                                    float(np.mean([w for _, w in rows])), len(rows)))  # fmt: skip
    return out
