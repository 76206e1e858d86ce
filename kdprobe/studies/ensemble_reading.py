"""Does a study's data support the ensemble reading of knowledge distillation? One verdict per probe and KD method.

Park, Yoo and Kwak read KD as an ensemble (bagging) in disguise. Each ensemble-perspective
probe turns that reading into a prediction about KD students versus the reference models
(scratch), tested with the probe's own statistics (unit = one checkpoint):

  agreement    KD students of different seeds disagree LESS with each other than reference models
               do (an averaged predictor varies less): 'within KD' vs 'within reference' top-1
               disagreement, delete-one-checkpoint jackknife t (pairs share checkpoints).
  ensembles    ensembling KD students gains LESS accuracy than ensembling reference models (KD
               already did part of the averaging): difference of the full-size ensemble gains,
               jackknife (Welch-type) t.
  calibration  KD students are better calibrated, lower top-label ECE, as ensembles are
               (Lakshminarayanan et al. 2017): Welch t over checkpoints.
  cka          KD students' penultimate representations are MORE alike across seeds: 'within KD'
               vs 'within reference' linear CKA, jackknife t.
  sharpness    KD students sit in flatter minima, a SMALLER top Hessian eigenvalue of the
               training loss (the paper's Table 7 reading): Welch t over checkpoints.

The verdict compares the p-value, Holm-adjusted over the KD methods of that probe (the family
the verdicts are drawn from), with alpha: below alpha and in the predicted direction
"supports"; below alpha in the opposite direction "does not support"; otherwise (or when
there is no test: one seed, or fewer than 3 for an ensemble gain) "inconclusive". Nothing
is hard-coded: every verdict is computed from the numbers in the probe's tables.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

from kdprobe import stats

SUPPORTS, DOES_NOT, INCONCLUSIVE = "supports", "does not support", "inconclusive"
_PHRASE = {SUPPORTS: "supports", DOES_NOT: "does not support", INCONCLUSIVE: "is inconclusive on"}


@dataclass(frozen=True)
class Prediction:
    """What the ensemble reading predicts for one probe: a metric of KD students vs the reference."""

    probe: str
    kind: str  # pair_type | group | gain: where the test lives in the probe's tables
    metric: str
    quantity: str  # what the compared values are, in words
    direction: int  # -1: KD lower than the reference; +1: KD higher
    claim: str  # with {kd} and {ref} placeholders
    test: str


PREDICTIONS = {
    "agreement": Prediction("agreement", "pair_type", "disagreement", "mean top-1 disagreement between seeds", -1,
                            "{kd} students disagree less with each other than {ref} models do",
                            "within-{kd} vs within-{ref} mean disagreement, delete-one-checkpoint jackknife t"),
    "ensembles": Prediction("ensembles", "gain", "acc", "ensemble gain in accuracy (fraction)", -1,
                            "an ensemble of {kd} students gains less accuracy than an ensemble of {ref} models",
                            "difference of full-size ensemble accuracy gains, jackknife (Welch-type) t"),
    "calibration": Prediction("calibration", "group", "ece", "mean ECE", -1,
                              "{kd} students are better calibrated (lower ECE) than {ref} models",
                              "Welch t on per-checkpoint ECE"),
    "cka": Prediction("cka", "pair_type", "cka", "mean linear CKA between seeds", +1,
                      "{kd} students' representations are more alike across seeds (higher CKA) than {ref} models'",
                      "within-{kd} vs within-{ref} mean linear CKA, delete-one-checkpoint jackknife t"),
    "sharpness": Prediction("sharpness", "group", "top_eigenvalue", "mean top Hessian eigenvalue", -1,
                            "{kd} students sit in flatter minima (smaller top Hessian eigenvalue) than {ref} models",
                            "Welch t on per-checkpoint top eigenvalues"),
}


@dataclass(frozen=True)
class Verdict:
    """One probe's prediction for one KD method, its test and the verdict at alpha."""

    probe: str
    method: str
    reference: str
    metric: str
    quantity: str
    claim: str
    test: str
    value: float  # the KD method's value (pair-type mean, group mean or ensemble gain)
    reference_value: float
    diff: float  # value - reference_value
    p_value: float  # two-sided, before adjustment
    p_holm: float  # Holm-adjusted over the probe's KD methods
    alpha: float
    verdict: str  # supports | does not support | inconclusive
    reason: str


def decide(diff: float, p_holm: float, alpha: float, direction: int) -> tuple[str, str]:
    """(verdict, reason) from the difference KD - reference, its adjusted p-value and the predicted sign."""
    if not (math.isfinite(diff) and math.isfinite(p_holm)):
        return INCONCLUSIVE, "no test: too few checkpoints for a spread (one seed, or fewer than 3 for a gain)"
    if p_holm >= alpha:
        return INCONCLUSIVE, f"p (Holm) = {p_holm:.3g} >= alpha = {alpha:g}"
    if diff * direction > 0:
        return SUPPORTS, f"p (Holm) = {p_holm:.3g} < alpha = {alpha:g}, in the predicted direction"
    return DOES_NOT, f"p (Holm) = {p_holm:.3g} < alpha = {alpha:g}, in the opposite direction"


