"""`kdprobe agreement`: function-space agreement of every pair of checkpoints, and the ensembles of each group."""
from __future__ import annotations

from typing import Annotated

import typer

from cli.common import table
from cli.probe_set import (Figures, figure_paths, Arch, ArchKwargs, ImageSize,
                           BatchSize, Confidence, Csv, DataDir, Dataset, Device, GroupBy, Html, Interval, Json,
                           Reference, Samples, Seed, Split, check_set_outputs, fmt_ci, fmt_p, in_range,
                           pair_type_table, write_outputs)

O = typer.Option


def agreement(
    checkpoints: Annotated[list[str], typer.Argument(help="Checkpoint files or globs ('runs/*/*.pt'), at least 2, "
                                                          "all of one dataset."
                                                          " Pairwise disagreement, normalized disagreement, symmetric KL"
                                                          " and Jensen-Shannon; ensembles of each group (softmax"
                                                          " average) with the ensemble gain over the mean member, per"
                                                          " size k. ONE forward pass per checkpoint over the split: its"
                                                          " logits are cached and every pair, ensemble and calibration"
                                                          " number is computed from that cache (never one pass per"
                                                          " pair). Pairs: within a group, between groups, and KD student"
                                                          " vs its own teacher (found by the teacher sha256 recorded in"
                                                          " the student's checkpoint).")],
    split: Split = "test",
    samples: Samples = 0,
    group_by: GroupBy = "method",
    reference: Reference = None,
    confidence: Confidence = 0.99,
    interval: Interval = "t",
    max_subsets: Annotated[int, O(help="Ensemble-size curve: every subset of size k when there are at most this "
                                       "many, else this many distinct subsets drawn with --seed.",
                                  callback=in_range("max_subsets"))] = 100,
    bins: Annotated[int, O(help="Equal-width confidence bins of the ECE (Guo et al.: 15; at most 10,000).",
                           callback=in_range("bins"))] = 15,
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
    """Pairwise agreement of checkpoints and the ensembles of each group (one forward pass per checkpoint)."""
    from kdprobe.api.probes import agreement as run

    figs = figure_paths("agreement", figures, (html, json, csv))
    check_set_outputs("agreement", checkpoints, (csv, json, html), figs)
    result = run(checkpoints, split=split, samples=samples, group_by=group_by, reference=reference,
                 confidence=confidence, interval=interval, max_subsets=max_subsets, bins=bins, batch_size=batch_size,
                 seed=seed, arch=arch, arch_kwargs=arch_kwargs, image_size=image_size, dataset=dataset,
                 data_dir=data_dir, device=device, note=lambda text: typer.echo(text, err=True))
    tables, ens, settings = result.tables, result.details, result.settings
    ps_dataset, n_labels, ref = settings["dataset"], settings["samples_used"], settings["reference"]
    pairs = tables.table("pairs")

    typer.echo(f"Agreement on {ps_dataset}: split={split}, {n_labels} samples, {settings['checkpoints']} checkpoints "
               f"({settings['forward_passes']} forward passes), {len(pairs)} pairs")
    typer.echo(table(pair_type_table(tables.table("pair_types"), ["disagreement", "normalized_disagreement", "js"])))
    typer.echo(f"mean over pairs ± {confidence * 100:g}% CI ({interval}); unit = one checkpoint (pairs share checkpoints: "
               "delete-one-checkpoint jackknife); "
               + (f"p = disagreement vs 'within {ref}', jackknife t, Holm-adjusted" if ref else "no tests"))
    gain = {(r["group"], r["metric"]): r for r in tables.table("ensemble_gains")}
    test = {(r["group"], r["metric"]): r for r in tables.table("gain_tests")}
    shown = []
    for g, e in ens.items():
        row = {"group": g, "n": len(e.paths)}
        for mtr in ("acc", "nll", "ece"):
            r = gain[(g, mtr)]
            member = sum(getattr(s, mtr) for s in e.members) / len(e.members)
            row[mtr] = f"{member:.4f} -> {r['ensemble']:.4f}"
            row[f"gain {mtr}"] = fmt_ci(r["gain"], r["half_width"])
            row[f"p {mtr}"] = fmt_p(test[(g, mtr)]["p_holm"]) if (g, mtr) in test else "-"
        shown.append(row)
    typer.echo(table(shown))
    typer.echo(f"mean member -> ensemble of all n (softmax average); gain = ensemble - mean member ± {confidence * 100:g}% "
               "CI (jackknife over checkpoints, n >= 3); p = gain vs the reference group's gain, jackknife (Welch-type) "
               "t, Holm-adjusted")
    write_outputs(tables, "pairs", csv, json, html, figs)
