"""Intervals, tests and verdict words (evals/compare/stats.py) on constructed cases whose answer is known, and the
intervals' coverage by simulation (evals/compare/coverage.py) at a small size: it must fail methods that drop the
seeds' or the documents' spread, or that are 90% intervals called 95%."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from evals.compare.coverage import Case, coverage
from evals.compare.stats import (
    BETTER,
    INCONCLUSIVE,
    NO_INFORMATION,
    WORSE,
    Estimate,
    Paired,
    document_counts,
    holm,
    kish,
    seeds_only,
    seeds_t,
    two_level,
    verdict,
)


def _estimate(diff: float, se: float, df: float = math.inf) -> Estimate:
    """A t-based estimate with the given standard error, as seeds_t makes them."""
    q = sps.norm if not math.isfinite(df) else sps.t(df)
    h95, h90 = q.ppf(0.975) * se, q.ppf(0.95) * se
    p = 2 * (1 - q.cdf(abs(diff) / se))
    return Estimate(diff, se, df, diff - h95, diff + h95, diff - h90, diff + h90, p, "constructed", seeds=(3, 3))


# --- TOST --------------------------------------------------------------------------------------------------------


def test_tost_is_the_90_percent_interval_inside_the_margin():
    # inside: 90% interval 0.002 ± 1.645 * 0.003 = [-0.0029, +0.0069] within ±0.01; p = P(Z > (0.01 - 0.002) / 0.003)
    inside = _estimate(0.002, 0.003)
    assert inside.p_tost(0.01) == pytest.approx(1 - sps.norm.cdf(8 / 3), rel=1e-9)
    assert inside.p_tost(0.01) < 0.05
    # outside: 0.008 + 1.645 * 0.003 = 0.0129 > 0.01; p = P(Z > 2 / 3) = 0.25
    outside = _estimate(0.008, 0.003)
    assert outside.p_tost(0.01) == pytest.approx(1 - sps.norm.cdf(2 / 3), rel=1e-9) and outside.p_tost(0.01) > 0.05
    # t with 2 degrees of freedom: the lower test binds for a negative difference
    t2 = _estimate(-0.004, 0.001, df=2)
    assert t2.p_tost(0.01) == pytest.approx(1 - sps.t.cdf(6.0, 2), rel=1e-9)
    # everywhere: equivalence at 5% exactly when the 90% interval lies inside (-m, m)
    rng = np.random.default_rng(3)
    for _ in range(300):
        est = _estimate(rng.normal(0, 0.01), rng.uniform(0.0005, 0.01), df=float(rng.choice([2.0, 4.0, math.inf])))
        assert (est.p_tost(0.01) < 0.05) == (est.lo90 > -0.01 and est.hi90 < 0.01)
    # the percentile bootstrap: tail shares beyond the margin
    boot = np.linspace(-0.006, 0.012, 1001)  # 1/1001 apart; the share at or above 0.01 is 112 / 1001
    est = Estimate(0.003, 0.005, math.inf, -0.005, 0.011, -0.005, 0.011, 0.5, "percentile", boot=boot)
    assert est.p_tost(0.01) == pytest.approx(np.mean(boot >= 0.01)) and est.p_tost(0.02) == 0.0


# --- Holm ---------------------------------------------------------------------------------------------------------


def _holm_by_hand(p: list[float], alpha: float = 0.05) -> list[bool]:
    """Holm's step-down test as its definition says: sort ascending, reject the k-th (from 1) while p <= alpha /
    (m - k + 1), stop at the first that is not."""
    order = sorted(range(len(p)), key=lambda i: p[i])
    reject = [False] * len(p)
    for k, i in enumerate(order):
        if p[i] > alpha / (len(p) - k):
            break
        reject[i] = True
    return reject


def test_holm_adjusts_as_the_step_down_procedure():
    p = [0.01, 0.04, 0.03, 0.005]
    # sorted: 0.005 x 4 = 0.02, 0.01 x 3 = 0.03, 0.03 x 2 = 0.06, 0.04 x 1 = 0.04 -> kept monotone: 0.06
    assert holm(p) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.2, 0.9]) == pytest.approx([0.4, 0.9]) and holm([0.6, 0.7]) == [1.0, 1.0]
    assert math.isnan(holm([0.01, math.nan])[1]) and holm([0.01, math.nan])[0] == pytest.approx(0.01)  # NaN not counted
    rng = np.random.default_rng(0)
    for _ in range(200):
        ps = list(rng.uniform(0, 0.1, rng.integers(1, 12)))
        assert [a < 0.05 for a in holm(ps)] == _holm_by_hand(ps)


# --- verdict words ------------------------------------------------------------------------------------------------


def test_verdict_words_on_constructed_cases():
    m = 0.01
    assert verdict(_estimate(-0.03, 0.005), m).word == BETTER  # loss 0.03 lower, far outside the margin
    assert verdict(_estimate(0.03, 0.005), m).word == WORSE
    assert verdict(_estimate(0.03, 0.005), m, lower_is_better=False).word == BETTER  # a score: higher is better
    assert verdict(_estimate(0.001, 0.002), m).word == "equivalent within ±0.01"  # 90%: [-0.0023, 0.0043]
    wide = verdict(_estimate(0.005, 0.008), m)  # 95%: [-0.011, 0.021]: includes 0 and goes past the margin
    assert wide.word == INCONCLUSIVE and wide.p > 0.05 and wide.p_tost > 0.05
    assert verdict(_estimate(0.004, 0.001), m).word == "worse, within ±0.01"  # significant, and smaller than m
    assert verdict(_estimate(0.004, 0.001), 0.0).word == WORSE  # no margin declared: no equivalence
    # a secondary metric: significant alone (p = 0.0027) but not after Holm's adjustment
    est = _estimate(0.009, 0.003)
    assert verdict(est, m).word == WORSE and verdict(est, m, p=0.2, p_tost=0.6).word == INCONCLUSIVE
    # two runs that agree on every document: no information, not infinite power
    same = seeds_t(Paired.of(np.ones((3, 5)), np.ones((3, 5)), np.full(5, 10.0), paired=True))
    assert (same.lo, same.hi) == (0.0, 0.0) and verdict(same, m).word == NO_INFORMATION
    assert "identical on every document" in verdict(same, m).note and math.isnan(same.mde())
    one = seeds_only([1.0], [0.5])
    assert verdict(one, m).word == NO_INFORMATION and math.isinf(one.half_width)


def test_minimum_detectable_effect_and_power():
    est = _estimate(0.0, 0.004)
    assert est.mde() == pytest.approx((1.959964 + 0.841621) * 0.004, rel=1e-5)  # 2.8 standard errors
    assert est.mde() / est.half_width == pytest.approx(1.43, abs=0.005)
    assert est.power(est.mde()) == pytest.approx(0.80, abs=0.001)
    assert est.power(est.half_width) == pytest.approx(0.5, abs=0.001)  # the half-width: found half the time
    few = _estimate(0.0, 0.004, df=2)  # 3 seeds: t(2) quantiles
    assert few.mde() == pytest.approx((sps.t.ppf(0.975, 2) + sps.t.ppf(0.8, 2)) * 0.004, rel=1e-9)
    assert few.power(few.mde()) == pytest.approx(0.80, abs=0.05)  # shifted-t approximation


# --- the intervals ------------------------------------------------------------------------------------------------


def test_document_resampling_keeps_strata_and_matches_an_index_bootstrap():
    rng = np.random.default_rng(0)
    strata = np.array([0] * 5 + [1] * 3 + [2] * 2)
    counts = document_counts(rng, 400, 10, strata)
    for s, n in ((0, 5), (1, 3), (2, 2)):
        assert (counts[:, strata == s].sum(1) == n).all()  # every replicate keeps each domain's count
    clustered = document_counts(rng, 400, 10, strata, cluster=True)
    assert (clustered.sum(1) != 10).any() and (clustered.sum(1) % 1 == 0).all()  # whole domains drawn
    # float64 reference: resample document indices one draw at a time; the same ratio of sums
    tokens = rng.integers(20, 400, 60).astype(float)
    a = tokens * (3 + rng.normal(0, 0.5, 60))
    b = a - tokens * (0.05 + rng.normal(0, 0.3, 60))
    est = two_level(Paired.of(a, b, tokens), n_boot=4000, seed=1)
    ref = []
    for _ in range(4000):
        i = rng.integers(0, 60, 60)
        ref.append(a[i].sum() / tokens[i].sum() - b[i].sum() / tokens[i].sum())
    lo, hi = np.quantile(ref, [0.025, 0.975])
    assert est.diff == pytest.approx(a.sum() / tokens.sum() - b.sum() / tokens.sum(), rel=1e-12)
    assert est.lo == pytest.approx(lo, abs=0.1 * (hi - lo)) and est.hi == pytest.approx(hi, abs=0.1 * (hi - lo))
    one = seeds_t(Paired.of(a, b, tokens), n_boot=4000, seed=1)  # one seed: the documents' spread alone
    assert one.seed_var == 0 and one.se == pytest.approx(np.std(ref), rel=0.1) and "no seed spread" in one.method
    assert seeds_t(Paired.of(a, b, tokens), seed=3) == seeds_t(Paired.of(a, b, tokens), seed=3)  # seeded


def test_the_seed_part_is_a_paired_t_over_seeds():
    d = np.array([0.5, 0.3, 0.5])  # per-seed differences on one shared document set
    a = np.array([[1.0], [1.2], [0.9]])
    est = seeds_t(Paired.of(a, a - d[:, None], paired=True))  # one document: no document spread to add
    assert est.diff == pytest.approx(d.mean()) and est.seed_var == pytest.approx(d.var(ddof=1) / 3)
    assert est.df == pytest.approx(2.0) and est.half_width == pytest.approx(4.302653 * d.std(ddof=1) / math.sqrt(3))
    only = seeds_only([1.0, 1.2, 0.9], [0.5, 0.9, 0.4], paired=True)
    assert (only.lo, only.hi) == pytest.approx((est.lo, est.hi)) and verdict(only, 0.01).word == WORSE
    with pytest.raises(ValueError, match="same documents"):
        Paired.of(np.ones((1, 3)), np.ones((1, 4)))


# --- coverage by simulation ---------------------------------------------------------------------------------------

SEEDS_DOMINATE = Case("seeds dominate", 23, 3, seed_sd=0.02, doc_sd=0.005)
DOCS_DOMINATE = Case("documents dominate", 23, 3, seed_sd=0.0, doc_sd=0.03, interaction_sd=0.005)


def _coverage(method, case: Case) -> float:
    """The small coverage check (400 simulated studies of 23 lopsided documents and 3 seeds: Monte-Carlo error
    ±0.02 near 0.95). ``scripts/coverage_sim.py`` runs 2,000 a case, for the table in docs/statistics.md."""
    return coverage(case, method, studies=400, n_boot=200, seed=11).covered


def _documents_only(data: Paired, n_boot: int, seed: int) -> Estimate:
    """Broken: the documents' bootstrap of the seed-mean difference, the seeds' spread dropped."""
    return two_level(Paired(data.a.mean(0, keepdims=True), data.b.mean(0, keepdims=True), data.den), n_boot, seed)


def _seeds_only(data: Paired, n_boot: int, seed: int) -> Estimate:
    """Broken: the seeds' t-interval on the per-run numbers, the documents' spread dropped."""
    a, b = data.per_run()
    return seeds_only(a, b, paired=True)


@pytest.mark.parametrize("case", [SEEDS_DOMINATE, DOCS_DOMINATE], ids=["seeds", "documents"])
def test_the_coverage_check_passes_the_interval_and_fails_broken_ones(case):
    assert _coverage(seeds_t, case) >= 0.90
    broken = _documents_only if case is SEEDS_DOMINATE else _seeds_only
    assert _coverage(broken, case) < 0.75  # measured: 0.43 and 0.51
    if case is SEEDS_DOMINATE:  # why the percentile two-level bootstrap is not the default: 3 seeds are too few
        assert _coverage(two_level, case) < 0.88


def test_distinct_n_with_each_reply_left_out_is_distinct_n_of_the_others():
    from evals.generation_metrics import distinct_n, distinct_n_left_out

    rng = np.random.default_rng(3)
    replies = [" ".join(f"w{w}" for w in rng.integers(0, 30, rng.integers(0, 9))) for _ in range(40)]
    replies += ["", "a", "a b a b a b"]  # no words, too few words for a 2-gram, a loop
    for n in (1, 2, 3):
        assert distinct_n_left_out(replies, n) == [
            distinct_n(replies[:i] + replies[i + 1 :], n) for i in range(len(replies))
        ]  # exactly: the same two integers divided


def test_the_distinct_n_coverage_check_passes_the_jackknife_and_fails_the_bootstrap():
    """60 prompts, 150 simulated studies (Monte-Carlo error about ±0.035 near 0.95); ``scripts/coverage_sim.py
    --distinct`` runs more, for the table in docs/statistics.md."""
    from evals.compare.coverage_distinct import DistinctCase, distinct_coverage

    case = DistinctCase("60 prompts, distinct-1", prompts=60)
    got = {(r.method, r.target): r.covered for r in distinct_coverage(case, 150, 600, n_boot=100, seed=5)}
    assert got[("jackknife", "one model")] >= 0.9 and got[("jackknife", "difference")] >= 0.9
    assert got[("bootstrap", "one model")] < 0.2 and got[("bootstrap", "difference")] < 0.85


def test_seeds_jackknife_is_seeds_t_for_a_mean_over_prompts():
    """For a mean over prompts the jackknife's prompt variance is the textbook one, so the seed-and-prompt
    interval matches seeds_t's (whose prompt part is a bootstrap: within its Monte-Carlo error)."""
    from evals.compare.stats import seeds_jackknife

    rng = np.random.default_rng(2)
    n, k = 200, 3
    doc, doc_diff = rng.normal(0, 0.3, n), rng.normal(0, 0.2, n)  # what both share, and how they differ, per prompt
    a = 0.5 + doc + doc_diff + rng.normal(0, 0.05, (k, 1)) + rng.normal(0, 0.1, (k, n))  # [k, n]
    b = 0.4 + doc + rng.normal(0, 0.05, (k, 1)) + rng.normal(0, 0.1, (k, n))

    def left_out(x):  # [k, n] -> [k, n] each run's mean without each prompt
        return (x.sum(1, keepdims=True) - x) / (n - 1)

    jack = seeds_jackknife(a.mean(1), left_out(a), b.mean(1), left_out(b), paired=True)
    boot = seeds_t(Paired.of(a, b, paired=True), n_boot=4000)
    assert jack.diff == pytest.approx(boot.diff) and jack.seeds == (3, 3) and "jackknife" in jack.method
    assert jack.seed_var == pytest.approx(boot.seed_var)
    assert jack.doc_var == pytest.approx(boot.doc_var, rel=0.1) and jack.se == pytest.approx(boot.se, rel=0.05)


