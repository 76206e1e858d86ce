"""kdprobe.stats against hand-computed values and scipy."""
import math

import numpy as np
import pytest
from scipy import stats as sps

from kdprobe.errors import KdprobeError
from kdprobe.stats import critical_value, hedges_g, holm, summarize, welch_t


def _five_with_std(std, mean=-143.0):
    z = np.array([-2.0, -1.0, 0.0, 1.0, 2.0])
    return mean + std * z / z.std(ddof=1)


def test_summarize_paper_numbers_t_and_normal():
    vals = _five_with_std(0.462)
    t = summarize(vals, confidence=0.99, interval="t")
    z = summarize(vals, confidence=0.99, interval="normal")
    assert t.n == 5 and t.std == pytest.approx(0.462, abs=1e-12)
    assert t.sem == pytest.approx(0.2066, abs=1e-4)
    assert z.half_width == pytest.approx(0.532, abs=1e-3)  # 2.576 * sem, as in the paper
    assert t.half_width == pytest.approx(0.951, abs=1e-3)  # 4.604 * sem
    assert t.low == pytest.approx(t.mean - t.half_width) and t.high == pytest.approx(t.mean + t.half_width)
    assert t.mean == pytest.approx(-143.0)


def test_summarize_matches_scipy_interval():
    rng = np.random.default_rng(1)
    vals = rng.normal(3.0, 2.0, size=7)
    s = summarize(vals, confidence=0.95)
    lo, hi = sps.t.interval(0.95, len(vals) - 1, loc=vals.mean(), scale=sps.sem(vals))
    assert (s.low, s.high) == pytest.approx((lo, hi), rel=1e-12)
    assert critical_value(5, 0.99, "normal") == pytest.approx(2.5758, abs=1e-4)
    assert critical_value(5, 0.99, "t") == pytest.approx(4.6041, abs=1e-4)


def test_summarize_single_value_and_errors():
    s = summarize([2.5])
    assert s.mean == 2.5 and s.n == 1
    assert all(math.isnan(v) for v in (s.std, s.sem, s.half_width, s.low, s.high))
    with pytest.raises(KdprobeError):
        summarize([])
    with pytest.raises(KdprobeError):
        summarize([1.0, float("nan")])
    with pytest.raises(KdprobeError):
        summarize([1.0, 2.0], interval="bootstrap")
    with pytest.raises(KdprobeError):
        summarize([1.0, 2.0], confidence=99)


@pytest.mark.parametrize("n1,n2,shift", [(5, 5, 0.5), (3, 8, -1.0), (10, 4, 0.0), (2, 2, 3.0)])
def test_welch_matches_scipy(n1, n2, shift):
    rng = np.random.default_rng(n1 * 10 + n2)
    a, b = rng.normal(shift, 1.0, n1), rng.normal(0.0, 2.5, n2)
    t, p = welch_t(a, b)
    ref = sps.ttest_ind(a, b, equal_var=False)
    assert t == pytest.approx(ref.statistic, rel=1e-10)
    assert p == pytest.approx(ref.pvalue, rel=1e-8)


def test_welch_undefined_cases_are_nan():
    assert all(math.isnan(v) for v in welch_t([1.0], [1.0, 2.0]))
    assert all(math.isnan(v) for v in welch_t([1.0, 1.0], [2.0, 2.0]))


def test_holm_hand_computed():
    # sorted: 0.005*4=0.02, 0.01*3=0.03, 0.03*2=0.06, 0.04*1=0.04 -> raised to 0.06 (monotone)
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])  # capped at 1
    out = holm([0.02, float("nan"), 0.04])  # nan is not a test: m = 2
    assert out[0] == pytest.approx(0.04) and math.isnan(out[1]) and out[2] == pytest.approx(0.04)
    assert holm([]) == []


def test_hedges_g_hand_computed():
    # mean a 2.5, var 5/3; mean b 4, var 4; pooled var (5 + 8)/5 = 2.6; J = 1 - 3/19
    expected = (2.5 - 4.0) / math.sqrt(2.6) * (1 - 3 / 19)
    assert hedges_g([1, 2, 3, 4], [2, 4, 6]) == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(-0.78338, abs=1e-5)
    assert hedges_g([1, 2, 3, 4], [2, 4, 6]) == pytest.approx(-hedges_g([2, 4, 6], [1, 2, 3, 4]))
    assert math.isnan(hedges_g([1.0, 1.0], [1.0, 1.0]))


def test_jackknife_of_a_mean_is_the_sem_and_of_a_difference_is_welch():
    from kdprobe.stats import jackknife

    rng = np.random.default_rng(5)
    x, y = rng.normal(1.0, 2.0, 6), rng.normal(0.0, 0.5, 4)
    loo = [(x.sum() - v) / (len(x) - 1) for v in x]
    jk = jackknife(float(x.mean()), {"a": loo}, confidence=0.95)
    s = summarize(x, confidence=0.95)
    assert jk.se == pytest.approx(s.sem, rel=1e-12) and jk.df == pytest.approx(5)
    assert (jk.low, jk.high) == pytest.approx((s.low, s.high), rel=1e-12)
    # difference of two independent means: the grouped jackknife is Welch's t with Satterthwaite df
    d = float(x.mean() - y.mean())
    loo2 = {"a": [v - y.mean() for v in loo], "b": [x.mean() - (y.sum() - v) / (len(y) - 1) for v in y]}
    jk2 = jackknife(d, loo2)
    t, p = welch_t(x, y)
    assert jk2.t == pytest.approx(t, rel=1e-10) and jk2.p_value == pytest.approx(p, rel=1e-8)
    assert math.isnan(jackknife(1.0, {"a": [1.0]}).se) and math.isnan(jackknife(1.0, {"a": [1.0, math.nan]}).se)


def test_jackknife_se_of_a_pair_mean_matches_its_sampling_spread():
    # The mean over all pairs of n "checkpoints" (a U-statistic) has about twice the standard error
    # that a t interval over per-checkpoint means suggests; the jackknife gets it right.
    from kdprobe.stats import jackknife

    rng = np.random.default_rng(0)
    n, reps = 8, 3000
    est, se_jk, se_naive = [], [], []
    for _ in range(reps):
        x = rng.normal(size=(n, 3))
        d = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)  # pair "distance", shared units
        iu = np.triu_indices(n, 1)
        u = d[iu].mean()
        loo = [np.delete(np.delete(d, i, 0), i, 1)[np.triu_indices(n - 1, 1)].mean() for i in range(n)]
        est.append(u)
        se_jk.append(jackknife(u, {"g": loo}).se)
        per_ckpt = d.sum(1) / (n - 1)
        se_naive.append(per_ckpt.std(ddof=1) / math.sqrt(n))
    true_sd = float(np.std(est, ddof=1))
    assert float(np.sqrt(np.mean(np.square(se_jk)))) == pytest.approx(true_sd, rel=0.12)
    assert float(np.mean(se_naive)) < 0.6 * true_sd  # why pairs (or per-checkpoint means) are not the unit
