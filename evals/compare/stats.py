"""Intervals, tests and verdict words for the difference between two groups of runs scored on the same documents.

numpy and scipy only (no matplotlib, no torch): ``docs/statistics.md`` says what every number means to a reader.

**The data.** A run's number on a metric is a ratio of sums over documents, ``sum(num) / sum(den)``: for a loss
``num`` is a document's summed token loss and ``den`` its token count (the token-weighted mean, exactly the
number reported); for a per-document score (accuracy) ``den`` is 1. Two groups, A and B, are scored on the same
``n`` documents; ``a`` [ka, n] and ``b`` [kb, n] hold each run's per-document numerators. When both groups ran
the same seeds (same initialisation and data order) the seeds are *paired*: row i of ``a`` and of ``b`` share one.
The difference is ``mean over A's seeds - mean over B's seeds`` of the runs' numbers.

**Where the noise comes from.** Seeds (each seed's own initialisation and data order), documents (the held-out
set is one sample of documents; documents differ in how much two losses differ on them) and their interaction
(a seed's model does better or worse on particular documents). A document resample moves both groups together
(they were scored on the same documents), so what both share cancels.

**Two intervals** (both resample documents with replacement, the same draw for every run of both groups,
within each domain when ``strata`` are given — the held-out set is stratified by domain — or whole domains then
documents within them with ``cluster``):

- ``two_level`` — the two-level (hierarchical) percentile bootstrap: each replicate resamples the seeds (the
  same indices for both groups where paired) *and* the documents, and takes the mean over the drawn seeds of the
  difference on the drawn documents; the 2.5..97.5% percentiles. With 3 seeds there are only 10 distinct seed
  draws and the spread of 3 values is underestimated by a third: it covers too rarely (the simulation in
  ``evals/compare/coverage.py`` measures it, ``docs/statistics.md`` has the table).
- ``seeds_t`` (the default) — the seeds through Student's t, the documents through the bootstrap, nothing
  counted twice. The per-seed differences' variance ``s^2`` (paired; Welch's two variances otherwise) carries the
  seed effect and each seed's own seed x document interaction on this document set; the shared document
  component is what the bootstrap variance of the seed-mean difference holds beyond the interaction:
  ``V_doc = V_mean - V_int / k``, with ``V_int`` the bootstrap variance of one seed's deviation from the seed mean
  scaled by ``k / (k - 1)``. The standard error is ``sqrt(s^2 / k + V_doc)`` with Satterthwaite's degrees of
  freedom (``k - 1`` for the seed part, ``n_eff - 1`` for the document part), so 3 seeds get t quantiles near
  ``t(2) = 4.3`` when the seeds dominate and near 1.96 when the documents do. With one seed per group the seed
  spread cannot be estimated: the interval is the documents' alone and says so.

``seeds_only`` is the t-interval from per-run numbers where no per-document data exist (older runs' per-domain
losses, training loss).

**Tests and words.** ``p`` is the two-sided p-value of "no difference" (``2 * min`` tail share beyond 0 for the
percentile bootstrap); ``p_tost(m)`` the larger of the two one-sided p-values of the equivalence test (TOST)
against the margin ``m``: below alpha exactly when the 90% interval lies inside ``[-m, +m]``. ``holm`` adjusts a
family's p-values. ``verdict`` turns them into ``better`` / ``worse`` / ``equivalent within ±m`` /
``inconclusive`` (or ``no information`` for an interval of zero width or none). ``mde`` is the minimum effect
detectable with 80% power (``(t_{1-alpha/2} + t_{0.8}) * se``, about 1.43 x the 95% half-width); ``power(e)`` the
probability that this comparison calls a true effect ``e`` significant.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

LEVEL = 0.95
ALPHA = 0.05
POWER = 0.80
N_BOOT = 2000
BETTER, WORSE, INCONCLUSIVE, NO_INFORMATION = "better", "worse", "inconclusive", "no information"


def equivalent_word(margin: float) -> str:
    return f"equivalent within ±{margin:g}"


def kish(weights: Sequence[float] | np.ndarray) -> float:
    """Kish's effective number of units, ``(sum w)^2 / sum w^2``."""
    w = np.asarray(weights, dtype=np.float64)
    squares = float((w * w).sum())
    return float(w.sum()) ** 2 / squares if squares > 0 else 0.0