def test_the_seeded_distinct_n_check_passes_seeds_jackknife_and_fails_the_prompts_alone():
    """Three paired seeds whose own effects dominate: the seeds' spread must be in the interval."""
    from evals.compare.coverage_distinct import DistinctCase, seeded_coverage
    from evals.compare.stats import jackknife_estimate

    def prompts_only(a, a_left, b, b_left, paired):  # broken: the seeds' spread dropped
        return jackknife_estimate(float(np.mean(a) - np.mean(b)), (a_left - b_left).mean(0), "prompts only")

    case = DistinctCase("seeds dominate", seeds=3, seed_sd=0.03, interaction_sd=0.08)
    assert seeded_coverage(case, 120, 400, seed=4).covered >= 0.88  # measured: 0.925
    assert seeded_coverage(case, 120, 400, seed=4, method=prompts_only).covered < 0.75  # measured: 0.39


def test_the_expected_clipped_score_is_the_simulated_mean():
    """The ROUGE-like simulation's true difference (closed form) against a float64 Monte-Carlo mean."""
    from evals.compare.coverage_scores import expected_score

    rng = np.random.default_rng(0)
    for m, s in ((0.046, 0.15), (-0.3, 0.2), (0.9, 0.3), (0.5, 0.01)):
        x = np.clip(rng.normal(m, s, 2_000_000), 0, 1)
        assert expected_score(m, s) == pytest.approx(x.mean(), abs=4 * x.std() / np.sqrt(x.size) + 1e-12)


