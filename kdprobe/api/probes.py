"""The probes of a set of checkpoints on one dataset: agreement, ensembles, cka, calibration, sharpness.

Each takes checkpoints as paths or globs, `kdprobe.Checkpoint` objects or plain `torch.nn.Module`s (then
`dataset=` names their data), fits the dataset's images to every model (size, normalization) and returns a
`kdprobe.ProbeResult`. Keyword arguments are the CLI's options, with the CLI's defaults; `note(text)`
receives remarks about the inputs (default: printed to stderr). Progress bars go to stderr. The CLI
commands call these functions, so the same inputs give the same tables, bit for bit."""
from __future__ import annotations

import sys

from kdprobe.api.results import ProbeResult

# the kdprobe.ranges.PROBE_RANGES entry each numeric option is checked against (the CLI checks them at parse time)
_RANGES = {"samples": "samples", "batch_size": "batch_size", "confidence": "confidence", "seed": "seed",
           "bins": "bins", "top_k": "top_k", "iterations": "iterations", "tol": "tol",
           "trace_samples": "trace_samples", "trace_rtol": "tol", "trace_sketch": "top_k",
           "lanczos_steps": "lanczos_steps", "density_runs": "density_runs", "vectors_per_pass": "vectors_per_pass"}


def _check_ranges(**values) -> None:
    """One-line error for an option outside its declared range (what the CLI refuses at parse time)."""
    from kdprobe.ranges import PROBE_RANGES

    for name, value in values.items():
        PROBE_RANGES[_RANGES[name]].check(value, name)


def _layer_names(spec) -> list[str] | None:
    """Layer names from 'a,b,c' (the CLI's form) or a list of names; None for the defaults."""
    if spec is None:
        return None
    parts = spec.split(",") if isinstance(spec, str) else [str(s) for s in spec]
    return [s.strip() for s in parts if s.strip()] or None


def _count(entries: list) -> int:
    """How many checkpoints `entries` name: files matched by the paths and globs (repeats dropped), plus objects."""
    from pathlib import Path

    from kdprobe.probes.checkpoint_set import checkpoint_paths

    return len(checkpoint_paths(entries)) + sum(not isinstance(e, (str, Path)) for e in entries)

__all__ = ["agreement", "ensembles", "cka", "calibration", "sharpness"]

def _agreement_run(checkpoints, *, ensembles_only: bool, split, samples, group_by, reference, confidence, interval,
                   max_subsets, bins, batch_size, seed, note=None, **load):
    from kdprobe.errors import KdprobeError
    from kdprobe.probes.checkpoint_set import cached_logits, open_set
    from kdprobe.probes.sets import AGREEMENT_NOTES, agreement_part, group_ensembles
    from kdprobe.probes.tables import ProbeTables, ensemble_tables

    if max_subsets < 1 or bins < 1:
        raise KdprobeError(f"expected --max-subsets >= 1 and --bins >= 1, got {max_subsets} and {bins}")
    ps, ref = open_set(checkpoints, interval=interval, reference=reference, group_by=group_by, split=split,
                       samples=samples, min_count=1 if ensembles_only else 2, note=note, **load)
    cache = cached_logits(ps, batch_size)
    labels = cache.labels
    log_probs = {m.path: cache[m.path].log_probs() for m in ps.members}
    stat = dict(reference=ref, confidence=confidence, interval=interval)
    part = {} if ensembles_only else agreement_part(ps.members, log_probs, labels, bins=bins, **stat)
    ens, tests = group_ensembles(ps.members, log_probs, labels, max_subsets=max_subsets, seed=seed, bins=bins, **stat)
    settings = {"dataset": ps.dataset, "split": split, "samples": samples, "samples_used": int(len(labels)),
                "group_by": group_by, "reference": ref, "confidence": confidence, "interval": interval, "bins": bins,
                "max_subsets": max_subsets, "seed": seed, "checkpoints": len(ps.members),
                "forward_passes": cache.forward_passes, **AGREEMENT_NOTES}
    command = "ensembles" if ensembles_only else "agreement"
    tables = ProbeTables(command, settings, {**part, **ensemble_tables(ens, tests)})
    return ProbeResult(tables, "ensemble_gains" if ensembles_only else "pairs", ens)


