"""Ensembles of checkpoints and the ensemble gain (Lakshminarayanan et al. 2017; Park et al.'s question:
does a group of KD students gain less from ensembling than a group of scratch models?).

- The ensemble's prediction is the average of the members' softmax probabilities (not of their
  logits), computed as logsumexp of the members' log-probabilities minus log k (float64).
- Ensemble metrics: accuracy (fraction), NLL, top-label ECE (kdprobe.probes.calibration).
- Gain = metric of the ensemble - mean of its members' metrics. Accuracy: a positive gain is an
  improvement; NLL and ECE: a negative gain is.
- Size curve: for k = 1..n, the mean over subsets of size k of the ensemble metric, the member
  mean and the gain. Every subset when C(n, k) <= max_subsets, else `max_subsets` distinct subsets
  drawn with a generator seeded by (seed, k); the raw per-subset values are kept.
- Spread and tests: a group's full-size gain is one number built from all its checkpoints, so
  its standard error is the delete-one-checkpoint jackknife (kdprobe.stats.jackknife; needs 3
  or more members, since without one member an ensemble of 2 - 1 = 1 has gain 0 by definition).
  A group is compared with the reference group by jackknifing the difference of the two gains
  (two independent samples): a Welch-type t test, two-sided, Holm-adjusted over the groups.
The probe reads cached logits (kdprobe.probes.predictions): it never runs a model.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch

from kdprobe import stats
from kdprobe.errors import KdprobeError
from kdprobe.probes.calibration import DEFAULT_BINS, Metrics, metrics

METRICS = ("acc", "nll", "ece")
DEFAULT_MAX_SUBSETS = 100


@dataclass(frozen=True)
class SubsetValue:
    """One subset of a group's members: the ensemble's metrics and the mean of its members' metrics."""

    k: int
    members: tuple[int, ...]  # indices into the group's paths
    ensemble: dict  # metric -> value
    member_mean: dict  # metric -> value


@dataclass(frozen=True)
class SizePoint:
    """Ensemble size k: means over the subsets used."""

    k: int
    n_subsets: int
    subsets_total: int  # C(n, k)
    sampled: bool  # True when a seeded sample of subsets stood in for all of them
    ensemble: dict  # metric -> mean over subsets of the ensemble's value
    member_mean: dict  # metric -> mean over subsets of the members' mean
    gain: dict  # metric -> ensemble - member_mean


@dataclass(frozen=True)
class GroupEnsemble:
    """A group's ensemble of all members, its gain with jackknife spread, the size curve and raw subsets."""

    group: str
    paths: tuple[str, ...]
    members: tuple[Metrics, ...]  # each single member
    full: Metrics  # the ensemble of all members
    gains: dict  # metric -> kdprobe.stats.Jackknife of the full-size gain
    loo_gains: dict  # metric -> the full-size gain without member i, for each i (the jackknife's inputs)
    curve: tuple[SizePoint, ...]
    subsets: tuple[SubsetValue, ...]


@dataclass(frozen=True)
class GainComparison:
    """Gain of a group minus the reference group's gain, for one metric, with a jackknife t test."""

    group: str
    reference: str
    metric: str
    diff: float
    se: float
    df: float
    half_width: float
    p_value: float
    p_holm: float


def ensemble_log_probs(members: Sequence[torch.Tensor]) -> torch.Tensor:
    """log of the mean of the members' softmax probabilities, from their (N, C) log-probabilities."""
    if not members:
        raise KdprobeError("expected at least one member to ensemble, got none")
    shapes = {tuple(m.shape) for m in members}
    if len(shapes) != 1:
        raise KdprobeError(f"expected members with predictions of one shape, got {sorted(shapes)}")
    stacked = torch.stack([m.to(torch.float64).cpu() for m in members])
    return torch.logsumexp(stacked, dim=0) - math.log(len(members))


def _as_dict(m: Metrics) -> dict:
    return {k: getattr(m, k) for k in METRICS}


def _subsets(n: int, k: int, max_subsets: int, seed: int) -> tuple[list[tuple[int, ...]], int, bool]:
    total = math.comb(n, k)
    if total <= max_subsets:
        return list(itertools.combinations(range(n), k)), total, False
    rng = np.random.default_rng([int(seed), k])  # one stream per size: adding sizes does not move others
    seen: dict[tuple[int, ...], None] = {}
    while len(seen) < max_subsets:
        seen.setdefault(tuple(sorted(int(i) for i in rng.choice(n, size=k, replace=False))), None)
    return list(seen), total, True


