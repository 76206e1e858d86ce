"""`kdprobe calibration`: ECE, NLL, Brier and reliability diagrams of checkpoints per group; temperature scaling."""
from __future__ import annotations

from typing import Annotated

import typer

from cli.common import table
from cli.probe_set import (Arch, ArchKwargs, ImageSize,
                           BatchSize, Confidence, Csv, DataDir, Dataset, Device, GroupBy, Html, Interval, Json,
                           Reference, Samples, Seed, Split, cached_logits, group_table, open_set, write_outputs)

O = typer.Option


def calibration(
    checkpoints: Annotated[list[str], typer.Argument(help="Checkpoint files or globs ('runs/*/*.pt'), one dataset."
                                                          " Calibration per checkpoint and per group: accuracy, NLL,"
                                                          " top-label ECE (equal-width bins), Brier (sum over classes),"
                                                          " reliability bins; groups compared with the reference (Welch"
                                                          " + Holm, Hedges' g; unit = one checkpoint). ONE forward pass"
                                                          " per checkpoint over the split: its logits are cached and"
                                                          " every metric is computed from them.")],
    split: Split = "test",
    samples: Samples = 0,
    bins: Annotated[int, O(help="Confidence bins (Guo et al.: 15 equal-width, top-label).")] = 15,
    adaptive: Annotated[bool, O("--adaptive", help="Also the adaptive (equal-mass bins) ECE.")] = False,
    classwise: Annotated[bool, O("--classwise", help="Also the classwise ECE (Kull et al. 2019).")] = False,
    temperature: Annotated[bool, O("--temperature", help="Fit one temperature T by NLL on a seeded random half of "
                                                         "the samples; report before/after on the other half.")] = False,
    group_by: GroupBy = "method",
    reference: Reference = None,
    confidence: Confidence = 0.99,
    interval: Interval = "t",
    batch_size: BatchSize = 500,
    seed: Seed = 0,
    csv: Csv = None,
    json: Json = None,
    html: Html = None,
    arch: Arch = None,
    arch_kwargs: ArchKwargs = None,
    image_size: ImageSize = None,
    dataset: Dataset = None,
    data_dir: DataDir = None,
    device: Device = "auto",
):
    """Calibration (ECE, NLL, Brier, reliability) per checkpoint and group (one forward pass per checkpoint)."""
    from kdprobe.errors import KdprobeError
    from kdprobe.probe_tables import ProbeTables, checkpoint_record, flat, group_records
    from kdprobe.probes.calibration import calibration as calibrate

    if bins < 1:
        raise KdprobeError(f"expected --bins >= 1, got {bins}")
    ps, ref = open_set(checkpoints, interval=interval, reference=reference, group_by=group_by, split=split,
                       samples=samples, arch=arch, arch_kwargs=arch_kwargs,
                       image_size=image_size, dataset=dataset, data_dir=data_dir, device=device,
                       command="calibration", outputs=(csv, json, html))
    cache = cached_logits(ps, batch_size, desc="calibration")
    rows, rel = [], []
    for m in ps.members:
        lg = cache[m.path]
        r = calibrate(lg.logits, lg.labels, bins=bins, adaptive=adaptive, classwise=classwise,
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
    main = ["ece", "nll", "brier", "acc"]
    extra = [k for k in ("adaptive_ece", "classwise_ece") if k in rows[0]]
    if temperature:
        extra += ["temperature", "nll_before", "nll_after", "ece_before", "ece_after"]
    metric_names = main + extra
    settings = {"dataset": ps.dataset, "split": split, "samples": samples, "samples_used": int(len(ps.y)),
                "group_by": group_by, "reference": ref, "confidence": confidence, "interval": interval, "bins": bins,
                "ece": "top-label, equal-width bins (l, u]", "brier": "sum over classes of (p_k - 1[y=k])^2, in [0, 2]",
                "temperature_split": "fit on a seeded random half, before/after on the other half" if temperature
                else None, "seed": seed, "checkpoints": len(ps.members), "forward_passes": cache.forward_passes,
                "bn": "eval"}
    tables = ProbeTables("calibration", settings, {
        "checkpoints": rows, "reliability": rel,
        "groups": group_records(rows, metric_names, reference=ref, confidence=confidence, interval=interval)})

    typer.echo(f"Calibration on {ps.dataset}: split={split}, {len(ps.y)} samples, {bins} equal-width bins, "
               f"{len(rows)} checkpoints ({cache.forward_passes} forward passes)")
    typer.echo(table(group_table(tables.table("groups"), main)))
    if extra:
        typer.echo(table([{k: v for k, v in r.items() if k not in ("p(Holm)", "g")}
                          for r in group_table(tables.table("groups"), extra)]))
    typer.echo(f"mean over checkpoints ± {confidence * 100:g}% CI ({interval}); unit = one checkpoint; "
               + (f"p(Holm), g = ECE vs {ref} (Welch, Holm-adjusted; Hedges' g)" if ref else "no tests"))
    if temperature:
        typer.echo(f"temperature: fitted by NLL on a seeded half (seed {seed}); *_before / *_after on the other half; "
                   f"T at a bound "
                   f"(0.01 or 100) in {sum(bool(r['temperature_at_bound']) for r in rows)} checkpoint(s)")
    write_outputs(tables, "checkpoints", csv, json, html)