def _t(q: float, df: float) -> float:
    from scipy import stats

    return float(stats.norm.ppf(q)) if not math.isfinite(df) else float(stats.t.ppf(q, df))


def _t_cdf(x: float, df: float) -> float:
    from scipy import stats

    return float(stats.norm.cdf(x)) if not math.isfinite(df) else float(stats.t.cdf(x, df))


@dataclass(frozen=True)
class Estimate:
    """A difference A - B with what a verdict needs."""

    diff: float
    se: float
    """Standard error (the bootstrap replicates' sd for the percentile method)."""
    df: float
    """Degrees of freedom of the t quantiles (inf: normal)."""
    lo: float
    hi: float
    """The 95% interval."""
    lo90: float
    hi90: float
    """The 90% interval (the equivalence test's)."""
    p: float
    """Two-sided p-value of "no difference"."""
    method: str
    n_docs: int = 0
    n_eff: float = 0.0
    seeds: tuple[int, int] = (1, 1)
    paired: bool = False
    seed_var: float = 0.0
    """The seed part of ``se**2``."""
    doc_var: float = 0.0
    """The shared-document part of ``se**2``."""
    boot: np.ndarray | None = field(default=None, repr=False, compare=False)
    """Percentile method: the bootstrap replicates of the difference."""

    @property
    def half_width(self) -> float:
        return (self.hi - self.lo) / 2

    @property
    def informative(self) -> bool:
        """False for an interval of zero width (no information about the difference's variability) or none."""
        return math.isfinite(self.lo) and math.isfinite(self.hi) and self.hi > self.lo

    @property
    def seed_spread_included(self) -> bool:
        return max(self.seeds) > 1

    def p_tost(self, margin: float) -> float:
        """The equivalence test against ``±margin``: the larger one-sided p-value (below alpha exactly when the
        90% interval lies inside the margin)."""
        if not self.informative or margin <= 0:
            return math.nan
        if self.boot is not None:
            return float(max(np.mean(self.boot <= -margin), np.mean(self.boot >= margin)))
        lower = 1 - _t_cdf((self.diff + margin) / self.se, self.df)  # H0: diff <= -margin
        upper = _t_cdf((self.diff - margin) / self.se, self.df)  # H0: diff >= +margin
        return max(lower, upper)

    def mde(self, power: float = POWER) -> float:
        """The smallest true difference found significant (two-sided, alpha) with probability ``power``."""
        if not self.informative:
            return math.nan
        return (_t(1 - ALPHA / 2, self.df) + _t(power, self.df)) * self.se

    def power(self, effect: float) -> float:
        """Probability that a true difference ``effect`` comes out significant (two-sided, alpha) in a study like
        this one (t with this standard error and degrees of freedom, shifted by the effect)."""
        if not self.informative:
            return math.nan
        crit, shift = _t(1 - ALPHA / 2, self.df), abs(effect) / self.se
        return 1 - _t_cdf(crit - shift, self.df) + _t_cdf(-crit - shift, self.df)


# --- resampling ------------------------------------------------------------------------------------------------