def _gain(log_probs: Sequence[torch.Tensor], singles: Sequence[Metrics], labels, bins) -> dict:
    ens = _as_dict(metrics(ensemble_log_probs(log_probs), labels, bins))
    return {m: ens[m] - float(np.mean([getattr(s, m) for s in singles])) for m in METRICS}


def group_ensemble(group: str, paths: Sequence[str], log_probs: Sequence[torch.Tensor], labels: torch.Tensor, *,
                   max_subsets: int = DEFAULT_MAX_SUBSETS, seed: int = 0, bins: int = DEFAULT_BINS,
                   confidence: float = 0.99, interval: str = "t") -> GroupEnsemble:
    """Ensemble of all members, the k = 1..n size curve over subsets, and the jackknifed full-size gain."""
    if len(paths) != len(log_probs) or not paths:
        raise KdprobeError(f"expected one prediction per member and at least one member, got {len(paths)} paths "
                           f"and {len(log_probs)} predictions")
    if max_subsets < 1:
        raise KdprobeError(f"expected max_subsets >= 1, got {max_subsets}")
    n = len(paths)
    singles = [metrics(lp, labels, bins) for lp in log_probs]
    full = metrics(ensemble_log_probs(log_probs), labels, bins)
    raw, curve = [], []
    for k in range(1, n + 1):
        chosen, total, sampled = _subsets(n, k, max_subsets, seed)
        vals = []
        for idx in chosen:
            ens = full if k == n else (singles[idx[0]] if k == 1 else
                                       metrics(ensemble_log_probs([log_probs[i] for i in idx]), labels, bins))
            mm = {m: float(np.mean([getattr(singles[i], m) for i in idx])) for m in METRICS}
            vals.append(SubsetValue(k, tuple(idx), _as_dict(ens), mm))
        e = {m: float(np.mean([v.ensemble[m] for v in vals])) for m in METRICS}
        mm = {m: float(np.mean([v.member_mean[m] for v in vals])) for m in METRICS}
        curve.append(SizePoint(k, len(vals), total, sampled, e, mm, {m: e[m] - mm[m] for m in METRICS}))
        raw += vals
    gain = {m: full_v - float(np.mean([getattr(s, m) for s in singles])) for m, full_v in _as_dict(full).items()}
    loo = [_gain([lp for j, lp in enumerate(log_probs) if j != i], [s for j, s in enumerate(singles) if j != i],
                 labels, bins) if n >= 3 else {m: math.nan for m in METRICS} for i in range(n)]
    loo_gains = {m: tuple(g[m] for g in loo) for m in METRICS}
    gains = {m: stats.jackknife(gain[m], {group: loo_gains[m]}, confidence, interval) for m in METRICS}
    return GroupEnsemble(group, tuple(paths), tuple(singles), full, gains, loo_gains, tuple(curve), tuple(raw))


def compare_gains(groups: Mapping[str, GroupEnsemble], reference: str, *, confidence: float = 0.99,
                  interval: str = "t") -> list[GainComparison]:
    """Each group's gain minus the reference's, per metric: jackknife of the difference, Holm over groups."""
    if reference not in groups:
        raise KdprobeError(f"expected the reference group {reference!r} among {sorted(groups)}; pass one of them")
    others = [g for g in groups if g != reference]
    out = []
    for m in METRICS:
        rows = []
        for g in others:
            d = groups[g].gains[m].estimate - groups[reference].gains[m].estimate
            loo = {g: [v - groups[reference].gains[m].estimate for v in groups[g].loo_gains[m]],
                   reference: [groups[g].gains[m].estimate - v for v in groups[reference].loo_gains[m]]}
            rows.append((g, stats.jackknife(d, loo, confidence, interval)))
        adjusted = stats.holm([jk.p_value for _, jk in rows])
        out += [GainComparison(g, reference, m, jk.estimate, jk.se, jk.df, jk.half_width, jk.p_value, p)
                for (g, jk), p in zip(rows, adjusted)]
    return out
