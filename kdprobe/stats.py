"""The one module for spread, intervals and tests: every reported mean +- interval comes from here.

Conventions (REFERENCE.md, "Representation diversity"):
- std is the sample standard deviation (ddof=1); sem = std / sqrt(n) (the paper's "error margin").
- The confidence half-width is q * sem, with q the Student-t quantile t_{(1+c)/2, n-1}
  ("t", the honest default for n = 5: 4.604 at 99%) or the normal quantile
  z_{(1+c)/2} ("normal", 2.576 at 99%, what the paper used).
- Two groups are compared with Welch's unequal-variance t-test; p-values of several
  comparisons against one reference are Holm-Bonferroni adjusted; effect sizes are
  Hedges' g (Cohen's d with the pooled sd, times the small-sample correction J).
- A statistic of several checkpoints at once (a mean over pairs of checkpoints, the gain of
  an ensemble) has no per-checkpoint values to summarize; its standard error comes from the
  delete-one-checkpoint jackknife, grouped by independent sample (Arvesen 1969, for
  U-statistics), with a Welch-Satterthwaite t reference. For a plain mean it reduces to
  sem (one group) and for a difference of two means to Welch's test (tested).
- The mean of a few random samples that may be skewed (a Hutchinson trace estimate) gets the union
  of a studentized-bootstrap interval (bootstrap-t; Efron & Tibshirani 1993, ch. 12.5) and the t
  interval, flagged unstable below 10 samples or below Cochran's n >= 25 g1^2 (`bootstrap_t_interval`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np
from scipy import stats as _sps

from kdprobe.errors import KdprobeError

INTERVALS = ("t", "normal")


@dataclass(frozen=True)
class Summary:
    """Mean and spread of n repeated measurements, with a two-sided confidence interval."""

    mean: float
    std: float  # sample standard deviation, ddof=1 (nan for n=1)
    sem: float  # std / sqrt(n) (nan for n=1)
    half_width: float  # quantile * sem (nan for n=1)
    n: int
    confidence: float  # e.g. 0.99
    interval: str  # "t" or "normal"
    low: float  # mean - half_width
    high: float  # mean + half_width


def _as_array(values: Iterable[float], what: str = "values") -> np.ndarray:
    arr = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=np.float64).ravel()
    if arr.size == 0:
        raise KdprobeError(f"expected at least one of {what}, got none; measure something first")
    if not np.all(np.isfinite(arr)):
        bad = [int(i) for i in np.flatnonzero(~np.isfinite(arr))][:5]
        raise KdprobeError(f"expected finite {what}, got nan/inf at positions {bad}; check the measurement")
    return arr


def _check_options(confidence: float, interval: str) -> None:
    if not (0.0 < confidence < 1.0):
        raise KdprobeError(f"expected a confidence level in (0, 1) such as 0.99, got {confidence}")
    if interval not in INTERVALS:
        raise KdprobeError(f"expected interval one of {INTERVALS}, got {interval!r}")


def critical_value(n: int, confidence: float = 0.99, interval: str = "t") -> float:
    """Two-sided quantile multiplying the sem: t_{(1+c)/2, n-1} or z_{(1+c)/2}; nan when n < 2."""
    return _quantile(n - 1, confidence, interval)


def _quantile(df: float, confidence: float, interval: str) -> float:
    """Two-sided quantile with (possibly fractional) df degrees of freedom; nan when df is not positive."""
    _check_options(confidence, interval)
    if not df > 0:
        return math.nan
    p = (1.0 + confidence) / 2.0
    if interval == "normal":
        return float(_sps.norm.ppf(p))
    return float(_sps.t.ppf(p, df))


def summarize(values: Iterable[float], confidence: float = 0.99, interval: str = "t") -> Summary:
    """Mean, sample std, sem and the confidence interval of repeated measurements."""
    _check_options(confidence, interval)
    arr = _as_array(values)
    n = int(arr.size)
    mean = float(arr.mean())
    if n < 2:  # one value has no spread: report it, do not fail
        nan = math.nan
        return Summary(mean, nan, nan, nan, n, confidence, interval, nan, nan)
    std = float(arr.std(ddof=1))
    sem = std / math.sqrt(n)
    hw = critical_value(n, confidence, interval) * sem
    return Summary(mean, std, sem, hw, n, confidence, interval, mean - hw, mean + hw)


def welch_t(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """Two-sided Welch t-test of mean(a) != mean(b); returns (t, p); (nan, nan) when undefined."""
    x, y = _as_array(a, "values of group a"), _as_array(b, "values of group b")
    n1, n2 = x.size, y.size
    if n1 < 2 or n2 < 2:
        return math.nan, math.nan
    v1, v2 = x.var(ddof=1) / n1, y.var(ddof=1) / n2  # squared standard errors
    se2 = v1 + v2
    if se2 == 0.0:  # both groups constant: the statistic is undefined
        return math.nan, math.nan
    t = float((x.mean() - y.mean()) / math.sqrt(se2))
    # Welch-Satterthwaite degrees of freedom
    df = se2**2 / (v1**2 / (n1 - 1) + v2**2 / (n2 - 1))
    p = float(min(1.0, 2.0 * _sps.t.sf(abs(t), df)))
    return t, p


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni step-down adjusted p-values (monotone, capped at 1); nan entries stay nan and do not count."""
    p = np.asarray(list(pvalues), dtype=np.float64)
    out = np.full(p.shape, np.nan)
    valid = np.flatnonzero(~np.isnan(p))
    m = valid.size
    if m == 0:
        return out.tolist()
    if np.any((p[valid] < 0) | (p[valid] > 1)):
        raise KdprobeError(f"expected p-values in [0, 1], got {p.tolist()}")
    order = valid[np.argsort(p[valid], kind="stable")]
    running = 0.0
    for rank, idx in enumerate(order):  # the i-th smallest p is multiplied by (m - i)
        running = max(running, min(1.0, (m - rank) * p[idx]))
        out[idx] = running
    return out.tolist()


