"""From a set of checkpoints' cached predictions, features or Hessian results to the probes' flat tables.

The one place where `kdprobe agreement|calibration|cka|sharpness` and `kdprobe study` turn probe
results into kdprobe.probes.tables records, so a study's summary.json holds exactly what the
single-purpose commands write for the same checkpoints. Members are kdprobe.probes.pairs.Member; every
mapping is keyed by the member's path. Nothing here runs a model (the callers fill the caches).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from kdprobe.probes.pairs import Member
from kdprobe.probes.tables import checkpoint_record, flat, group_records, pair_records, pair_type_records

# what every agreement/ensemble table means (written into the settings of both)
AGREEMENT_NOTES = {
    "bn": "eval", "ensemble": "mean of softmax probabilities", "sym_kl": "KL(p||q) + KL(q||p), natural log",
    "js": "Jensen-Shannon divergence, natural log (<= log 2)",
    "normalized_disagreement": "disagreement / ((err_a + err_b) / 2)",
    "pair_unit": "one checkpoint: mean over pairs, delete-one-checkpoint jackknife",
    "gain_unit": "one checkpoint: delete-one-checkpoint jackknife of the full-size gain"}
CALIBRATION_NOTES = {"ece": "top-label, equal-width bins (l, u]",
                     "brier": "sum over classes of (p_k - 1[y=k])^2, in [0, 2]", "bn": "eval"}
PAIR_UNIT = "one checkpoint: mean over pairs, delete-one-checkpoint jackknife"
CALIBRATION_MAIN = ["ece", "nll", "brier", "acc"]


def agreement_part(members: Sequence[Member], log_probs: Mapping[str, torch.Tensor], labels: torch.Tensor, *,
                   bins: int, reference: str | None, confidence: float, interval: str) -> dict[str, list]:
    """Per-checkpoint acc/nll/ece/brier with group statistics, every pair's agreement and the pair-type summary."""
    from kdprobe.probes.agreement import METRICS, pairwise_agreement
    from kdprobe.probes.calibration import metrics

    rows = []
    for m in members:
        s = metrics(log_probs[m.path], labels, bins)
        rows.append(checkpoint_record(m, {"acc": s.acc, "nll": s.nll, "ece": s.ece, "brier": s.brier}))
    pairs = pairwise_agreement(members, log_probs, labels)
    return {"checkpoints": rows,
            "groups": group_records(rows, ["acc", "nll", "ece"], reference=reference, confidence=confidence,
                                    interval=interval),
            "pairs": pair_records(pairs),
            "pair_types": pair_type_records(pairs, list(METRICS), reference=reference, confidence=confidence,
                                            interval=interval)}


def group_ensembles(members: Sequence[Member], log_probs: Mapping[str, torch.Tensor], labels: torch.Tensor, *,
                    reference: str | None, max_subsets: int, seed: int, bins: int, confidence: float,
                    interval: str) -> tuple[dict, list]:
    """Each group's ensemble (the reference group first, then in order of appearance) and the gain tests."""
    from kdprobe.probes.ensemble import compare_gains, group_ensemble

    by_group: dict[str, list] = {reference: []} if reference else {}
    for m in members:
        by_group.setdefault(m.group, []).append(m)
    by_group = {g: ms for g, ms in by_group.items() if ms}
    ens = {g: group_ensemble(g, [m.path for m in ms], [log_probs[m.path] for m in ms], labels,
                             max_subsets=max_subsets, seed=seed, bins=bins, confidence=confidence, interval=interval)
           for g, ms in by_group.items()}
    tests = compare_gains(ens, reference, confidence=confidence, interval=interval) \
        if reference in ens and len(ens) > 1 else []
    return ens, tests


def calibration_part(members: Sequence[Member], logits: Mapping[str, torch.Tensor], labels: torch.Tensor, *,
                     bins: int, adaptive: bool, classwise: bool, temperature: bool, seed: int,
                     reference: str | None, confidence: float, interval: str) -> tuple[dict[str, list], list[str]]:
    """Per-checkpoint calibration, reliability bins and group statistics; returns (tables, extra metric names)."""
    from kdprobe.probes.calibration import calibration as calibrate

    rows, rel = [], []
    for m in members:
        r = calibrate(logits[m.path], labels, bins=bins, adaptive=adaptive, classwise=classwise,
                      temperature=temperature, seed=seed)
        rec = {"acc": r.metrics.acc, "nll": r.metrics.nll, "ece": r.metrics.ece, "brier": r.metrics.brier}
        if adaptive:
            rec["adaptive_ece"] = r.adaptive_ece
        if classwise:
            rec["classwise_ece"] = r.classwise_ece
        if r.temperature is not None:
            t = r.temperature
            rec.update(temperature=t.temperature, temperature_at_bound=t.at_bound, fit_n=t.fit_n, eval_n=t.eval_n,
                       **{f"{k}_before": getattr(t.before, k) for k in ("acc", "nll", "ece", "brier")},
                       **{f"{k}_after": getattr(t.after, k) for k in ("acc", "nll", "ece", "brier")})
        rows.append(checkpoint_record(m, rec))
        rel += [flat({"checkpoint": m.path, "group": m.group, "bin": i, "lower": b.lower, "upper": b.upper,
                      "count": b.count, "accuracy": b.accuracy, "confidence": b.confidence})
                for i, b in enumerate(r.reliability)]
    extra = [k for k in ("adaptive_ece", "classwise_ece") if rows and k in rows[0]]
    if temperature:
        extra += ["temperature", "nll_before", "nll_after", "ece_before", "ece_after"]
    groups = group_records(rows, CALIBRATION_MAIN + extra, reference=reference, confidence=confidence,
                           interval=interval)
    return {"checkpoints": rows, "reliability": rel, "groups": groups}, extra