def test_the_rouge_like_coverage_check_passes_seeds_t_and_fails_the_prompts_alone():
    """The fine-tuning study's primary metric (a mean over prompts of a score clipped at zero), 3 paired seeds
    whose own effect on the difference dominates: the seeds' spread must be in the interval. 200 studies
    (Monte-Carlo error about ±0.03 near 0.95); ``scripts/coverage_sim.py --scores`` runs 2,000 a case."""
    from evals.compare.coverage_scores import ScoreCase, score_coverage, truth

    case = ScoreCase("seed spread dominates", diff_seed_sd=0.012)
    got = score_coverage(case, seeds_t, studies=200, n_boot=200, seed=3)
    assert got.covered >= 0.88 and 0.3 < got.zero_share < 0.45 and abs(truth(case)) < 0.001
    broken = score_coverage(case, _documents_only, studies=200, n_boot=200, seed=3)
    assert broken.covered < 0.75 and broken.widen95 > 1.5  # the prompts' spread alone is far too narrow


def test_the_coverage_script_rewrites_only_its_table(tmp_path):
    """``scripts/coverage_sim.py`` at a toy size into a copy of docs/statistics.md: every case a row, the text
    around the markers and the distinct-n table untouched."""
    import subprocess
    import sys
    from pathlib import Path

    from evals.compare.coverage import CASES

    repo = Path(__file__).resolve().parents[1]
    doc = tmp_path / "statistics.md"
    doc.write_text((repo / "docs/statistics.md").read_text())
    before = doc.read_text()
    proc = subprocess.run([sys.executable, "scripts/coverage_sim.py", "--studies", "10", "--boot", "50", "--out",
                           str(doc)], cwd=repo, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    begin, end = "<!-- coverage table: scripts/coverage_sim.py -->", "<!-- end of coverage table -->"
    after = doc.read_text()
    assert after.split(begin)[0] == before.split(begin)[0] and after.split(end)[1] == before.split(end)[1]
    table = after.split(begin)[1].split(end)[0]
    assert "--studies 10 --boot 50" in table and all(f"| {case.name} |" in table for case in CASES)
    # --scores: its own table, the others untouched
    from evals.compare.coverage_scores import SCORE_CASES

    proc = subprocess.run([sys.executable, "scripts/coverage_sim.py", "--scores", "--studies", "10", "--boot", "50",
                           "--out", str(doc)], cwd=repo, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    begin2, end2 = (
        "<!-- score coverage table: scripts/coverage_sim.py --scores -->",
        "<!-- end of score coverage table -->",
    )
    scores = doc.read_text()
    assert scores.split(begin)[1].split(end)[0] == table and scores.split(end2)[1] == after.split(end2)[1]
    table2 = scores.split(begin2)[1].split(end2)[0]
    assert "--scores --studies 10 --boot 50" in table2 and all(f"| {c.name} |" in table2 for c in SCORE_CASES)


def test_kish():
    assert kish([1, 1, 1, 1]) == 4 and kish([10, 0, 0]) == 1
    # one document of 26% of the tokens among 22 equal ones: about 12 effective documents
    assert kish([26.0] + [74 / 22] * 22) == pytest.approx(100**2 / (26**2 + 74**2 / 22))