def agreement(checkpoints, *, split: str = "test", samples: int = 0, group_by: str = "method",
              reference: str | None = None, confidence: float = 0.99, interval: str = "t", max_subsets: int = 100,
              bins: int = 15, batch_size: int = 500, seed: int = 0, arch=None, arch_kwargs=None, image_size=None,
              dataset: str | None = None, data_dir=None, device: str = "auto", note=None) -> ProbeResult:
    """Function-space agreement of every pair of checkpoints (disagreement, normalized disagreement, symmetric
    KL, Jensen-Shannon) and the ensembles of each group (softmax average, gain over the mean member per
    size k), from ONE forward pass per checkpoint.

    checkpoints: at least 2 (paths, globs, kdprobe.Checkpoint objects or nn.Modules with dataset=).
    reference: the group others are tested against ('none' for no tests; default scratch where present).
    Tables: pairs (main), pair_types, checkpoints, groups, ensembles (the size curve), ensemble_gains,
    ensemble_subsets, gain_tests. `details` holds {group: GroupEnsemble}. note(text) receives remarks (default: stderr)."""
    return _agreement_run(checkpoints, ensembles_only=False, split=split, samples=samples, group_by=group_by,
                          reference=reference, confidence=confidence, interval=interval, max_subsets=max_subsets,
                          bins=bins, batch_size=batch_size, seed=seed, arch=arch, arch_kwargs=arch_kwargs,
                          image_size=image_size, dataset=dataset, data_dir=data_dir, device=device, note=note)


def ensembles(checkpoints, *, split: str = "test", samples: int = 0, group_by: str = "method",
              reference: str | None = None, confidence: float = 0.99, interval: str = "t", max_subsets: int = 100,
              bins: int = 15, batch_size: int = 500, seed: int = 0, arch=None, arch_kwargs=None, image_size=None,
              dataset: str | None = None, data_dir=None, device: str = "auto", note=None) -> ProbeResult:
    """The ensembles of each group alone (agreement's ensemble tables, without the pairs): accuracy, NLL and
    ECE of the mean member and of the softmax-average ensemble per size k, the gain with its jackknife
    interval and its test against the reference group's gain. Main table: ensemble_gains."""
    return _agreement_run(checkpoints, ensembles_only=True, split=split, samples=samples, group_by=group_by,
                          reference=reference, confidence=confidence, interval=interval, max_subsets=max_subsets,
                          bins=bins, batch_size=batch_size, seed=seed, arch=arch, arch_kwargs=arch_kwargs,
                          image_size=image_size, dataset=dataset, data_dir=data_dir, device=device, note=note)


