"""`kdprobe cka`: linear CKA between two checkpoints layer by layer, or at one layer for every pair of a group."""
from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer

from cli.common import expand_paths, ranged, table
from kdprobe.ranges import MAX_BATCH, Range
from cli.probe_set import (Arch, ArchKwargs, ImageSize,
                           Confidence, Csv, DataDir, Dataset, Device, GroupBy, Html, Interval, Json, Reference,
                           Samples, Split, check_choice, open_set, pair_type_table, write_outputs)

O = typer.Option
_CKA_BATCH = Range(int, 4, MAX_BATCH)  # the unbiased HSIC needs n >= 4 (kdprobe.probes.cka.MIN_BATCH)


def _names(spec: Optional[str]) -> list[str] | None:
    return [s.strip() for s in spec.split(",") if s.strip()] if spec else None


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
    arch: Arch = None,
    arch_kwargs: ArchKwargs = None,
    image_size: ImageSize = None,
    dataset: Dataset = None,
    data_dir: DataDir = None,
    device: Device = "auto",
):
    """Linear CKA: layer x layer for two checkpoints, or per pair type at one layer for a group."""
    from tqdm import tqdm

    from kdprobe.probes.pairs import PairRecord, classify
    from kdprobe.probes.sets import PAIR_UNIT, cka_group_part
    from kdprobe.probes.tables import ProbeTables, flat, pair_records
    from kdprobe.probes.cka import ESTIMATORS, CkaCache, cka_matrix
    from kdprobe.probes.features import NormalizedImages, penultimate_layer

    check_choice("--estimator", estimator, ESTIMATORS)
    pair_mode = len(expand_paths(checkpoints)) == 2 and not summary  # the reference matters for a group only
    ps, ref = open_set(checkpoints, interval=interval, reference="none" if pair_mode else reference,
                       group_by=group_by, split=split, samples=samples, arch=arch, arch_kwargs=arch_kwargs,
                       image_size=image_size, dataset=dataset,
                       data_dir=data_dir, device=device, command="cka", outputs=(csv, json, html), min_count=2)
    inputs = NormalizedImages(ps.x, ps.data.mean, ps.data.std)
    base = {"dataset": ps.dataset, "split": split, "samples": samples, "samples_used": int(len(ps.y)),
            "group_by": group_by, "batch_size": batch_size, "bn": "eval", "checkpoints": len(ps.members),
            "kernel": "linear", "hsic": "unbiased (Song et al. 2012)"}
    if pair_mode:
        (ca, cb), (ma, mb) = ps.loaded, ps.members
        ca.model.to(ps.device)
        cb.model.to(ps.device)
        r = cka_matrix(ca.model, cb.model, inputs, layers_a=_names(layers_a), layers_b=_names(layers_b),
                       estimator=estimator, batch_size=batch_size)
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
        tables = ProbeTables("cka", settings, {"layers": layer_rows, "pairs": pair_records([pair])})
        typer.echo(f"Linear CKA, {ma.path} (A) vs {mb.path} (B) on {ps.dataset}: split={split}, {r.n} samples, "
                   f"{r.estimator} unbiased HSIC ({kind} pair)")
        shown = []
        for i, la in enumerate(r.layers_a):
            j = max(range(len(r.layers_b)), key=lambda jj: r.values[i][jj])
            same = r.layers_b.index(la) if la in r.layers_b else None
            shown.append({"layer of A": la, "same layer of B": "-" if same is None else f"{r.values[i][same]:.4f}",
                          "most similar layer of B": r.layers_b[j], "cka": r.values[i][j]})
        typer.echo(table(shown))
        write_outputs(tables, "layers", csv, json, html)
        return

    cache = CkaCache(inputs, estimator=estimator, batch_size=batch_size)
    for ck, m in tqdm(list(zip(ps.loaded, ps.members)), desc="features", unit="ckpt", file=sys.stderr,
                      dynamic_ncols=True):
        ck.model.to(ps.device)
        cache.add(m.path, ck.model, layer)
        ck.model.to("cpu")
    part = cka_group_part(ps.members, cache, reference=ref, confidence=confidence, interval=interval)
    pairs = part["pairs"]
    settings = {**base, "layer": layer or "penultimate (input of the last Linear)", "estimator": cache.estimator,
                "reference": ref, "confidence": confidence, "interval": interval,
                "forward_passes": cache.forward_passes, "pair_unit": PAIR_UNIT}
    tables = ProbeTables("cka", settings, part)
    typer.echo(f"Linear CKA at {settings['layer']} on {ps.dataset}: split={split}, {len(ps.y)} samples, "
               f"{cache.estimator} unbiased HSIC, {len(ps.members)} checkpoints ({cache.forward_passes} forward "
               f"passes), {len(pairs)} pairs")
    typer.echo(table(pair_type_table(tables.table("pair_types"), ["cka"])))
    typer.echo(f"mean over pairs ± {confidence * 100:g}% CI ({interval}); unit = one checkpoint (pairs share "
               "checkpoints: delete-one-checkpoint jackknife); "
               + (f"p = vs 'within {ref}', jackknife t, Holm-adjusted" if ref else "no tests"))
    write_outputs(tables, "pairs", csv, json, html)