def hedges_g(a: Sequence[float], b: Sequence[float]) -> float:
    """Hedges' g of a minus b: (mean_a - mean_b) / pooled sd, times J = 1 - 3/(4(n1+n2)-9); nan when undefined."""
    x, y = _as_array(a, "values of group a"), _as_array(b, "values of group b")
    n1, n2 = x.size, y.size
    if n1 + n2 < 3 or n1 < 1 or n2 < 1:
        return math.nan
    pooled_var = ((n1 - 1) * (x.var(ddof=1) if n1 > 1 else 0.0) + (n2 - 1) * (y.var(ddof=1) if n2 > 1 else 0.0)) / (
        n1 + n2 - 2
    )
    if pooled_var == 0.0:
        return math.nan
    d = (x.mean() - y.mean()) / math.sqrt(pooled_var)
    return float(d * (1.0 - 3.0 / (4.0 * (n1 + n2) - 9.0)))


@dataclass(frozen=True)
class Jackknife:
    """A statistic of several checkpoints with its grouped delete-one jackknife spread and t test of zero."""

    estimate: float  # the statistic on every unit
    se: float  # jackknife standard error (nan when a group has fewer than 2 units or a deletion is undefined)
    df: float  # Welch-Satterthwaite degrees of freedom of the t reference
    half_width: float  # quantile(df) * se
    low: float
    high: float
    t: float  # estimate / se
    p_value: float  # two-sided, t distribution with df degrees of freedom
    n_units: int  # units (checkpoints) deleted one at a time
    confidence: float
    interval: str


def jackknife(estimate: float, leave_one_out: Mapping[str, Sequence[float]], confidence: float = 0.99,
              interval: str = "t") -> Jackknife:
    """Grouped delete-one jackknife: se^2 = sum over groups g of (n_g-1)/n_g * sum_i (theta_(i) - mean_g)^2.

    leave_one_out maps each independent sample (a training method's checkpoints) to the statistic
    recomputed without each of its units in turn; nan there (the statistic is undefined without
    that unit) makes the spread nan. A group of one unit has no estimable spread: nan.
    """
    _check_options(confidence, interval)
    nan = math.nan
    parts, n_units, ok = [], 0, math.isfinite(estimate)
    for g, vals in leave_one_out.items():
        v = np.asarray(list(vals), dtype=np.float64)
        n_units += v.size
        if v.size < 2 or not np.all(np.isfinite(v)):
            ok = False
            continue
        parts.append(((v.size - 1) / v.size * float(((v - v.mean()) ** 2).sum()), v.size - 1))
    if not ok or not parts:
        return Jackknife(float(estimate), nan, nan, nan, nan, nan, nan, nan, n_units, confidence, interval)
    var = sum(p for p, _ in parts)
    denom = sum(p * p / d for p, d in parts)
    df = var * var / denom if denom > 0 else float(sum(d for _, d in parts))
    se = math.sqrt(var)
    hw = _quantile(df, confidence, interval) * se
    if se > 0:
        t = estimate / se
        p = float(min(1.0, 2.0 * _sps.t.sf(abs(t), df)))
    else:
        t, p = nan, nan
    return Jackknife(float(estimate), se, float(df), hw, estimate - hw, estimate + hw, float(t), p, n_units,
                     confidence, interval)


