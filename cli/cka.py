"""`kdprobe cka`: linear CKA between two checkpoints layer by layer, or at one layer for every pair of a group."""
from __future__ import annotations

from typing import Annotated, Optional

import typer

from cli.common import ranged, table
from kdprobe.ranges import MAX_BATCH, Range
from cli.probe_set import (Figures, figure_paths, Arch, ArchKwargs, ImageSize,
                           Confidence, Csv, DataDir, Dataset, Device, GroupBy, Html, Interval, Json, Reference,
                           Samples, Split, check_set_outputs, pair_type_table, write_outputs)

O = typer.Option
_CKA_BATCH = Range(int, 4, MAX_BATCH)  # the unbiased HSIC needs n >= 4 (kdprobe.probes.cka.MIN_BATCH)


def cka(
    checkpoints: Annotated[list[str], typer.Argument(help="Two checkpoints (A.pt B.pt: the layer x layer matrix) or "
                                                          "more / a glob (every pair at one layer, per pair type)."
                                                          " Linear CKA (Kornblith et al. 2019) with the unbiased HSIC"
                                                          " estimator, features taken by forward hooks at named modules"
                                                          " (any model). Two checkpoints: the layer x layer matrix. A"
                                                          " group: CKA of every pair at one layer, summarized per pair"
                                                          " type (within, between, student-teacher; unit = one"
                                                          " checkpoint, delete-one-checkpoint jackknife). One forward"
                                                          " pass per checkpoint: a group's features (or minibatch Gram"
                                                          " matrices) are cached and every pair reads them.")],
    split: Split = "test",
    samples: Samples = 0,
    layers_a: Annotated[Optional[str], O(help="Two checkpoints: comma-separated layers of A (module names as in "
                                              "model.named_modules(); NAME:in = the module's input). Default: the "
                                              "blocks of every top-level Sequential, the penultimate layer, the "
                                              "logits.")] = None,
    layers_b: Annotated[Optional[str], O(help="Two checkpoints: layers of B (default as for A).")] = None,
    layer: Annotated[Optional[str], O(help="A group: the layer compared (default: the input of the last Linear, "
                                           "the penultimate representation).")] = None,
    summary: Annotated[bool, O("--summary", help="Treat two checkpoints as a group (pair record only).")] = False,
    estimator: Annotated[str, O(help="auto | exact | minibatch. exact: unbiased HSIC of the whole split from "
                                     "feature-space sums (independent of --batch-size; memory p^2 per layer); "
                                     "minibatch: Nguyen et al. 2021, summed per-minibatch unbiased HSIC (any feature "
                                     "size; depends slightly on --batch-size). auto: exact when the sums fit in "
                                     "256 MB.")] = "auto",
    batch_size: Annotated[int, O(help="Samples per forward pass, and the minibatch of the minibatch estimator "
                                      "(>= 4).", callback=ranged(_CKA_BATCH))] = 256,
    group_by: GroupBy = "method",
    reference: Reference = None,
    confidence: Confidence = 0.99,
    interval: Interval = "t",
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
    """Linear CKA: layer x layer for two checkpoints, or per pair type at one layer for a group."""
    from kdprobe.api.probes import cka as run

    figs = figure_paths("cka", figures, (html, json, csv))
    check_set_outputs("cka", checkpoints, (csv, json, html), figs)
    result = run(checkpoints, split=split, samples=samples, layers_a=layers_a, layers_b=layers_b, layer=layer,
                 summary=summary, estimator=estimator, batch_size=batch_size, group_by=group_by, reference=reference,
                 confidence=confidence, interval=interval, arch=arch, arch_kwargs=arch_kwargs, image_size=image_size,
                 dataset=dataset, data_dir=data_dir, device=device, note=lambda text: typer.echo(text, err=True))
    tables, settings = result.tables, result.settings
    if result.main == "layers":  # two checkpoints: the layer x layer matrix
        r, (pair,) = result.details, tables.table("pairs")
        typer.echo(f"Linear CKA, {settings['a']} (A) vs {settings['b']} (B) on {settings['dataset']}: split={split}, "
                   f"{r.n} samples, {r.estimator} unbiased HSIC ({pair['pair_type']} pair)")
        shown = []
        for i, la in enumerate(r.layers_a):
            j = max(range(len(r.layers_b)), key=lambda jj: r.values[i][jj])
            same = r.layers_b.index(la) if la in r.layers_b else None
            shown.append({"layer of A": la, "same layer of B": "-" if same is None else f"{r.values[i][same]:.4f}",
                          "most similar layer of B": r.layers_b[j], "cka": r.values[i][j]})
        typer.echo(table(shown))
        write_outputs(tables, "layers", csv, json, html, figs)
        return

    ref = settings["reference"]
    typer.echo(f"Linear CKA at {settings['layer']} on {settings['dataset']}: split={split}, "
               f"{settings['samples_used']} samples, {settings['estimator']} unbiased HSIC, {settings['checkpoints']} "
               f"checkpoints ({settings['forward_passes']} forward passes), {len(tables.table('pairs'))} pairs")
    typer.echo(table(pair_type_table(tables.table("pair_types"), ["cka"])))
    typer.echo(f"mean over pairs ± {confidence * 100:g}% CI ({interval}); unit = one checkpoint (pairs share "
               "checkpoints: delete-one-checkpoint jackknife); "
               + (f"p = vs 'within {ref}', jackknife t, Holm-adjusted" if ref else "no tests"))
    write_outputs(tables, "pairs", csv, json, html, figs)