def cka(checkpoints, *, split: str = "test", samples: int = 0, layers_a=None, layers_b=None, layer: str | None = None,
        summary: bool = False, estimator: str = "auto", batch_size: int = 256, group_by: str = "method",
        reference: str | None = None, confidence: float = 0.99, interval: str = "t", arch=None, arch_kwargs=None,
        image_size=None, dataset: str | None = None, data_dir=None, device: str = "auto", note=None) -> ProbeResult:
    """Linear CKA (Kornblith et al. 2019, unbiased HSIC): layer x layer between two checkpoints, or at one layer
    for every pair of a group, summarized per pair type. Features are taken by forward hooks, one forward
    pass per checkpoint.

    checkpoints: exactly 2 give pair mode (unless summary=True): the CKA of every layer of A against every
        layer of B; 2 or more with summary=True, or 3 and more, give group mode.
    layers_a, layers_b: pair mode: the layers of A and B, as 'name1,name2' or a list (module names as in
        model.named_modules(); 'NAME:in' = the module's input). Default: the blocks of every top-level
        Sequential, the penultimate layer, the logits.
    layer: group mode: the layer compared (default: the input of the last Linear, the penultimate layer).
    estimator: auto | exact | minibatch (exact: whole-split HSIC from feature-space sums, memory p^2 per
        layer; minibatch: Nguyen et al. 2021, summed per-minibatch HSIC; auto: exact when it fits 256 MB).
    batch_size: samples per forward pass and the minibatch of the minibatch estimator (>= 4).
    reference: group mode: the group the pair types are tested against ('none' for no tests; default
        scratch where present). Pair mode ignores it.

    Tables, pair mode: layers (main: a, b, layer_a, layer_b, cka), pairs (the one pair, its CKA at the
    penultimate layers, the student first in a student-teacher pair). Group mode: pairs (main: every
    pair's cka), pair_types (mean per pair type, delete-one-checkpoint jackknife interval, Holm-adjusted
    test vs the reference), checkpoints (the layer used per checkpoint).
    `details`: pair mode the kdprobe.probes.cka.CkaMatrix (layers_a, layers_b, values[i][j], estimator,
    n samples); group mode None."""
    from tqdm import tqdm

    from kdprobe.probes.checkpoint_set import as_entries, check_choice, open_set
    from kdprobe.probes.cka import ESTIMATORS, MIN_BATCH, CkaCache, cka_matrix
    from kdprobe.probes.features import NormalizedImages, penultimate_layer
    from kdprobe.probes.pairs import PairRecord, classify
    from kdprobe.probes.sets import PAIR_UNIT, cka_group_part
    from kdprobe.probes.tables import ProbeTables, flat, pair_records
    from kdprobe.ranges import MAX_BATCH, Range

    check_choice("--estimator", estimator, ESTIMATORS)
    _check_ranges(samples=samples, confidence=confidence)
    Range(int, MIN_BATCH, MAX_BATCH).check(batch_size, "batch_size")  # the unbiased HSIC needs n >= 4
    entries = as_entries(checkpoints)
    pair_mode = _count(entries) == 2 and not summary  # the reference matters for a group only
    ps, ref = open_set(entries, interval=interval, reference="none" if pair_mode else reference,
                       group_by=group_by, split=split, samples=samples, arch=arch, arch_kwargs=arch_kwargs,
                       image_size=image_size, dataset=dataset, data_dir=data_dir, device=device, min_count=2,
                       note=note)
    inputs = NormalizedImages(ps.x, ps.data.mean, ps.data.std)
    base = {"dataset": ps.dataset, "split": split, "samples": samples, "samples_used": int(len(ps.y)),
            "group_by": group_by, "batch_size": batch_size, "bn": "eval", "checkpoints": len(ps.members),
            "kernel": "linear", "hsic": "unbiased (Song et al. 2012)"}
    if pair_mode:
        (ca, cb), (ma, mb) = ps.loaded, ps.members
        ca.model.to(ps.device)
        cb.model.to(ps.device)
        r = cka_matrix(ca.model, cb.model, inputs, layers_a=_layer_names(layers_a), layers_b=_layer_names(layers_b),
                       estimator=estimator, batch_size=batch_size)
        ca.model.to("cpu")
        cb.model.to("cpu")
        pa, pb = penultimate_layer(ca.model), penultimate_layer(cb.model)
        at_pen = r.values[r.layers_a.index(pa)][r.layers_b.index(pb)] if pa in r.layers_a and pb in r.layers_b \
            else None
        first, second, kind, groups = classify(ma, mb)
        flip = first is not ma  # the student of a student-teacher pair comes first
        pair = PairRecord(first.path, second.path, first.group, second.group, kind, groups, {"cka": at_pen})
        layer_rows = [flat({"a": ma.path, "b": mb.path, "layer_a": la, "layer_b": lb, "cka": r.values[i][j]})
                      for i, la in enumerate(r.layers_a) for j, lb in enumerate(r.layers_b)]
        settings = {**base, "a": ma.path, "b": mb.path, "estimator": r.estimator, "penultimate_a": pa,
                    "penultimate_b": pb, "pair_order_swapped": flip}
        return ProbeResult(ProbeTables("cka", settings, {"layers": layer_rows, "pairs": pair_records([pair])}),
                           "layers", r)

    cache = CkaCache(inputs, estimator=estimator, batch_size=batch_size)
    for ck, m in tqdm(list(zip(ps.loaded, ps.members)), desc="features", unit="ckpt", file=sys.stderr,
                      dynamic_ncols=True):
        ck.model.to(ps.device)
        cache.add(m.path, ck.model, layer)
        ck.model.to("cpu")
    part = cka_group_part(ps.members, cache, reference=ref, confidence=confidence, interval=interval)
    settings = {**base, "layer": layer or "penultimate (input of the last Linear)", "estimator": cache.estimator,
                "reference": ref, "confidence": confidence, "interval": interval,
                "forward_passes": cache.forward_passes, "pair_unit": PAIR_UNIT}
    return ProbeResult(ProbeTables("cka", settings, part), "pairs")


