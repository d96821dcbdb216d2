"""95% intervals for the difference between two runs (or two groups of seeds) on the same evaluation units.

The units are documents: held-out documents for losses (``eval_held_out.json``), lm-eval's documents for
downstream scores (``eval_samples.json``). Both runs are scored on the same documents, so the comparison is
*paired*: resampling documents moves both runs together and the document-to-document spread that both share
cancels out of the difference.

A run's number is a ratio of sums over documents, ``sum(num) / sum(den)``: for a loss, ``num`` is a document's
summed token loss and ``den`` its token count (the token-weighted mean, exactly the aggregate number reported);
for a per-document score (accuracy), ``den`` is 1.

How the interval is made (``difference``):

- **Documents** (paired bootstrap): ``n_boot`` resamples of the documents with replacement (the same resample
  for every run of both groups), each giving ``mean over A's seeds - mean over B's seeds`` of the ratio; the
  percentile 2.5%..97.5% interval of those. With one seed per group this is the whole interval.
- **Seeds on top** (both groups, or one of them, with several seeds): the seed-to-seed spread is independent of
  which documents were drawn (every seed is scored on the same documents), so the two errors add in quadrature:
  each side of the interval is ``sqrt(doc_side**2 + seed_half**2)`` around the point estimate, where
  ``doc_side`` is that side of the document interval and ``seed_half = t(0.975, df) * se``. When both groups
  have the same seeds (same seed: same initialisation and data order), ``se`` is the standard error of the
  per-seed paired differences (``sd / sqrt(k)``, ``df = k - 1``); otherwise the unpaired ``sqrt(sa²/ka +
  sb²/kb)`` with Welch's df (a group with one seed borrows the other's variance). With two seeds ``t`` is 12.7:
  two seeds tell little about the seed spread, and the interval says so. The per-seed differences also carry
  each seed's own document-level noise, which the document bootstrap counts as well: where the two parts are of
  similar size the interval is somewhat conservative (measured: 0.985 coverage instead of 0.95 on synthetic data;
  0.93-0.94 where either part dominates — tests/test_stats.py).
- **Seeds only** (``seed_interval``): where only per-run aggregates exist (the per-domain losses), the same
  t-interval from the seeds alone; it omits the document noise and needs two seeds per group at least.

The verdict reads the interval: ``better`` or ``worse`` when it excludes 0 (in the metric's better direction),
else ``no difference at this power``; its half-width is the smallest difference this comparison could detect.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

BETTER, WORSE, NO_DIFFERENCE = "better", "worse", "no difference at this power"
LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    diff: float
    """Point estimate: mean over A's seeds minus mean over B's seeds."""
    lo: float
    hi: float
    method: str
    """Which interval this is, in words (for tables and figure captions)."""
    n_units: int = 0
    n_seeds: tuple[int, int] = (1, 1)
    lower_is_better: bool = True

    @property
    def half_width(self) -> float:
        """Half the interval's width: the smallest difference this comparison could tell from 0."""
        return (self.hi - self.lo) / 2

    @property
    def verdict(self) -> str:
        if not (math.isfinite(self.lo) and math.isfinite(self.hi)):
            return NO_DIFFERENCE
        if self.hi < 0 or self.lo > 0:
            lower = self.hi < 0
            return BETTER if lower == self.lower_is_better else WORSE
        return NO_DIFFERENCE


def _t975(df: float) -> float:
    """The 97.5% quantile of Student's t (``df`` may be fractional, from Welch)."""
    from scipy import stats

    return float(stats.t.ppf(0.5 + LEVEL / 2, df))


def _seed_se(a: np.ndarray, b: np.ndarray, paired: bool) -> tuple[float, float]:
    """(standard error of the difference of the seed means, its degrees of freedom); (0, inf) with one seed each.
    ``a``, ``b``: [k] per-seed values of each group (paired: the same seeds in the same order)."""
    ka, kb = len(a), len(b)
    if paired and ka == kb and ka > 1:
        d = a - b
        return float(d.std(ddof=1) / math.sqrt(ka)), ka - 1.0
    if ka == 1 and kb == 1:
        return 0.0, math.inf
    va = float(a.var(ddof=1)) if ka > 1 else float(b.var(ddof=1))  # one seed: the other group's variance
    vb = float(b.var(ddof=1)) if kb > 1 else va
    ua, ub = va / ka, vb / kb
    if ua + ub == 0:
        return 0.0, math.inf
    # Welch-Satterthwaite; with one seed in a group, the other's variance estimate is all there is
    df = (ua + ub) ** 2 / (ua**2 / (ka - 1) + ub**2 / (kb - 1)) if ka > 1 and kb > 1 else max(ka, kb) - 1.0
    return math.sqrt(ua + ub), df