@dataclass(frozen=True)
class MeanInterval:
    """A confidence interval for offset + the mean of random samples, with whether it can be trusted yet."""

    low: float
    high: float
    confidence: float
    method: str  # "bootstrap-t|t": the union of both intervals
    stable: bool  # False: fewer than 10 samples, or too few for their skewness (Cochran: n >= 25 skewness^2)
    note: str  # why not stable ("" when stable)


def bootstrap_t_interval(samples: Iterable[float], *, offset: float = 0.0, confidence: float = 0.95,
                         resamples: int = 2000, seed: int = 0, unit: str = "samples") -> MeanInterval:
    """Interval for offset + mean(samples): the union of the bootstrap-t and the Student t interval.

    A mean of right-skewed samples (v^T A v when one eigenvalue carries much of the trace) makes the t
    interval miss mostly on one side; the studentized bootstrap (resamples draws from a numpy Generator
    seeded with `seed`) corrects that to second order, and the t interval guards the bootstrap's own too
    short tails at n ~ 10. Not stable (with a note naming `unit`) below 10 samples or when
    n < 25 g1^2 (Cochran, Sampling Techniques 1977, 2.15; g1 the sample skewness); nan bounds when
    fewer than 2 finite samples."""
    s = np.asarray(list(samples) if not isinstance(samples, np.ndarray) else samples, dtype=np.float64).ravel()
    if not 0 < confidence < 1 or resamples < 100:
        raise KdprobeError(f"expected a confidence in (0, 1) and at least 100 resamples, got {confidence}, {resamples}")
    method = "bootstrap-t|t"
    n = s.size
    if n < 2 or not np.all(np.isfinite(s)):
        return MeanInterval(math.nan, math.nan, confidence, method, False, f"{n} finite sample(s): no spread to estimate")
    mean, sd = float(s.mean()), float(s.std(ddof=1))
    se = sd / math.sqrt(n)
    if se == 0.0:  # every sample equal (e.g. a zero residual after exact deflation)
        return MeanInterval(offset + mean, offset + mean, confidence, method, n >= 10,
                            "" if n >= 10 else f"only {n} {unit}")
    rng = np.random.default_rng(seed)
    a = (1 - confidence) / 2
    draws: list[np.ndarray] = []
    for start in range(0, resamples, 500):  # bounded memory: 500 x n at a time
        b = s[rng.integers(0, n, (min(500, resamples - start), n))]
        bse = b.std(axis=1, ddof=1) / math.sqrt(n)
        t = (b.mean(axis=1) - mean) / np.where(bse > 0, bse, np.nan)
        draws.append(t[np.isfinite(t)])
    t = np.concatenate(draws)
    lo_t, hi_t = np.quantile(t, [a, 1 - a])
    q = float(_sps.t.ppf(1 - a, n - 1))
    low = offset + mean - max(hi_t, q) * se
    high = offset + mean - min(lo_t, -q) * se
    notes = []
    if n < 10:
        notes.append(f"only {n} {unit}")
    g1 = float(((s - mean) ** 3).mean() / ((s - mean) ** 2).mean() ** 1.5)
    if n < 25 * g1 * g1:
        notes.append(f"skewed samples (skewness {g1:.2f}) want >= {math.ceil(25 * g1 * g1)} {unit}, got {n}: "
                     "the interval may still be too narrow")
    return MeanInterval(float(low), float(high), confidence, method, not notes, "; ".join(notes))