def calibration(checkpoints, *, split: str = "test", samples: int = 0, bins: int = 15, adaptive: bool = False,
                classwise: bool = False, temperature: bool = False, group_by: str = "method",
                reference: str | None = None, confidence: float = 0.99, interval: str = "t", batch_size: int = 500,
                seed: int = 0, arch=None, arch_kwargs=None, image_size=None, dataset: str | None = None,
                data_dir=None, device: str = "auto", note=None) -> ProbeResult:
    """Calibration of each checkpoint and group: accuracy, NLL, top-label ECE (equal-width bins), Brier (sum
    over classes) and reliability bins, from ONE forward pass per checkpoint.

    bins: equal-width confidence bins of the ECE (Guo et al.: 15).
    adaptive: also the adaptive (equal-mass bins) ECE; classwise: also the classwise ECE (Kull et al. 2019).
    temperature: fit one temperature T by NLL on a seeded (seed) random half of the samples and report the
        metrics before/after on the other half.
    reference: the group the others are compared with (Welch + Holm, Hedges' g; unit = one checkpoint;
        'none' for no tests; default scratch where present).

    Tables: checkpoints (main: acc, nll, ece, brier, adaptive_ece / classwise_ece when asked, and with
    temperature: temperature, temperature_at_bound, fit_n, eval_n, {acc,nll,ece,brier}_{before,after}),
    reliability (per checkpoint and bin: lower, upper, count, accuracy, confidence), groups (per group and
    metric: mean, interval, test vs the reference). `details` is None."""
    from kdprobe.probes.checkpoint_set import cached_logits, open_set
    from kdprobe.probes.sets import CALIBRATION_NOTES, calibration_part, temperature_note
    from kdprobe.probes.tables import ProbeTables

    _check_ranges(samples=samples, bins=bins, confidence=confidence, batch_size=batch_size, seed=seed)
    ps, ref = open_set(checkpoints, interval=interval, reference=reference, group_by=group_by, split=split,
                       samples=samples, arch=arch, arch_kwargs=arch_kwargs, image_size=image_size, dataset=dataset,
                       data_dir=data_dir, device=device, note=note)
    cache = cached_logits(ps, batch_size, desc="calibration")
    part, _ = calibration_part(ps.members, {m.path: cache[m.path].logits for m in ps.members}, cache.labels,
                               bins=bins, adaptive=adaptive, classwise=classwise, temperature=temperature,
                               seed=seed, reference=ref, confidence=confidence, interval=interval)
    settings = {"dataset": ps.dataset, "split": split, "samples": samples, "samples_used": int(len(ps.y)),
                "group_by": group_by, "reference": ref, "confidence": confidence, "interval": interval, "bins": bins,
                **CALIBRATION_NOTES, "temperature_split": temperature_note(temperature), "seed": seed,
                "checkpoints": len(ps.members), "forward_passes": cache.forward_passes}
    return ProbeResult(ProbeTables("calibration", settings, part), "checkpoints")


