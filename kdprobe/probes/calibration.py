"""Calibration of a predictive distribution: ECE (Guo et al. 2017), adaptive and classwise ECE, NLL,
Brier score, reliability-diagram bins, and temperature scaling.

Definitions (all on float64 probabilities, natural log):
- ECE, top-label: confidence = max_k p_k, prediction = argmax; 15 equal-width bins
  (l, u] over [0, 1] (Guo et al.'s convention: a confidence equal to a bin's upper edge
  belongs to that bin); ECE = sum_b (n_b / n) |acc_b - conf_b|.
- Adaptive ECE (equal mass): the same sum over bins of (nearly) equal count after sorting
  by confidence (the first n mod B bins hold one more sample; ties may straddle bins).
- Classwise ECE (Kull et al. 2019): for every class k, equal-width bins on p_k over all
  samples, sum_b (n_b / n) |freq_b(y = k) - mean_b p_k|; averaged over the K classes.
- NLL = -mean log p_y. Brier (Brier 1950, as Guo et al.): mean over samples of
  sum_k (p_k - 1[y = k])^2, so it lies in [0, 2] (not divided by the number of classes).
- Temperature scaling: one scalar T > 0, logits / T, fitted by minimizing the NLL on a
  seeded random half of the samples and reported, before and after, on the other half.
  The NLL is convex in 1/T, so a safeguarded Newton iteration on 1/T finds the optimum;
  T is kept in [0.01, 100] and `at_bound` says when the optimum lies outside (e.g. every
  fitting sample is already correct: the NLL keeps falling as T -> 0).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kdprobe.errors import KdprobeError

DEFAULT_BINS = 15
T_RANGE = (0.01, 100.0)


@dataclass(frozen=True)
class ReliabilityBin:
    """One bin of the reliability diagram (top-label, equal width)."""

    lower: float
    upper: float
    count: int
    accuracy: float  # fraction correct in the bin (nan when empty)
    confidence: float  # mean top-label confidence in the bin (nan when empty)


@dataclass(frozen=True)
class Metrics:
    """Accuracy (fraction), NLL, top-label ECE and Brier score of one predictive distribution."""

    n: int
    acc: float
    nll: float
    ece: float
    brier: float


@dataclass(frozen=True)
class TemperatureFit:
    """Temperature scaling fitted on one seeded half, evaluated on the other half before and after."""

    temperature: float
    at_bound: bool  # the NLL optimum lies outside T_RANGE; T is the bound
    seed: int
    fit_n: int
    eval_n: int
    fit_nll_before: float
    fit_nll_after: float
    before: Metrics  # on the evaluation half, T = 1
    after: Metrics  # on the evaluation half, logits / T


@dataclass(frozen=True)
class CalibrationResult:
    """Calibration of one checkpoint on N samples."""

    metrics: Metrics
    bins: int
    reliability: tuple[ReliabilityBin, ...]
    adaptive_ece: float | None = None
    classwise_ece: float | None = None
    temperature: TemperatureFit | None = None


def _check(log_probs: torch.Tensor, labels: torch.Tensor, bins: int) -> None:
    if log_probs.dim() != 2 or labels.dim() != 1 or log_probs.shape[0] != labels.shape[0] or labels.numel() == 0:
        raise KdprobeError(f"expected (N, C) probabilities and N labels with N >= 1, got shapes "
                           f"{tuple(log_probs.shape)} and {tuple(labels.shape)}")
    if bins < 1:
        raise KdprobeError(f"expected at least 1 bin (Guo et al. use 15), got {bins}")
    if int(labels.min()) < 0 or int(labels.max()) >= log_probs.shape[1]:
        raise KdprobeError(f"expected labels in [0, {log_probs.shape[1]}), got {int(labels.min())}..{int(labels.max())}")


def _edges(bins: int) -> torch.Tensor:
    return torch.linspace(0.0, 1.0, bins + 1, dtype=torch.float64)


def _binned_gap(values: torch.Tensor, targets: torch.Tensor, bins: int, n_total: int) -> tuple[float, list]:
    """sum_b (n_b / n_total) |mean target_b - mean value_b| over equal-width (l, u] bins of `values`."""
    edges = _edges(bins)
    idx = torch.bucketize(values, edges[1:-1], right=False)  # (l, u]; values <= first inner edge -> bin 0
    count = torch.bincount(idx, minlength=bins).to(torch.float64)
    s_val = torch.zeros(bins, dtype=torch.float64).index_add_(0, idx, values)
    s_tgt = torch.zeros(bins, dtype=torch.float64).index_add_(0, idx, targets)
    nz = count > 0
    gap = float(((s_tgt[nz] - s_val[nz]).abs()).sum() / n_total)  # n_b/n * |acc_b - conf_b| = |sum diff| / n
    rows = []
    for b in range(bins):
        c = int(count[b])
        rows.append(ReliabilityBin(float(edges[b]), float(edges[b + 1]), c,
                                   float(s_tgt[b] / c) if c else math.nan, float(s_val[b] / c) if c else math.nan))
    return gap, rows


def top_label_ece(log_probs: torch.Tensor, labels: torch.Tensor, bins: int = DEFAULT_BINS
                  ) -> tuple[float, tuple[ReliabilityBin, ...]]:
    """Top-label ECE over equal-width bins, and the reliability-diagram bins."""
    lp, y = log_probs.to(torch.float64).cpu(), labels.cpu()
    _check(lp, y, bins)
    conf, pred = lp.exp().max(dim=1)
    gap, rows = _binned_gap(conf, (pred == y).to(torch.float64), bins, len(y))
    return gap, tuple(rows)


def adaptive_ece(log_probs: torch.Tensor, labels: torch.Tensor, bins: int = DEFAULT_BINS) -> float:
    """Top-label ECE over equal-mass bins (sorted by confidence, nearly equal counts)."""
    lp, y = log_probs.to(torch.float64).cpu(), labels.cpu()
    _check(lp, y, bins)
    conf, pred = lp.exp().max(dim=1)
    correct = (pred == y).to(torch.float64)
    order = torch.argsort(conf, stable=True)
    total = 0.0
    for chunk in torch.tensor_split(order, min(bins, len(y))):
        total += float((correct[chunk].sum() - conf[chunk].sum()).abs())
    return total / len(y)


def classwise_ece(log_probs: torch.Tensor, labels: torch.Tensor, bins: int = DEFAULT_BINS) -> float:
    """Classwise ECE (Kull et al. 2019): per-class equal-width ECE of p_k against 1[y = k], mean over classes."""
    lp, y = log_probs.to(torch.float64).cpu(), labels.cpu()
    _check(lp, y, bins)
    p = lp.exp()
    per_class = [_binned_gap(p[:, k].contiguous(), (y == k).to(torch.float64), bins, len(y))[0]
                 for k in range(p.shape[1])]
    return float(sum(per_class) / len(per_class))


def metrics(log_probs: torch.Tensor, labels: torch.Tensor, bins: int = DEFAULT_BINS) -> Metrics:
    """Accuracy, NLL, top-label ECE and Brier score from log-probabilities (float64)."""
    lp, y = log_probs.to(torch.float64).cpu(), labels.cpu()
    _check(lp, y, bins)
    p = lp.exp()
    onehot = torch.nn.functional.one_hot(y, p.shape[1]).to(torch.float64)
    acc = float((lp.argmax(dim=1) == y).to(torch.float64).mean())
    nll = float(-lp.gather(1, y[:, None]).mean())
    brier = float(((p - onehot) ** 2).sum(dim=1).mean())
    ece, _ = top_label_ece(lp, y, bins)
    return Metrics(int(len(y)), acc, nll, ece, brier)


def _nll_and_derivatives(z: torch.Tensor, y: torch.Tensor, beta: float) -> tuple[float, float, float]:
    """NLL of softmax(beta z) and its first two derivatives in beta (convex: the second is a variance)."""
    lp = torch.log_softmax(beta * z, dim=1)
    p = lp.exp()
    zy = z.gather(1, y[:, None]).squeeze(1)
    ez = (p * z).sum(dim=1)
    var = (p * z * z).sum(dim=1) - ez * ez
    return float(-lp.gather(1, y[:, None]).mean()), float((ez - zy).mean()), float(var.clamp_min(0).mean())


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, bool]:
    """The T minimizing NLL(softmax(logits / T)); returns (T, at_bound). Safeguarded Newton on 1/T."""
    z, y = logits.to(torch.float64).cpu(), labels.cpu()
    _check(z, y, 1)
    lo, hi = 1.0 / T_RANGE[1], 1.0 / T_RANGE[0]  # bracket on beta = 1/T
    if _nll_and_derivatives(z, y, hi)[1] <= 0:  # NLL still falling (or flat in float64) at the sharpest T
        return T_RANGE[0], True
    if _nll_and_derivatives(z, y, lo)[1] > 0:  # NLL still falling at the flattest T
        return T_RANGE[1], True
    beta = 1.0
    for _ in range(200):
        _, g, h = _nll_and_derivatives(z, y, beta)
        if g > 0:
            hi = beta
        else:
            lo = beta
        if abs(g) < 1e-13 or hi - lo < 1e-13 * hi:
            break
        step = beta - g / h if h > 0 else math.nan
        beta = step if lo < step < hi else 0.5 * (lo + hi)  # Newton inside the bracket, else bisection
    return 1.0 / beta, False


def calibration(logits: torch.Tensor, labels: torch.Tensor, *, bins: int = DEFAULT_BINS, adaptive: bool = False,
                classwise: bool = False, temperature: bool = False, seed: int = 0) -> CalibrationResult:
    """Calibration metrics and reliability bins of logits; optional temperature scaling on a seeded half."""
    z, y = logits.to(torch.float64).cpu(), labels.cpu()
    _check(z, y, bins)
    lp = torch.log_softmax(z, dim=1)
    m = metrics(lp, y, bins)
    _, rel = top_label_ece(lp, y, bins)
    fit = None
    if temperature:
        if len(y) < 2:
            raise KdprobeError(f"expected at least 2 samples for temperature scaling (a fit half and an "
                               f"evaluation half), got {len(y)}")
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(int(seed)))
        fit_i, ev_i = perm[: len(y) // 2], perm[len(y) // 2:]
        t, at_bound = fit_temperature(z[fit_i], y[fit_i])
        fit = TemperatureFit(
            t, at_bound, int(seed), int(len(fit_i)), int(len(ev_i)),
            _nll_and_derivatives(z[fit_i], y[fit_i], 1.0)[0], _nll_and_derivatives(z[fit_i], y[fit_i], 1.0 / t)[0],
            metrics(lp[ev_i], y[ev_i], bins), metrics(torch.log_softmax(z[ev_i] / t, dim=1), y[ev_i], bins))
    return CalibrationResult(m, bins, rel, adaptive_ece(lp, y, bins) if adaptive else None,
                             classwise_ece(lp, y, bins) if classwise else None, fit)
