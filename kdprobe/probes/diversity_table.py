"""Diversity results across checkpoints: raw per-batch scores, per-group statistics, the settings.

The unit of a group is one checkpoint: its score is the mean over the R probe batches,
and a group's mean, std, sem and interval are taken over its checkpoints (the paper:
5 independently trained models per method). A group with a single checkpoint has no
between-model spread; it falls back to its R batch values and says so
(`uses_batch_values`), since that spread only reflects the choice of probe batch.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from kdprobe import stats
from kdprobe.errors import KdprobeError


@dataclass(frozen=True)
class DiversitySettings:
    """How the scores were measured (saved next to every raw value)."""

    batch_size: int  # N inputs per probe batch
    runs: int  # R probe batches per checkpoint
    split: str  # "train" or "test"
    bn: str  # "eval", "batch-frozen" or "train"
    output: str  # "sum", "full" or "pred"
    variant: str  # "v1" or "v2"
    k: float  # eigenvalue regulariser (v1)
    seed: int  # seed of the probe-batch generator
    dataset: str = ""
    group_by: str = "method"
    reference: str | None = "scratch"
    confidence: float = 0.99
    interval: str = "t"

    def as_dict(self) -> dict:
        """Plain dict (JSON-ready)."""
        return asdict(self)


@dataclass(frozen=True)
class ModelScore:
    """Raw scores of one checkpoint, one per probe batch."""

    path: str
    group: str
    seed: int | None
    values: tuple[float, ...]
    mean: float = field(default=math.nan)

    @classmethod
    def from_values(cls, path: str, group: str, seed: int | None, values) -> "ModelScore":
        """Build from raw per-batch values; the mean is their plain average."""
        vals = tuple(float(v) for v in values)
        if not vals:
            raise KdprobeError(f"expected at least one score for {path}, got none")
        return cls(str(path), str(group), seed, vals, float(np.mean(vals)))


@dataclass(frozen=True)
class GroupStats:
    """One group (e.g. a training method): spread over its checkpoints, and the test against the reference."""

    group: str
    n_models: int
    mean: float
    std: float
    sem: float
    half_width: float  # confidence half-width (t or normal quantile times sem)
    low: float
    high: float
    p_value: float  # Welch two-sided vs the reference group (nan for the reference itself)
    p_holm: float  # Holm-adjusted over all non-reference groups
    hedges_g: float  # (group - reference) / pooled sd, small-sample corrected
    uses_batch_values: bool  # True: one checkpoint, statistics over its R batch values


@dataclass(frozen=True)
class DiversityTable:
    """Everything a writer needs: settings, raw scores per checkpoint, group statistics."""

    settings: DiversitySettings
    scores: tuple[ModelScore, ...]
    groups: tuple[GroupStats, ...]


def _group_units(scores: list[ModelScore]) -> tuple[list[float], bool]:
    if len(scores) == 1:
        return list(scores[0].values), True
    return [s.mean for s in scores], False


ACCURACY_BOUNDS = (0.0, 1.0)  # a test accuracy: a fraction (docs/units.md)


def clip_end(v, bounds: tuple[float, float]) -> tuple[float, bool]:
    """(shown value, clipped?) of an interval end: never outside what the metric can take. Displays only:
    files keep the raw end, since mean ± quantile x sem going past a bound says the interval fits poorly."""
    if v is None or not isinstance(v, float) or not math.isfinite(v):
        return v, False
    lo, hi = bounds
    c = min(max(v, lo), hi)
    return c, c != v


def score_bounds(variant: str, n: int) -> tuple[float, float]:
    """What a diversity score can take. v1: the eigenvalues v of an N x N correlation matrix are >= 0
    and sum to N, and log(u) + 1/u >= 1 for u > 0, so -sum(log(v+k) + 1/(v+k)) <= -N. v2: unbounded here."""
    return (-math.inf, -float(n)) if variant == "v1" else (-math.inf, math.inf)


def summarize_groups(model_scores, reference: str | None = "scratch", confidence: float = 0.99,
                     interval: str = "t") -> list[GroupStats]:
    """Per-group mean, spread and interval over checkpoints; Welch + Holm and Hedges' g vs `reference`."""
    model_scores = list(model_scores)
    if not model_scores:
        raise KdprobeError("expected scores of at least one checkpoint, got none")
    by_group: dict[str, list[ModelScore]] = {}
    for s in model_scores:
        by_group.setdefault(s.group, []).append(s)
    if reference is not None and reference not in by_group:
        raise KdprobeError(
            f"expected the reference group {reference!r} among the groups {sorted(by_group)}; "
            "pass one of them as the reference (or none)"
        )
    order = list(by_group)
    if reference is not None:  # the reference first, the rest in order of appearance
        order.remove(reference)
        order.insert(0, reference)
    units = {g: _group_units(by_group[g]) for g in order}
    ref_units = units[reference][0] if reference is not None else None

    tests: dict[str, tuple[float, float]] = {}
    for g in order:
        if reference is None or g == reference:
            tests[g] = (math.nan, math.nan)
        else:
            tests[g] = (stats.welch_t(units[g][0], ref_units)[1], stats.hedges_g(units[g][0], ref_units))
    others = [g for g in order if g != reference]
    adjusted = dict(zip(others, stats.holm([tests[g][0] for g in others])))

    out = []
    for g in order:
        vals, batch_flag = units[g]
        s = stats.summarize(vals, confidence=confidence, interval=interval)
        out.append(GroupStats(g, len(by_group[g]), s.mean, s.std, s.sem, s.half_width, s.low, s.high,
                              tests[g][0], adjusted.get(g, math.nan), tests[g][1], batch_flag))
    return out
