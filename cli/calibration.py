"""`kdprobe calibration`: ECE, NLL, Brier and reliability diagrams of checkpoints per group; temperature scaling."""
from __future__ import annotations

from typing import Annotated

import typer

from cli.common import table
from cli.probe_set import (Figures, figure_paths, Arch, ArchKwargs, ImageSize,
                           BatchSize, Confidence, Csv, DataDir, Dataset, Device, GroupBy, Html, Interval, Json,
                           Reference, Samples, Seed, Split, check_set_outputs, group_table, in_range,
                           write_outputs)

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
    figures: Figures = None,
    arch: Arch = None,
    arch_kwargs: ArchKwargs = None,
    image_size: ImageSize = None,
    dataset: Dataset = None,
    data_dir: DataDir = None,
    device: Device = "auto",
):
    """Calibration (ECE, NLL, Brier, reliability) per checkpoint and group (one forward pass per checkpoint)."""
    from kdprobe.api.probes import calibration as run
    from kdprobe.probes.sets import CALIBRATION_MAIN

    figs = figure_paths("calibration", figures, (html, json, csv))
    check_set_outputs("calibration", checkpoints, (csv, json, html), figs)
    result = run(checkpoints, split=split, samples=samples, bins=bins, adaptive=adaptive, classwise=classwise,
                 temperature=temperature, group_by=group_by, reference=reference, confidence=confidence,
                 interval=interval, batch_size=batch_size, seed=seed, arch=arch, arch_kwargs=arch_kwargs,
                 image_size=image_size, dataset=dataset, data_dir=data_dir, device=device,
                 note=lambda text: typer.echo(text, err=True))
    tables, settings = result.tables, result.settings
    main, rows, ref, groups = CALIBRATION_MAIN, tables.table("checkpoints"), settings["reference"], tables.table("groups")
    extra = list(dict.fromkeys(g["metric"] for g in groups if g["metric"] not in main))  # adaptive, classwise, T

    typer.echo(f"Calibration on {settings['dataset']}: split={split}, {settings['samples_used']} samples, {bins} "
               f"equal-width bins, {len(rows)} checkpoints ({settings['forward_passes']} forward passes)")
    typer.echo(table(group_table(groups, main)))
    if extra:
        typer.echo(table([{k: v for k, v in r.items() if k not in ("p(Holm)", "g")}
                          for r in group_table(groups, extra)]))
    typer.echo(f"mean over checkpoints ± {confidence * 100:g}% CI ({interval}); unit = one checkpoint; "
               + (f"p(Holm), g = ECE vs {ref} (Welch, Holm-adjusted; Hedges' g)" if ref else "no tests"))
    if temperature:
        typer.echo(f"temperature: fitted by NLL on a seeded half (seed {seed}); *_before / *_after on the other half; "
                   f"T at a bound "
                   f"(0.01 or 100) in {sum(bool(r['temperature_at_bound']) for r in rows)} checkpoint(s)")
    write_outputs(tables, "checkpoints", csv, json, html, figs)