def sharpness(checkpoints, *, split: str = "train", samples: int = 1024, top_k: int = 1, method: str = "lanczos",
              iterations: int = 100, tol: float = 1e-3, trace_samples: int = 100, trace_method: str = "hutch++",
              trace_rtol: float = 0.0, trace_sketch: int = 10, density: bool = False, lanczos_steps: int = 80,
              density_runs: int = 1, bn: str = "eval", batch_size: int = 128, vectors_per_pass: int = 25,
              hvp: str = "reuse", keep_graphs: bool = False, group_by: str = "method", reference: str | None = None,
              confidence: float = 0.99, interval: str = "t", seed: int = 0, arch=None, arch_kwargs=None,
              image_size=None, dataset: str | None = None, data_dir=None, device: str = "auto",
              note=None) -> ProbeResult:
    """Sharpness of the training loss (mean cross-entropy over the first `samples` examples of `split`) at
    each checkpoint: top Hessian eigenvalue(s), the Hessian trace with its interval, and optionally the
    eigenvalue density, from exact Hessian-vector products (torch.func).

    top_k: eigenvalues of largest magnitude (at most the model's trainable parameters).
    method: lanczos (Ritz values, full reorthogonalization) | power (power iteration with deflation, as
        PyHessian). iterations: the cap on Lanczos steps (or power steps per eigenvalue); tol: relative
        tolerance on the eigenvalues (0 = always `iterations`).
    trace_method: hutch++ (the Lanczos basis, or with power Hutch++'s sketch of trace_sketch directions, is
        deflated exactly, Hutchinson runs on the rest) | hutchinson (plain Rademacher v^T H v).
        trace_samples caps the random vectors; trace_rtol > 0 stops once the standard error is below
        trace_rtol x |trace| (at least 10 vectors).
    density: also the eigenvalue density by stochastic Lanczos quadrature (lanczos_steps per run,
        density_runs random starts).
    bn: eval (running statistics; the result does not depend on batch_size) | train (each minibatch's
        statistics). batch_size, vectors_per_pass (Hutchinson vectors per forward+gradient pass), hvp
        (reuse | jvp) and keep_graphs trade memory for speed. seed: every random vector.
    reference: the group the others are compared with (Welch + Holm, Hedges' g; unit = one checkpoint).

    Tables: checkpoints (main; one row per checkpoint: loss, top eigenvalue with residual and iterations,
    trace, trace_se, the trace interval trace_low/trace_high with trace_stable and trace_note, methods and
    product counts; see kdprobe.probes.sets.sharpness_part), eigenvalues, trace_samples, density and
    density_curve (with density), groups (top_eigenvalue and trace per group).
    `details`: a tuple with the kdprobe.probes.sharpness.SharpnessResult of each checkpoint, in table order
    (check `.trace_stable`: False means the trace's interval may still be too narrow, `.trace_note` says why)."""
    from tqdm import tqdm

    from kdprobe.errors import KdprobeError
    from kdprobe.probes.checkpoint_set import check_choice, open_set
    from kdprobe.probes.features import NormalizedImages
    from kdprobe.probes.sets import sharpness_part
    from kdprobe.probes.sharpness import BN_MODES, EIG_METHODS, HVP_MODES, TRACE_METHODS, sharpness as measure
    from kdprobe.probes.tables import ProbeTables

    check_choice("--bn", bn, BN_MODES)
    check_choice("--hvp", hvp, HVP_MODES)
    check_choice("--method", method, EIG_METHODS)
    check_choice("--trace-method", trace_method, TRACE_METHODS)
    _check_ranges(samples=samples, top_k=top_k, iterations=iterations, tol=tol, trace_samples=trace_samples,
                  trace_rtol=trace_rtol, trace_sketch=trace_sketch, lanczos_steps=lanczos_steps,
                  density_runs=density_runs, batch_size=batch_size, vectors_per_pass=vectors_per_pass,
                  confidence=confidence, seed=seed)
    ps, ref = open_set(checkpoints, interval=interval, reference=reference, group_by=group_by, split=split,
                       samples=samples, arch=arch, arch_kwargs=arch_kwargs, image_size=image_size, dataset=dataset,
                       data_dir=data_dir, device=device, note=note)
    for ck in ps.loaded:  # options bounded by the model's size: checked once loaded, before any Hessian product
        n = sum(p.numel() for p in ck.model.parameters() if p.requires_grad)
        for flag, value, used in (("--top-k", top_k, True), ("--lanczos-steps", lanczos_steps, density)):
            if used and value > n:
                raise KdprobeError(f"expected {flag} <= the {n:,} trainable parameters of {ck.path} (a Hessian of "
                                   f"size n has n eigenvalues), got {value:,}; pass {flag} {min(n, 10)}")
    x = NormalizedImages(ps.x, ps.data.mean, ps.data.std)[:]
    results = []
    budget = ((iterations if method == "lanczos" else top_k * iterations) + trace_samples
              + (2 * trace_sketch if method == "power" and trace_method == "hutch++" else 0)
              + (lanczos_steps * density_runs if density else 0))
    outer = tqdm(list(zip(ps.loaded, ps.members)), desc="sharpness", unit="ckpt", file=sys.stderr, dynamic_ncols=True)
    for ck, m in outer:
        ck.model.to(ps.device)
        with tqdm(total=budget, desc="  Hessian-vector products (at most)", unit="hvp", file=sys.stderr, leave=False,
                  dynamic_ncols=True, mininterval=1.0) as bar:
            try:
                results.append(measure(ck.model, x, ps.y, top_k=top_k, iterations=iterations, tol=tol,
                                       trace_samples=trace_samples, density=density, lanczos_steps=lanczos_steps,
                                       density_runs=density_runs, bn=bn, batch_size=batch_size,
                                       vectors_per_pass=vectors_per_pass, mode=hvp, keep_graphs=keep_graphs,
                                       seed=seed, method=method, trace_method=trace_method,
                                       trace_rtol=trace_rtol, trace_sketch=trace_sketch, progress=bar.update))
            except KdprobeError as e:  # name the checkpoint the probe refused
                raise KdprobeError(f"{ck.path}: {e}") from None
        ck.model.to("cpu")
    part = sharpness_part(ps.members, results, reference=ref, confidence=confidence, interval=interval)
    settings = {"dataset": ps.dataset, "split": split, "samples": samples, "samples_used": int(len(ps.y)),
                "loss": "mean cross-entropy", "bn": bn, "batch_size": batch_size, "top_k": top_k,
                "iterations": iterations, "tol": tol, "trace_samples": trace_samples, "density": density,
                "method": method, "trace_method": trace_method, "trace_rtol": trace_rtol,
                "trace_sketch": trace_sketch if trace_method == "hutch++" else None,
                "lanczos_steps": lanczos_steps if density else None, "density_runs": density_runs if density else None,
                "hvp": hvp, "keep_graphs": keep_graphs, "seed": seed, "group_by": group_by, "reference": ref,
                "confidence": confidence, "interval": interval, "checkpoints": len(ps.members),
                "variables": "every parameter with requires_grad"}
    return ProbeResult(ProbeTables("sharpness", settings, part), "checkpoints", tuple(results))
