"""`kdprobe calibration`: ECE, NLL, Brier and reliability diagrams of checkpoints per group; temperature scaling."""
from __future__ import annotations

from typing import Annotated

import typer

from cli.common import table
from cli.probe_set import (Arch, ArchKwargs, ImageSize,
                           BatchSize, Confidence, Csv, DataDir, Dataset, Device, GroupBy, Html, Interval, Json,
                           Reference, Samples, Seed, Split, cached_logits, group_table, in_range, open_set, write_outputs)

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
    bins: Annotated[int, O(help="Confidence bins (Guo et al.: 15 equal-width, top-label; at most 10,000).",
                           callback=in_range("bins"))] = 15,
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
    from kdprobe.probes.sets import CALIBRATION_MAIN, CALIBRATION_NOTES, calibration_part, temperature_note
    from kdprobe.probes.tables import ProbeTables

    if bins < 1:
        raise KdprobeError(f"expected --bins >= 1, got {bins}")
    ps, ref = open_set(checkpoints, interval=interval, reference=reference, group_by=group_by, split=split,
                       samples=samples, arch=arch, arch_kwargs=arch_kwargs,
                       image_size=image_size, dataset=dataset, data_dir=data_dir, device=device,
                       command="calibration", outputs=(csv, json, html))
    cache = cached_logits(ps, batch_size, desc="calibration")
    part, extra = calibration_part(ps.members, {m.path: cache[m.path].logits for m in ps.members}, cache.labels,
                                   bins=bins, adaptive=adaptive, classwise=classwise, temperature=temperature,
                                   seed=seed, reference=ref, confidence=confidence, interval=interval)
    main, rows = CALIBRATION_MAIN, part["checkpoints"]
    settings = {"dataset": ps.dataset, "split": split, "samples": samples, "samples_used": int(len(ps.y)),
                "group_by": group_by, "reference": ref, "confidence": confidence, "interval": interval, "bins": bins,
                **CALIBRATION_NOTES, "temperature_split": temperature_note(temperature), "seed": seed,
                "checkpoints": len(ps.members), "forward_passes": cache.forward_passes}
    tables = ProbeTables("calibration", settings, part)

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