def document_counts(rng: np.random.Generator, size: int, n: int, strata: np.ndarray | None = None,
                    cluster: bool = False) -> np.ndarray:  # fmt: skip
    """[size, n] how often each document is drawn in each of ``size`` bootstrap replicates: ``n`` documents with
    replacement; within each stratum (``strata`` [n] ints) keeping each stratum's count; with ``cluster``, the
    strata themselves drawn with replacement first, then each drawn stratum's documents within it."""
    if strata is None:
        return rng.multinomial(n, np.full(n, 1.0 / n), size=size).astype(np.float64)
    counts = np.zeros((size, n))
    groups = [np.flatnonzero(strata == s) for s in np.unique(strata)]
    copies = rng.multinomial(len(groups), np.full(len(groups), 1.0 / len(groups)), size=size) if cluster else None
    for j, idx in enumerate(groups):
        trials = copies[:, j] * len(idx) if copies is not None else np.full(size, len(idx))  # [size]
        counts[:, idx] = rng.multinomial(trials, np.full(len(idx), 1.0 / len(idx)))
    return counts


def resampled_values(num: np.ndarray, den: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """[size, runs] each run's ``sum(num) / sum(den)`` on each replicate (``num`` [runs, n], ``den`` [n],
    ``counts`` [size, n]); NaN where a replicate drew no denominator."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return (counts @ num.T) / (counts @ den)[:, None]


@dataclass(frozen=True)
class Paired:
    """The per-document data of one comparison (see the module docstring)."""

    a: np.ndarray
    """[ka, n] per-document numerators of A's runs."""
    b: np.ndarray
    """[kb, n] of B's runs."""
    den: np.ndarray
    """[n] per-document denominators (shared: the same documents and tokens)."""
    paired: bool = False
    """Row i of ``a`` and of ``b`` share a seed (then ka == kb)."""
    strata: np.ndarray | None = None
    """[n] domain of each document (ints): resample within domains."""

    @staticmethod
    def of(a: Sequence | np.ndarray, b: Sequence | np.ndarray, den: Sequence | np.ndarray | None = None, *,
           paired: bool = False, strata: Sequence | np.ndarray | None = None) -> Paired:  # fmt: skip
        a, b = np.atleast_2d(np.asarray(a, dtype=np.float64)), np.atleast_2d(np.asarray(b, dtype=np.float64))
        n = a.shape[1]
        if b.shape[1] != n or n == 0:
            raise ValueError(f"the two groups must be scored on the same documents (got {a.shape[1]} and {b.shape[1]})")
        den = np.ones(n) if den is None else np.asarray(den, dtype=np.float64)
        if paired and len(a) != len(b):
            raise ValueError(f"paired seeds need as many runs in each group (got {len(a)} and {len(b)})")
        s = None if strata is None else np.unique(np.asarray(strata), return_inverse=True)[1]
        return Paired(a, b, den, paired, s)

    @property
    def k(self) -> tuple[int, int]:
        return len(self.a), len(self.b)

    def per_run(self) -> tuple[np.ndarray, np.ndarray]:
        """([ka], [kb]) each run's number on all the documents."""
        total = self.den.sum()
        return self.a.sum(1) / total, self.b.sum(1) / total

    def diff(self) -> float:
        a, b = self.per_run()
        return float(a.mean() - b.mean())


def _seed_part(a: np.ndarray, b: np.ndarray, paired: bool) -> tuple[float, float]:
    """(variance of the difference of the seed means from the seeds' spread, its degrees of freedom); (0, inf)
    with one seed each. ``a``, ``b``: per-run numbers."""
    ka, kb = len(a), len(b)
    if paired and ka > 1:
        return float((a - b).var(ddof=1) / ka), ka - 1.0
    if ka == 1 and kb == 1:
        return 0.0, math.inf
    va = float(a.var(ddof=1)) if ka > 1 else float(b.var(ddof=1))  # one seed: the other group's variance
    vb = float(b.var(ddof=1)) if kb > 1 else va
    ua, ub = va / ka, vb / kb
    if ua + ub == 0:
        return 0.0, math.inf
    if ka > 1 and kb > 1:  # Welch-Satterthwaite
        return ua + ub, (ua + ub) ** 2 / (ua**2 / (ka - 1) + ub**2 / (kb - 1))
    return ua + ub, max(ka, kb) - 1.0


def _interaction(values: np.ndarray) -> float:
    """The bootstrap variance of one run's deviation from its group's mean, scaled to one run's own variance:
    ``values`` [B, k] replicates of k runs' numbers (k > 1)."""
    k = values.shape[1]
    dev = values - values.mean(1, keepdims=True)
    return float(dev.var(0, ddof=1).mean() * k / (k - 1))


def _finite_rows(values: np.ndarray) -> np.ndarray:
    return values[np.isfinite(values).all(1)]


def seeds_t(data: Paired, n_boot: int = N_BOOT, seed: int = 0, cluster: bool = False) -> Estimate:
    """The default interval: seeds through t, documents through the bootstrap (module docstring)."""
    rng = np.random.default_rng(seed)
    (ka, kb), n = data.k, len(data.den)
    a_runs, b_runs = data.per_run()
    diff = float(a_runs.mean() - b_runs.mean())
    counts = document_counts(rng, n_boot, n, data.strata, cluster)
    values = _finite_rows(resampled_values(np.concatenate([data.a, data.b]), data.den, counts))  # [B, ka + kb]
    a_rep, b_rep = values[:, :ka], values[:, ka:]
    if data.paired:
        d = a_rep - b_rep  # [B, k] per-seed differences
        v_mean = float(d.mean(1).var(ddof=1))
        v_int = _interaction(d) / ka if ka > 1 else 0.0
    else:
        v_mean = float((a_rep.mean(1) - b_rep.mean(1)).var(ddof=1))
        v_int = (_interaction(a_rep) / ka if ka > 1 else 0.0) + (_interaction(b_rep) / kb if kb > 1 else 0.0)
    strata = 1 if data.strata is None else len(np.unique(data.strata))
    # the bootstrap's variance of a mean of n units is (n - 1) / n of the unbiased one (per stratum; with cluster,
    # the units are the domains)
    units, lost = (strata, 1) if cluster and strata > 1 else (n, strata)
    doc_var = max(0.0, v_mean - v_int) * units / max(1, units - lost)
    seed_var, seed_df = _seed_part(a_runs, b_runs, data.paired)
    n_eff = kish(data.den)
    # degrees of freedom of the document part: its variance estimate rests on the largest documents, so they are
    # Kish's number of the *squared* token counts (n for equal documents, far fewer for lopsided ones); measured by
    # simulation (docs/statistics.md): with n_eff instead, 23 lopsided documents cover 91% where the documents
    # dominate
    doc_df = max(1.0, strata - 1.0) if cluster and strata > 1 else max(1.0, kish(data.den**2) - strata)
    if max(ka, kb) == 1:
        method = f"document bootstrap over {n} documents (one seed each: no seed spread)"
    else:
        seeds = f"{ka} paired seeds" if data.paired else f"{ka} vs {kb} seeds (Welch)"
        method = f"t over {seeds} + document bootstrap over {n} documents"
    return _seeds_and_documents(diff, (seed_var, seed_df), (doc_var, doc_df), method, n, n_eff, (ka, kb), data.paired)


def _seeds_and_documents(diff: float, seed: tuple[float, float], doc: tuple[float, float], method: str, n: int,
                         n_eff: float, seeds: tuple[int, int], paired: bool) -> Estimate:  # fmt: skip
    """The t interval of ``diff`` from a seed part and a document part, each (variance, degrees of freedom), with
    Satterthwaite's degrees of freedom for their sum."""
    (seed_var, seed_df), (doc_var, doc_df) = seed, doc
    var = seed_var + doc_var
    se = math.sqrt(var)
    if var > 0:
        parts = (seed_var**2 / seed_df if seed_var > 0 else 0.0) + (doc_var**2 / doc_df if doc_var > 0 else 0.0)
        df = var**2 / parts if parts > 0 else math.inf
    else:
        df = math.inf
    half, half90 = _t(1 - ALPHA / 2, df) * se, _t(1 - ALPHA, df) * se
    p = 2 * (1 - _t_cdf(abs(diff) / se, df)) if se > 0 else math.nan
    return Estimate(diff, se, df, diff - half, diff + half, diff - half90, diff + half90, p, method, n, n_eff,
                    seeds, paired, seed_var, doc_var)  # fmt: skip


def _jackknife_var(left_out: np.ndarray) -> float:
    """The delete-1 jackknife variance from the replicates ``left_out`` [n] (or [..., n], each row apart)."""
    n = left_out.shape[-1]
    return (n - 1) / n * ((left_out - left_out.mean(-1, keepdims=True)) ** 2).sum(-1)


def seeds_jackknife(a: Sequence[float], a_left: np.ndarray, b: Sequence[float], b_left: np.ndarray, *,
                    paired: bool = False) -> Estimate:  # fmt: skip
    """``seeds_t`` for a statistic of the prompts that only the jackknife resamples faithfully (distinct-n): ``a``
    [ka] and ``b`` [kb] each run's value, ``a_left`` [ka, n] and ``b_left`` [kb, n] its values with each prompt
    left out. The seeds through t (paired per-seed differences, or Welch), the prompts through the jackknife,
    nothing counted twice: ``V_doc = V_mean - V_int / k`` as in ``seeds_t``, with the jackknife's variances of
    the seed-mean difference and of one seed's deviation from it in place of the bootstrap's."""
    a_, b_ = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    al, bl = np.atleast_2d(np.asarray(a_left, dtype=np.float64)), np.atleast_2d(np.asarray(b_left, dtype=np.float64))
    (ka, kb), n = (len(a_), len(b_)), al.shape[1]

    def interaction(rows: np.ndarray) -> float:  # [k, n] -> one run's deviation from the mean, per run
        k = len(rows)
        return float(_jackknife_var(rows - rows.mean(0)).mean() * k / (k - 1)) if k > 1 else 0.0

    if paired:
        d = al - bl  # [k, n]
        v_mean, v_int = float(_jackknife_var(d.mean(0))), interaction(d) / ka
    else:
        v_mean = float(_jackknife_var(al.mean(0) - bl.mean(0)))
        v_int = interaction(al) / ka + interaction(bl) / kb
    seed_part = _seed_part(a_, b_, paired)
    how = f"{ka} paired seeds" if paired else f"{ka} vs {kb} seeds (Welch)"
    method = f"t over {how} + prompt jackknife over {n} prompts"
    return _seeds_and_documents(float(a_.mean() - b_.mean()), seed_part, (max(0.0, v_mean - v_int), n - 1.0),
                                method, n, float(n), (ka, kb), paired)  # fmt: skip


def two_level(data: Paired, n_boot: int = N_BOOT, seed: int = 0, cluster: bool = False) -> Estimate:
    """The two-level percentile bootstrap: seeds and documents resampled together (module docstring)."""
    rng = np.random.default_rng(seed)
    (ka, kb), n = data.k, len(data.den)
    counts = document_counts(rng, n_boot, n, data.strata, cluster)
    values = _finite_rows(resampled_values(np.concatenate([data.a, data.b]), data.den, counts))  # [B, ka + kb]
    b_count = len(values)
    a_rep, b_rep = values[:, :ka], values[:, ka:]
    ia = rng.integers(0, ka, (b_count, ka))  # [B, ka] the drawn seeds
    ib = ia if data.paired else rng.integers(0, kb, (b_count, kb))
    boot = np.take_along_axis(a_rep, ia, 1).mean(1) - np.take_along_axis(b_rep, ib, 1).mean(1)  # [B]
    diff = data.diff()
    lo, hi, lo90, hi90 = np.quantile(boot, [ALPHA / 2, 1 - ALPHA / 2, ALPHA, 1 - ALPHA])
    p = float(min(1.0, 2 * min(np.mean(boot <= 0), np.mean(boot >= 0))))
    se = float(boot.std(ddof=1))
    seeds = f"{ka} paired seeds" if data.paired else f"{ka} vs {kb} seeds"
    return Estimate(diff, se, math.inf, float(lo), float(hi), float(lo90), float(hi90), p,
                    f"two-level percentile bootstrap ({seeds} x {n} documents)", n, kish(data.den), (ka, kb),
                    data.paired, boot=boot)  # fmt: skip


def seeds_only(a: Sequence[float], b: Sequence[float], *, paired: bool = False) -> Estimate:
    """The t-interval of the difference of seed means from per-run numbers alone (no per-document data): it
    omits the documents' share of the noise. No interval with one seed each."""
    a_, b_ = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    diff = float(a_.mean() - b_.mean())
    var, df = _seed_part(a_, b_, paired)
    seeds = (len(a_), len(b_))
    if max(seeds) == 1:
        return Estimate(diff, math.nan, math.inf, -math.inf, math.inf, -math.inf, math.inf, math.nan,
                        "one seed each and no per-document data: no interval", 0, 0.0, seeds, paired)  # fmt: skip
    se = math.sqrt(var)
    half, half90 = _t(1 - ALPHA / 2, df) * se, _t(1 - ALPHA, df) * se
    p = 2 * (1 - _t_cdf(abs(diff) / se, df)) if se > 0 else math.nan
    how = f"{seeds[0]} paired seeds" if paired else f"{seeds[0]} vs {seeds[1]} seeds (Welch)"
    return Estimate(diff, se, df, diff - half, diff + half, diff - half90, diff + half90, p,
                    f"t over {how}, no per-document data (documents' noise not included)", 0, 0.0, seeds,
                    paired, seed_var=var)  # fmt: skip


Method = Callable[..., Estimate]
METHODS: dict[str, Method] = {"seeds_t": seeds_t, "two_level": two_level}


# --- multiplicity and words -------------------------------------------------------------------------------------


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (NaN stays NaN and is not counted): sorted ascending, the k-th of m is
    multiplied by ``m - k + 1``, kept monotone, capped at 1. Rejecting where the adjusted value is below alpha is
    Holm's step-down procedure."""
    idx = [i for i, p in enumerate(p_values) if not math.isnan(p)]
    order = sorted(idx, key=lambda i: p_values[i])
    m = len(order)
    adjusted = [math.nan] * len(p_values)
    running = 0.0
    for k, i in enumerate(order):
        running = max(running, min(1.0, (m - k) * p_values[i]))
        adjusted[i] = running
    return adjusted


@dataclass(frozen=True)
class Verdict:
    word: str
    """better / worse / equivalent within ±m / inconclusive / no information (``better, within ±m`` when a
    difference is both significant and smaller than the margin)."""
    p: float
    """The p-value the verdict used (Holm-adjusted for secondary metrics)."""
    p_tost: float
    note: str = ""


def verdict(est: Estimate, margin: float, *, lower_is_better: bool = True, p: float | None = None,
            p_tost: float | None = None) -> Verdict:  # fmt: skip
    """The verdict words of ``docs/statistics.md``: ``better`` / ``worse`` when the difference is significant at
    alpha (``p``: the adjusted p-value of a secondary metric, else the estimate's own), ``equivalent within ±m``
    when the equivalence test (TOST) rejects at alpha against ``±margin``, else ``inconclusive``. An interval of
    zero width (two groups that agree on every document) or none carries no information."""
    if not est.informative:
        if math.isfinite(est.lo) and est.hi == est.lo:
            note = "identical on every document" if est.diff == 0 else "zero-width interval"
            return Verdict(NO_INFORMATION, math.nan, math.nan, f"{note}: no information about the variability")
        return Verdict(NO_INFORMATION, math.nan, math.nan, "no interval (one seed each, no per-document data)")
    p = est.p if p is None else p
    p_tost = est.p_tost(margin) if p_tost is None else p_tost
    equivalent = margin > 0 and p_tost < ALPHA
    if p < ALPHA:
        lower = est.diff < 0
        word = BETTER if lower == lower_is_better else WORSE
        return Verdict(f"{word}, within ±{margin:g}" if equivalent else word, p, p_tost)
    if equivalent:
        return Verdict(equivalent_word(margin), p, p_tost)
    return Verdict(INCONCLUSIVE, p, p_tost)


# --- per-prompt statistics (generation metrics) ------------------------------------------------------------------


def prompt_bootstrap(statistics: Sequence[Callable[[np.ndarray], float]], n: int, n_boot: int = N_BOOT,
                     seed: int = 0) -> np.ndarray:  # fmt: skip
    """[n_boot, len(statistics)] each statistic (``f(prompt indices) -> value``: a mean over the prompts drawn, or a
    pooled ratio such as rarity; not distinct-n: ``jackknife_estimate``) on ``n_boot`` resamples of the ``n``
    prompts with replacement — the same resample for every statistic, so differences between two models'
    statistics are paired."""
    rng = np.random.default_rng(seed)
    out = np.empty((n_boot, len(statistics)))
    for i in range(n_boot):
        idx = rng.integers(0, n, n)
        out[i] = [f(idx) for f in statistics]
    return out


def jackknife_estimate(value: float, left_out: np.ndarray, method: str) -> Estimate:
    """An ``Estimate`` centred on ``value`` from its delete-1 jackknife replicates ``left_out`` [n] (the statistic
    with each prompt left out once; for a paired difference, both models without the same prompt): standard error
    ``sqrt((n - 1) / n * sum((r_i - mean r)^2))``, t quantiles on n - 1 degrees of freedom. For corpus-level
    numbers that a resample with replacement distorts: distinct-n counts a prompt drawn twice as twice the
    repeated n-grams, so every resample's value sits below the sample's (``docs/statistics.md``: coverage)."""
    r = np.asarray(left_out, dtype=np.float64)
    r = r[np.isfinite(r)]
    n = len(r)
    if n < 2:
        return Estimate(value, math.nan, math.inf, -math.inf, math.inf, -math.inf, math.inf, math.nan, method, n)
    se = math.sqrt((n - 1) / n * float(((r - r.mean()) ** 2).sum()))
    df = float(n - 1)
    half, half90 = _t(1 - ALPHA / 2, df) * se, _t(1 - ALPHA, df) * se
    # every replicate equal (se 0): no variability to test against; the interval has no width (no information)
    p = float(2 * (1 - _t_cdf(abs(value) / se, df))) if se > 0 else float(value == 0)
    return Estimate(value, se, df, value - half, value + half, value - half90, value + half90, p, method, n, float(n))


def percentile_estimate(value: float, boot: np.ndarray, method: str, n: int) -> Estimate:
    """An ``Estimate`` from a point value and its bootstrap replicates (the percentile interval; p from the
    replicates' tail shares beyond 0)."""
    boot = boot[np.isfinite(boot)]
    if len(boot) < 2:
        return Estimate(value, math.nan, math.inf, -math.inf, math.inf, -math.inf, math.inf, math.nan, method, n)
    lo, hi, lo90, hi90 = np.quantile(boot, [ALPHA / 2, 1 - ALPHA / 2, ALPHA, 1 - ALPHA])
    p = float(min(1.0, 2 * min(np.mean(boot <= 0), np.mean(boot >= 0))))
    return Estimate(value, float(boot.std(ddof=1)), math.inf, float(lo), float(hi), float(lo90), float(hi90), p,
                    method, n, float(n), boot=boot)  # fmt: skip