def temperature_note(temperature: bool) -> str | None:
    """How the temperature was fitted and evaluated (None without temperature scaling)."""
    return "fit on a seeded random half, before/after on the other half" if temperature else None


def cka_group_part(members: Sequence[Member], cache, *, reference: str | None, confidence: float,
                   interval: str) -> dict[str, list]:
    """CKA of every pair from a filled kdprobe.probes.cka.CkaCache, with the per-pair-type summary."""
    from kdprobe.probes.cka import pairwise_cka

    pairs = pairwise_cka(members, cache)
    return {"checkpoints": [checkpoint_record(m, {"layer": cache.layers[m.path]}) for m in members],
            "pairs": pair_records(pairs),
            "pair_types": pair_type_records(pairs, ["cka"], reference=reference, confidence=confidence,
                                            interval=interval)}


def sharpness_part(members: Sequence[Member], results: Sequence, *, reference: str | None, confidence: float,
                   interval: str) -> dict[str, list]:
    """Per-checkpoint sharpness (kdprobe.probes.sharpness.SharpnessResult, one per member), raw values, groups.

    Tables: checkpoints, eigenvalues (every top-k value with its iterations and residual), trace_samples
    (every random vector's estimate), density and density_curve (with --density), groups (top_eigenvalue
    and trace per group). The checkpoints table holds, per checkpoint:
    loss; top_eigenvalue, top_residual (||Hv - lambda v||), top_iterations, top_converged;
    trace (mean of the vectors' estimates) and trace_se (their std(ddof=1) / sqrt(n));
    n_params (trainable parameters), n_samples, products (Hessian-vector products in all);
    method (lanczos | power) and eig_products (the products the eigenvalues took);
    trace_method (hutch++ | hutchinson), trace_exact (tr(Q^T H Q) of the deflated sketch, exact; 0 for
    hutchinson), trace_sketch (rows of Q; 0 for hutchinson), trace_vectors (random vectors behind trace);
    trace_low, trace_high (the bootstrap-t|t interval of trace at trace_confidence, kdprobe.stats.
    bootstrap_t_interval; null with fewer than 2 vectors), trace_stable (false: too few vectors for their
    skewness, the interval may be too narrow) and trace_note (why not stable, "" when stable);
    density_sigma2 (the variance of the density's Gaussian bumps; null without --density).
    """
    rows, eig_rows, tr_rows, dens_rows, curve_rows = [], [], [], [], []
    for m, r in zip(members, results, strict=True):
        top = r.eigenpairs[0]
        rows.append(checkpoint_record(m, {"loss": r.loss, "top_eigenvalue": top.value, "top_residual": top.residual,
                                          "top_iterations": top.iterations, "top_converged": top.converged,
                                          "trace": r.trace, "trace_se": r.trace_se, "n_params": r.n_params,
                                          "n_samples": r.n_samples, "products": r.products,
                                          "method": r.method, "eig_products": r.eig_products,
                                          "trace_method": r.trace_method, "trace_exact": r.trace_exact,
                                          "trace_sketch": r.trace_sketch, "trace_vectors": r.trace_vectors,
                                          "trace_low": r.trace_low, "trace_high": r.trace_high,
                                          "trace_confidence": r.trace_confidence, "trace_stable": r.trace_stable,
                                          "trace_note": r.trace_note,
                                          "density_sigma2": r.density.sigma2 if r.density is not None else None}))
        eig_rows += [flat({"checkpoint": m.path, "group": m.group, "rank": i + 1, "eigenvalue": p.value,
                           "iterations": p.iterations, "residual": p.residual, "converged": p.converged})
                     for i, p in enumerate(r.eigenpairs)]
        tr_rows += [flat({"checkpoint": m.path, "group": m.group, "index": i, "value": v})
                    for i, v in enumerate(r.trace_samples)]
        if r.density is not None:
            for run, (nodes, weights) in enumerate(zip(r.density.nodes, r.density.weights)):
                dens_rows += [flat({"checkpoint": m.path, "group": m.group, "run": run, "node": nd, "weight": w})
                              for nd, w in zip(nodes, weights)]
            curve_rows += [flat({"checkpoint": m.path, "group": m.group, "eigenvalue": g, "density": d})
                           for g, d in zip(r.density.grid, r.density.density)]
    return {"checkpoints": rows, "eigenvalues": eig_rows, "trace_samples": tr_rows, "density": dens_rows,
            "density_curve": curve_rows,
            "groups": group_records(rows, ["top_eigenvalue", "trace"], reference=reference, confidence=confidence,
                                    interval=interval)}