def _num(v) -> float:
    return math.nan if v is None else float(v)


def _row(rows: Sequence[Mapping], **match) -> Mapping | None:
    return next((r for r in rows if all(r.get(k) == v for k, v in match.items())), None)


def _test(pred: Prediction, tables: Mapping[str, list], kd: str, ref: str) -> tuple[float, float, float, float]:
    """(value, reference value, diff, raw p) of one KD method, read from the probe's tables (nan when absent)."""
    nan = (math.nan,) * 4
    if pred.kind == "pair_type":
        rows = [r for r in tables.get("pair_types", []) if r.get("metric") == pred.metric]
        a, b = _row(rows, key=f"within {kd}"), _row(rows, key=f"within {ref}")
        if a is None or b is None or a.get("reference") != b["key"]:
            return nan if a is None else (_num(a["mean"]), _num(b and b["mean"]), math.nan, math.nan)
        return _num(a["mean"]), _num(b["mean"]), _num(a["diff"]), _num(a["p_value"])
    if pred.kind == "group":
        rows = [r for r in tables.get("groups", []) if r.get("metric") == pred.metric]
        a, b = _row(rows, group=kd), _row(rows, group=ref)
        if a is None or b is None:
            return nan
        va, vb = _num(a["mean"]), _num(b["mean"])
        p = _num(a["p_value"]) if a.get("reference") == ref else math.nan
        return va, vb, va - vb, p
    gains = [r for r in tables.get("ensemble_gains", []) if r.get("metric") == pred.metric]
    a, b = _row(gains, group=kd), _row(gains, group=ref)
    t = _row(tables.get("gain_tests", []), group=kd, reference=ref, metric=pred.metric)
    va, vb = _num(a and a["gain"]), _num(b and b["gain"])
    return (va, vb, math.nan, math.nan) if t is None else (va, vb, _num(t["diff"]), _num(t["p_value"]))


def verdicts(probe: str, tables: Mapping[str, list], kd_methods: Sequence[str], reference: str | None,
             alpha: float) -> list[Verdict]:
    """The ensemble-reading verdicts of one probe's tables, one per KD method ([] without a reference)."""
    pred = PREDICTIONS[probe]
    if reference is None or not kd_methods:
        return []
    found = [(kd, _test(pred, tables, kd, reference)) for kd in kd_methods]
    raw = [p if math.isfinite(p) else math.nan for _, (_, _, _, p) in found]
    adjusted = stats.holm(raw)
    out = []
    for (kd, (va, vb, diff, p)), ph in zip(found, adjusted):
        v, why = decide(diff, ph, alpha, pred.direction)
        out.append(Verdict(probe, kd, reference, pred.metric, pred.quantity, pred.claim.format(kd=kd, ref=reference),
                           pred.test.format(kd=kd, ref=reference), va, vb, diff, p, ph, alpha, v, why))
    return out


@dataclass(frozen=True)
class MethodAnswer:
    """Per KD method: does it behave like an ensemble in these probes? The probes' verdicts, tallied."""

    method: str
    answer: str  # yes | in part | no | not shown
    supports: tuple[str, ...]  # probes whose verdict supports the ensemble reading for this method
    does_not: tuple[str, ...]  # probes whose verdict goes against it
    inconclusive: tuple[str, ...]
    sentence: str


YES, IN_PART, NO, NOT_SHOWN = "yes", "in part", "no", "not shown"


def method_answers(vs: Sequence[Verdict]) -> list[MethodAnswer]:
    """One answer per KD method (in the verdicts' order) from its verdicts over the probes, nothing recomputed:
    yes = every probe supports the reading; in part = some do (others inconclusive or against); no = none does
    and at least one goes against it; not shown = every probe inconclusive."""
    out = []
    for method in dict.fromkeys(v.method for v in vs):
        mine = [v for v in vs if v.method == method]
        by = {kind: tuple(v.probe for v in mine if v.verdict == kind) for kind in (SUPPORTS, DOES_NOT, INCONCLUSIVE)}
        sup, neg, inc = by[SUPPORTS], by[DOES_NOT], by[INCONCLUSIVE]
        answer = (YES if len(sup) == len(mine) else IN_PART if sup else NO if neg else NOT_SHOWN)
        parts = [f"{label} in {', '.join(probes)}" for label, probes in (("supported", sup), ("against", neg),
                                                                          ("inconclusive", inc)) if probes]
        out.append(MethodAnswer(method, answer, sup, neg, inc,
                                f"{method}: {answer} ({len(sup)} of {len(mine)} probes support the ensemble reading; "
                                + "; ".join(parts) + ")"))
    return out


def headline(vs: Sequence[Verdict]) -> str:
    """One plain sentence for a probe: the verdict per KD method with its adjusted p-value."""
    if not vs:
        return "no verdict: no reference group or no KD method among the probed methods"
    parts = [f"{v.method} {_PHRASE[v.verdict]} the ensemble reading (p Holm = "
             f"{format(v.p_holm, '.3g') if math.isfinite(v.p_holm) else 'n/a'})" for v in vs]
    return "; ".join(parts) + f" at alpha = {vs[0].alpha:g}."
