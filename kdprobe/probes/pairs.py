"""Pairs of checkpoints: what kind of pair each is, and honest statistics per pair type.

Pair types (`pair_type`, with `pair_groups` naming the groups involved):
- "student-teacher": one checkpoint's metadata records the other as its teacher (the sha256
  in meta["teacher"]["sha256"] equals the other file's sha256); `a` is the student and
  pair_groups is "student group->teacher group". Checked first, so a KD student and its own
  scratch teacher are never counted as an ordinary between-method pair.
- "within": two checkpoints of one group (e.g. two seeds of one method); pair_groups = the group.
- "between": two groups; pair_groups = "g1|g2" (sorted).

Statistics per pair type. The pairs of a set share checkpoints (with 5 seeds, the 10 within-group
pairs are built from 5 models), so pairs are not independent units and a t interval over pairs
would be far too narrow. The unit is one checkpoint: the estimate is the mean over the type's
pairs, and its standard error is the delete-one-checkpoint jackknife (each deletion removes every
pair of that checkpoint), grouped by the checkpoints' groups, as kdprobe.stats.jackknife does for
U-statistics. Comparisons against a reference pair type (default: "within <reference group>")
jackknife the difference itself over the union of checkpoints, so shared checkpoints are
accounted for; p-values are two-sided and Holm-adjusted over the compared types.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from kdprobe import stats
from kdprobe.errors import KdprobeError

PAIR_TYPES = ("within", "between", "student-teacher")


@dataclass(frozen=True)
class Member:
    """A checkpoint as a member of a set: where it is, its group, and whose student it is."""

    path: str
    group: str
    sha256: str = ""
    teacher_sha256: str | None = None
    seed: int | None = None


@dataclass(frozen=True)
class PairRecord:
    """One pair of checkpoints and its metrics (by plain name: disagreement, js, cka, ...)."""

    a: str
    b: str
    group_a: str
    group_b: str
    pair_type: str
    pair_groups: str
    metrics: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        """The pair type with its groups, e.g. 'within scratch' or 'student-teacher kd-label->scratch'."""
        return f"{self.pair_type} {self.pair_groups}"


@dataclass(frozen=True)
class PairTypeStats:
    """One pair type and one metric: mean over pairs, jackknife spread, test against the reference type."""

    key: str
    pair_type: str
    pair_groups: str
    metric: str
    n_pairs: int
    n_checkpoints: int
    mean: float
    se: float  # delete-one-checkpoint jackknife
    df: float
    half_width: float
    low: float
    high: float
    reference: str | None  # the reference pair key (nan tests for the reference itself)
    diff: float  # mean - reference mean
    p_value: float  # two-sided jackknife t test of diff = 0
    p_holm: float


def classify(a: Member, b: Member) -> tuple[Member, Member, str, str]:
    """(first, second, pair_type, pair_groups); for a student-teacher pair the student comes first."""
    if a.teacher_sha256 and b.sha256 and a.teacher_sha256 == b.sha256:
        return a, b, "student-teacher", f"{a.group}->{b.group}"
    if b.teacher_sha256 and a.sha256 and b.teacher_sha256 == a.sha256:
        return b, a, "student-teacher", f"{b.group}->{a.group}"
    if a.group == b.group:
        return a, b, "within", a.group
    return a, b, "between", "|".join(sorted((a.group, b.group)))


def pairs_of(members: Sequence[Member]) -> list[tuple[Member, Member, str, str]]:
    """Every unordered pair of distinct members (i < j in the given order), classified."""
    return [classify(members[i], members[j]) for i in range(len(members)) for j in range(i + 1, len(members))]


def _mean_without(pairs: list[PairRecord], metric: str, drop: str | None) -> float:
    vals = [p.metrics[metric] for p in pairs if drop is None or drop not in (p.a, p.b)]
    return float(np.mean(vals)) if vals else math.nan


def _loo(type_pairs: dict[str, list[PairRecord]], keys: Sequence[str], signs: Sequence[float], metric: str,
         group_of: Mapping[str, str]) -> tuple[float, dict[str, list[float]], int]:
    """Signed sum of the keys' pair means, and its value without each checkpoint, grouped by the checkpoint's group."""
    units = sorted({u for k in keys for p in type_pairs[k] for u in (p.a, p.b)})
    full = sum(s * _mean_without(type_pairs[k], metric, None) for k, s in zip(keys, signs))
    loo: dict[str, list[float]] = {}
    for u in units:
        loo.setdefault(group_of[u], []).append(sum(s * _mean_without(type_pairs[k], metric, u)
                                                   for k, s in zip(keys, signs)))
    return full, loo, len(units)


def summarize_pair_types(pairs: Sequence[PairRecord], metric: str, *, reference: str | None = None,
                         confidence: float = 0.99, interval: str = "t") -> list[PairTypeStats]:
    """Per pair type: mean of `metric` over its pairs, jackknife interval, Holm-adjusted test vs `reference` key."""
    pairs = [p for p in pairs if p.metrics.get(metric) is not None and math.isfinite(p.metrics[metric])]
    if not pairs:
        return []
    group_of = {}
    for p in pairs:
        group_of[p.a], group_of[p.b] = p.group_a, p.group_b
    type_pairs: dict[str, list[PairRecord]] = {}
    for p in pairs:
        type_pairs.setdefault(p.key, []).append(p)
    if reference is not None and reference not in type_pairs:
        reference = None  # e.g. one reference checkpoint: no within-reference pairs to compare with
    order = sorted(type_pairs, key=lambda k: (k != reference, PAIR_TYPES.index(k.split(" ")[0]), k))
    rows, tests = [], {}
    for k in order:
        est, loo, n_units = _loo(type_pairs, [k], [1.0], metric, group_of)
        jk = stats.jackknife(est, loo, confidence, interval)
        if reference is not None and k != reference:
            d_est, d_loo, _ = _loo(type_pairs, [k, reference], [1.0, -1.0], metric, group_of)
            d = stats.jackknife(d_est, d_loo, confidence, interval)
            tests[k] = (d.estimate, d.p_value)
        else:
            tests[k] = (math.nan, math.nan)
        rows.append((k, type_pairs[k], n_units, jk))
    others = [k for k in order if k != reference]
    adjusted = dict(zip(others, stats.holm([tests[k][1] for k in others])))
    out = []
    for k, tp, n_units, jk in rows:
        out.append(PairTypeStats(k, tp[0].pair_type, tp[0].pair_groups, metric, len(tp), n_units, jk.estimate, jk.se,
                                 jk.df, jk.half_width, jk.low, jk.high, reference, tests[k][0], tests[k][1],
                                 adjusted.get(k, math.nan)))
    return out


def members_from_checkpoints(loaded, group_by: str = "method") -> list[Member]:
    """Members from kdprobe.checkpoints.format.LoadedCheckpoint objects; the group is meta[group_by]."""
    out = []
    for ck in loaded:
        if ck.meta.get(group_by) is None:
            raise KdprobeError(f"expected metadata key {group_by!r} in every checkpoint, missing in {ck.path}; "
                               "pass another --group-by (e.g. method or seed)")
        teacher = ck.meta.get("teacher") or {}
        seed = ck.meta.get("seed")
        out.append(Member(str(ck.path), str(ck.meta[group_by]), ck.sha256,
                          teacher.get("sha256") if isinstance(teacher, dict) else None,
                          int(seed) if isinstance(seed, (int, float)) else None))
    return out
