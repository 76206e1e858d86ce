"""`kdprobe diversity`: Jacobian-correlation score (Mellor et al. 2020) of checkpoints, per training method."""
from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from cli.common import (Arch, ArchKwargs, DataDir, Dataset, ImageSize, arch_choice, expand_paths, in_range, ranged,
                        table)
from kdprobe.ranges import MAX_BATCH, Range

O = typer.Option


def _f(v: float, fmt: str = ".3f") -> str:
    return "-" if v is None or not math.isfinite(v) else format(v, fmt)


def diversity(
    checkpoints: Annotated[list[str], typer.Argument(
        help="Checkpoint files or globs ('runs/*/final.pt'); all must share one dataset and input shape.")],
    runs: Annotated[int, O(help="R: probe batches per checkpoint; every raw score is kept.",
                           callback=in_range("runs"))] = 5,
    batch_size: Annotated[int, O(help="N: inputs per probe batch (the paper: 128; >= 2). For v1 it must be below the "
                                      "length of a Jacobian row (D = C*H*W, or classes*D with --output full).",
                                 callback=ranged(Range(int, 2, MAX_BATCH)))] = 128,
    split: Annotated[str, O(help="Draw the probe images from this split: train | test.")] = "train",
    seed: Annotated[int, O(help="Seed of the probe-batch draw; every checkpoint sees the same R batches.",
                           callback=in_range("seed"))] = 0,
    bn: Annotated[str, O(help="BatchNorm during the probe: eval | batch-frozen | train. eval: running statistics; "
                              "one backward gives exact per-sample gradients. batch-frozen: the probe batch's own "
                              "statistics, computed once and then frozen (exact per-sample gradients). train: BN in "
                              "train mode, as the original code ran it; the inputs interact through the batch "
                              "statistics, so one backward does NOT give per-sample gradients. The model's buffers "
                              "and modes are restored afterwards in every case.")] = "eval",
    output: Annotated[str, O(help="What is differentiated (v1): sum = the sum of all logits (the paper); "
                                  "full = every logit (rows of length classes*D); pred = the predicted class's logit.")
                      ] = "sum",
    variant: Annotated[str, O(help="v1: eigenvalues of the Jacobian correlation, -sum(log(v+k)+1/(v+k)) (the paper "
                                   "Park et al. used); v2: log-determinant of the ReLU-code Hamming kernel.")] = "v1",
    k: Annotated[float, O(help="v1 regulariser added to each eigenvalue (Mellor et al.: 1e-5; > 0).",
                          callback=in_range("k"))] = 1e-5,
    group_by: Annotated[str, O(help="Checkpoint metadata key that names a checkpoint's group.")] = "method",
    reference: Annotated[Optional[str], O(help="Group the others are tested against (Welch t, Holm-adjusted; Hedges' "
                                               "g); 'none' for no tests. Default: scratch when there is such a group "
                                               "(e.g. not for foreign files alone), else no tests.")] = None,
    confidence: Annotated[float, O(help="Confidence level of the interval, in (0, 1) (the paper: 0.99).",
                                   callback=in_range("confidence"))] = 0.99,
    interval: Annotated[str, O(help="t = Student t quantile (4.604 at 99% with 5 models); normal = 2.576 at 99%, "
                                    "as the paper computed it.")] = "t",
    csv: Annotated[Optional[Path], O(help="Write every raw score (one row per checkpoint per batch) as CSV.")] = None,
    json: Annotated[Optional[Path], O(help="Write settings, raw scores and group statistics as JSON.")] = None,
    html: Annotated[Optional[Path], O(help="Write an offline interactive plot (plotly inlined) as HTML.")] = None,
    device: Annotated[str, O(help="auto | cpu | cuda.")] = "auto",
    dataset: Dataset = None,
    data_dir: DataDir = None,
    arch: Arch = None,
    arch_kwargs: ArchKwargs = None,
    image_size: ImageSize = None,
):
    """Representation diversity per group of checkpoints: mean over models, spread, interval and tests."""
    from tqdm import tqdm

    from kdprobe.checkpoints.format import load_checkpoint
    from kdprobe.data.datasets import load_dataset
    from kdprobe.probes.diversity_table import DiversitySettings, DiversityTable, ModelScore, summarize_groups
    from kdprobe.errors import KdprobeError
    from kdprobe.files.outputs import check_outputs
    from kdprobe.checkpoints.inputs import check_model_data, require_distinct, same_data
    from kdprobe.data.preprocess import input_size_of, parse_image_size
    from kdprobe.probes.diversity import BN_MODES, OUTPUTS, VARIANTS, jacobian_scores, probe_batches
    from kdprobe.stats import INTERVALS
    from kdprobe.writers.diversity_files import write_diversity_csv, write_diversity_json
    from kdprobe.writers.diversity_plot import write_diversity_html
    from trainers.loop import resolve_device

    for name, value, allowed in (("--bn", bn, BN_MODES), ("--output", output, OUTPUTS), ("--variant", variant, VARIANTS),
                                 ("--interval", interval, INTERVALS), ("--split", split, ("train", "test"))):
        if value not in allowed:
            raise KdprobeError(f"expected {name} one of {', '.join(allowed)}; got {value!r}")
    if runs < 1 or batch_size < 2:
        raise KdprobeError(f"expected --runs >= 1 and --batch-size >= 2, got {runs} and {batch_size}")
    ref = None if reference is None or reference.lower() == "none" else reference
    dev = resolve_device(device)

    archs, size = arch_choice(arch, arch_kwargs), parse_image_size(image_size)
    paths = expand_paths(checkpoints)
    archs.check_used(paths)
    check_outputs("diversity", {"--csv": (csv, "csv"), "--json": (json, "json"), "--html": (html, "html")},
                  {"CHECKPOINTS": paths})
    loaded = [load_checkpoint(p, **archs.for_path(p), map_location="cpu", finite=True) for p in paths]
    unknown = [str(ck.path) for ck in loaded if not ck.meta.get("dataset")]
    if unknown and dataset is None:
        raise KdprobeError(f"expected every checkpoint to record its dataset, got none in {unknown[0]} (a foreign "
                           "file?); pass --dataset (and --data-dir) to probe it")
    require_distinct(loaded, "models")  # a copied file is not a second trained model
    first = loaded[0].meta
    # one dataset: equal content fingerprints (a moved folder is the same data), else equal names
    other = None if dataset is not None else next((ck for ck in loaded if same_data(ck.meta, first) is False or (
        same_data(ck.meta, first) is None and str(ck.meta["dataset"]) != str(first["dataset"]))), None)
    if other is not None:
        raise KdprobeError(f"expected checkpoints of one dataset, got {loaded[0].path} trained on "
                           f"{loaded[0].meta['dataset']} and {other.path} on {other.meta['dataset']} (other data); "
                           "probe each dataset separately")
    missing = [str(ck.path) for ck in loaded if ck.meta.get(group_by) is None]
    if missing:
        raise KdprobeError(f"expected metadata key {group_by!r} in every checkpoint, missing in {missing[0]}; "
                           f"pass another --group-by (e.g. method or seed)")
    names = sorted({str(ck.meta[group_by]) for ck in loaded})
    if reference is None:
        ref = "scratch" if "scratch" in names else None
    elif ref is not None and ref not in names:  # before any scoring
        raise KdprobeError(f"expected the reference group {ref!r} among the groups {names}; pass one of them with "
                           "--reference (or --reference none)")
    explicit = dataset is not None
    data = load_dataset(*loaded[0].data_source(dataset, data_dir))
    dataset = data.name
    x_all, _ = data.split(split)
    fits = set()
    for ck in loaded:  # input shape, classes and data identity, before any scoring
        note = check_model_data(ck, data, explicit=explicit, image_size=size)
        if note:
            typer.echo(note, err=True)
        fits.add(input_size_of(ck.model))
    if len(fits) > 1:  # the scores are taken w.r.t. the stored images, but their models see other sizes
        typer.echo(f"note: the checkpoints take different image sizes ({', '.join(str(f or 'native') for f in fits)}); "
                   "every Jacobian is taken w.r.t. the stored images", err=True)
    row = x_all[0].numel() * (data.num_classes if output == "full" else 1)
    if variant == "v1" and batch_size > row - 1:
        raise KdprobeError(f"expected --batch-size <= {row - 1} for Jacobian rows of length {row} "
                           f"({tuple(x_all.shape[1:])} inputs, --output {output}), got {batch_size}; the correlation "
                           f"matrix would be singular, so use --batch-size {min(row - 1, len(x_all))} or --output full")

    batches = [b.to(dev) for b in probe_batches(data, split, runs, batch_size, seed)]
    opts = dict(variant=variant, bn=bn, output=output, k=k)
    scores = []
    for ck in tqdm(loaded, desc="diversity", unit="ckpt", file=sys.stderr, dynamic_ncols=True):
        ck.model.to(dev)
        vals = jacobian_scores(ck.model, batches, **opts)
        ck.model.to("cpu")  # one checkpoint on the device at a time
        scores.append(ModelScore.from_values(str(ck.path), str(ck.meta[group_by]), ck.meta.get("seed"), vals))
    groups = summarize_groups(scores, reference=ref, confidence=confidence, interval=interval)
    settings = DiversitySettings(batch_size=batch_size, runs=runs, split=split, bn=bn, output=output, variant=variant,
                                 k=k, seed=seed, dataset=dataset, group_by=group_by, reference=ref,
                                 confidence=confidence, interval=interval)

    typer.echo(f"Jacobian-correlation score (Mellor et al. 2020; higher = more diverse) on {dataset}: N={batch_size}, "
               f"split={split}, bn={bn}, output={output}, variant={variant}, runs={runs}, seed={seed}, k={k:g}, "
               f"{len(scores)} checkpoints")
    shown = [{"group": g.group, "n": f"{g.n_models}{'*' if g.uses_batch_values else ''}", "mean": _f(g.mean),
              "std": _f(g.std), "sem": _f(g.sem), f"±{confidence * 100:g}% CI": _f(g.half_width),
              "p(Holm)": _f(g.p_holm, ".3g"), "g": _f(g.hedges_g, ".2f")} for g in groups]
    typer.echo(table(shown))
    typer.echo(f"unit = one checkpoint (its mean over {runs} batches); CI = {interval} quantile x sem; "
               + (f"p = Welch two-sided vs {ref}, Holm-adjusted; g = Hedges' g vs {ref}" if ref else "no tests"))
    if any(g.uses_batch_values for g in groups):
        typer.echo(f"* one checkpoint: std/CI/p use its {runs} batch values (probe-batch spread, not model spread)")
    if bn == "train":
        typer.echo("note: bn=train mixes the inputs through batch statistics; the rows are not per-sample gradients")
    if csv:
        write_diversity_csv(scores, groups, settings, csv)
    if json:
        write_diversity_json(scores, groups, settings, json)
    if html:
        write_diversity_html(DiversityTable(settings, tuple(scores), tuple(groups)), html)
