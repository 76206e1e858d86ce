"""Results of the ensemble-perspective probes as flat tables: the one JSON schema of agreement, cka,
calibration and sharpness (documented in the README, "Ensemble-perspective probes").

A `ProbeTables` is the command name, its settings and named tables; each table is a list of
flat records (str/int/float/bool/None values only), so `pandas.DataFrame(doc["pairs"])` reads
any of them. Per checkpoint: `checkpoint` (path), `group`, `seed`, `sha256` and the metrics by
plain name (acc, nll, ece, brier, top_eigenvalue, trace, trace_se, ...); per pair: `a`, `b`,
`group_a`, `group_b`, `pair_type`, `pair_groups` and the metrics (disagreement,
normalized_disagreement, sym_kl, js, cka). Fractions are fractions (0-1), never percent.
Group statistics: unit = one checkpoint (kdprobe.probes.diversity_table.summarize_groups: t
interval, Welch vs the reference, Holm, Hedges' g); pair types and ensemble gains: delete-one-
checkpoint jackknife (kdprobe.probes.pairs, kdprobe.probes.ensemble).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Mapping, Sequence

from kdprobe.probes.diversity_table import ModelScore, summarize_groups
from kdprobe.probes.pairs import Member, PairRecord, summarize_pair_types


@dataclass(frozen=True)
class ProbeTables:
    """A probe command's settings and its named tables of flat records."""

    command: str
    settings: dict
    tables: dict = field(default_factory=dict)  # name -> list of flat dicts

    def table(self, name: str) -> list[dict]:
        """The records of one table ([] when the command did not produce it)."""
        return list(self.tables.get(name, []))


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def flat(record: Mapping) -> dict:
    """A record with nan/inf replaced by None (JSON null, NaN in pandas)."""
    return {str(k): _clean(v) for k, v in record.items()}


def checkpoint_record(member: Member, metrics: Mapping) -> dict:
    """One checkpoint's row: path, group, seed, sha256, then the metrics by plain name."""
    return flat({"checkpoint": member.path, "group": member.group, "seed": member.seed, "sha256": member.sha256,
                 **metrics})


def group_records(rows: Sequence[Mapping], metrics: Sequence[str], *, reference: str | None, confidence: float,
                  interval: str) -> list[dict]:
    """Per group and metric: mean over checkpoints, spread, t interval, Welch vs reference (Holm), Hedges' g."""
    out = []
    groups = {r["group"] for r in rows}
    ref = reference if reference in groups else None
    for m in metrics:
        scores = [ModelScore.from_values(r["checkpoint"], r["group"], r.get("seed"), [r[m]]) for r in rows
                  if r.get(m) is not None]
        if not scores:
            continue
        for g in summarize_groups(scores, reference=ref, confidence=confidence, interval=interval):
            out.append(flat({"group": g.group, "metric": m, "n": g.n_models, "mean": g.mean, "std": g.std,
                             "sem": g.sem, "half_width": g.half_width, "low": g.low, "high": g.high,
                             "reference": ref, "p_value": g.p_value, "p_holm": g.p_holm, "hedges_g": g.hedges_g}))
    return out


def pair_records(pairs: Sequence[PairRecord]) -> list[dict]:
    """One row per pair of checkpoints."""
    return [flat({"a": p.a, "b": p.b, "group_a": p.group_a, "group_b": p.group_b, "pair_type": p.pair_type,
                  "pair_groups": p.pair_groups, **p.metrics}) for p in pairs]


def pair_type_records(pairs: Sequence[PairRecord], metrics: Sequence[str], *, reference: str | None,
                      confidence: float, interval: str) -> list[dict]:
    """Per pair type and metric: mean over pairs, jackknife interval, test vs the reference pair type."""
    ref_key = f"within {reference}" if reference else None
    out = []
    for m in metrics:
        for s in summarize_pair_types(pairs, m, reference=ref_key, confidence=confidence, interval=interval):
            out.append(flat(asdict(s)))
    return out


def ensemble_tables(ensembles: Mapping, comparisons: Sequence) -> dict[str, list[dict]]:
    """Size curves, full-size gains with jackknife intervals, raw subsets and gain tests as tables."""
    curve, gains, subsets = [], [], []
    for g, e in ensembles.items():
        for p in e.curve:
            rec = {"group": g, "k": p.k, "n_subsets": p.n_subsets, "subsets_total": p.subsets_total,
                   "sampled": p.sampled}
            for m in p.ensemble:
                rec.update({m: p.ensemble[m], f"member_{m}": p.member_mean[m], f"gain_{m}": p.gain[m]})
            curve.append(flat(rec))
        for m, jk in e.gains.items():
            gains.append(flat({"group": g, "metric": m, "n": len(e.paths), "ensemble": getattr(e.full, m),
                               "gain": jk.estimate, "se": jk.se, "df": jk.df, "half_width": jk.half_width,
                               "low": jk.low, "high": jk.high}))
        for v in e.subsets:
            rec = {"group": g, "k": v.k, "members": ",".join(str(i) for i in v.members)}
            for m in v.ensemble:
                rec.update({m: v.ensemble[m], f"member_{m}": v.member_mean[m]})
            subsets.append(flat(rec))
    tests = [flat(asdict(c)) for c in comparisons]
    return {"ensembles": curve, "ensemble_gains": gains, "ensemble_subsets": subsets, "gain_tests": tests}
