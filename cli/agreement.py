"""`kdprobe agreement`: function-space agreement of every pair of checkpoints, and the ensembles of each group."""
from __future__ import annotations

from typing import Annotated

import typer

from cli.common import table
from cli.probe_set import (Arch, ArchKwargs, ImageSize,
                           BatchSize, Confidence, Csv, DataDir, Dataset, Device, GroupBy, Html, Interval, Json,
                           Reference, Samples, Seed, Split, cached_logits, fmt_ci, fmt_p, in_range, open_set,
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
    arch: Arch = None,
    arch_kwargs: ArchKwargs = None,
    image_size: ImageSize = None,
    dataset: Dataset = None,
    data_dir: DataDir = None,
    device: Device = "auto",
):
    """Pairwise agreement of checkpoints and the ensembles of each group (one forward pass per checkpoint)."""
    from kdprobe.errors import KdprobeError
    from kdprobe.probes.sets import AGREEMENT_NOTES, agreement_part, group_ensembles
    from kdprobe.probes.tables import ProbeTables, ensemble_tables

    if max_subsets < 1 or bins < 1:
        raise KdprobeError(f"expected --max-subsets >= 1 and --bins >= 1, got {max_subsets} and {bins}")
    ps, ref = open_set(checkpoints, interval=interval, reference=reference, group_by=group_by, split=split,
                       samples=samples, arch=arch, arch_kwargs=arch_kwargs,
                       image_size=image_size, dataset=dataset, data_dir=data_dir, device=device,
                       command="agreement", outputs=(csv, json, html), min_count=2)
    cache = cached_logits(ps, batch_size)
    labels = cache.labels
    log_probs = {m.path: cache[m.path].log_probs() for m in ps.members}
    stat = dict(reference=ref, confidence=confidence, interval=interval)
    part = agreement_part(ps.members, log_probs, labels, bins=bins, **stat)
    ens, tests = group_ensembles(ps.members, log_probs, labels, max_subsets=max_subsets, seed=seed, bins=bins, **stat)
    settings = {"dataset": ps.dataset, "split": split, "samples": samples, "samples_used": int(len(labels)),
                "group_by": group_by, "reference": ref, "confidence": confidence, "interval": interval, "bins": bins,
                "max_subsets": max_subsets, "seed": seed, "checkpoints": len(ps.members),
                "forward_passes": cache.forward_passes, **AGREEMENT_NOTES}
    tables = ProbeTables("agreement", settings, {**part, **ensemble_tables(ens, tests)})
    pairs = part["pairs"]

    typer.echo(f"Agreement on {ps.dataset}: split={split}, {len(labels)} samples, {len(ps.members)} checkpoints "
               f"({cache.forward_passes} forward passes), {len(pairs)} pairs")
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
    write_outputs(tables, "pairs", csv, json, html)