def bootstrap_ratios(num: np.ndarray, den: np.ndarray, n_boot: int, seed: int, chunk: int = 256) -> np.ndarray:
    """[n_boot, k] ``sum(num[s]) / sum(den)`` over documents resampled with replacement, the same resamples for
    every row ``s`` of ``num`` [k, n] (``den`` [n] is shared: the same documents and tokens for every run)."""
    rng = np.random.default_rng(seed)
    k, n = num.shape
    out = np.empty((n_boot, k))
    for start in range(0, n_boot, chunk):  # counts matrices of [chunk, n], not [n_boot, n], in memory
        b = min(chunk, n_boot - start)
        counts = rng.multinomial(n, np.full(n, 1.0 / n), size=b).astype(np.float64)  # [b, n] draws per document
        out[start : start + b] = (counts @ num.T) / (counts @ den)[:, None]
    return out


def difference(
    a: np.ndarray,
    b: np.ndarray,
    den: np.ndarray | None = None,
    *,
    paired_seeds: bool = False,
    lower_is_better: bool = True,
    n_boot: int = 2000,
    seed: int = 0,
) -> Interval:
    """Difference A - B with its 95% interval (see the module's docstring). ``a`` [ka, n], ``b`` [kb, n]:
    per-seed, per-document numerators on the same ``n`` documents (a 1-D array is one seed); ``den`` [n]: the
    per-document denominators (token counts), ones when omitted. ``paired_seeds``: row i of ``a`` and of ``b``
    share a seed."""
    a, b = np.atleast_2d(np.asarray(a, dtype=np.float64)), np.atleast_2d(np.asarray(b, dtype=np.float64))
    n = a.shape[1]
    if b.shape[1] != n or n == 0:
        raise ValueError(f"the two groups must be scored on the same documents (got {a.shape[1]} and {b.shape[1]})")
    den = np.ones(n) if den is None else np.asarray(den, dtype=np.float64)
    ka, kb = len(a), len(b)
    per_seed_a, per_seed_b = a.sum(1) / den.sum(), b.sum(1) / den.sum()  # [ka], [kb]
    diff = float(per_seed_a.mean() - per_seed_b.mean())
    boot = bootstrap_ratios(np.concatenate([a, b]), den, n_boot, seed)  # [n_boot, ka + kb]
    doc_diffs = boot[:, :ka].mean(1) - boot[:, ka:].mean(1)
    lo_doc, hi_doc = np.quantile(doc_diffs, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    se, df = _seed_se(per_seed_a, per_seed_b, paired_seeds)
    seed_half = _t975(df) * se if se > 0 else 0.0
    lo = diff - math.hypot(diff - lo_doc, seed_half)
    hi = diff + math.hypot(hi_doc - diff, seed_half)
    if ka == 1 and kb == 1:
        method = f"paired bootstrap over {n} documents (percentile 95%)"
    else:
        how = f"t over {ka} seed pairs" if paired_seeds and ka == kb else f"Welch t over {ka} vs {kb} seeds"
        method = f"paired bootstrap over {n} documents + seed spread ({how}), in quadrature"
    return Interval(diff, float(lo), float(hi), method, n, (ka, kb), lower_is_better)


def seed_interval(
    a: list[float] | np.ndarray, b: list[float] | np.ndarray, *, paired_seeds: bool = False,
    lower_is_better: bool = True,
) -> Interval:  # fmt: skip
    """Difference of the seed means of per-run numbers with a t-interval from the seeds' spread alone (no
    per-document data). Needs two seeds in one group at least; otherwise the interval is unbounded."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    diff = float(a.mean() - b.mean())
    se, df = _seed_se(a, b, paired_seeds)
    if len(a) == 1 and len(b) == 1:
        return Interval(diff, -math.inf, math.inf, "one seed each: no interval", 0, (1, 1), lower_is_better)
    half = _t975(df) * se
    how = f"t over {len(a)} seed pairs" if paired_seeds and len(a) == len(b) else f"Welch t, {len(a)} vs {len(b)} seeds"
    return Interval(diff, diff - half, diff + half, f"seeds only ({how})", 0, (len(a), len(b)), lower_is_better)
