"""`kdprobe diversity`: Jacobian-correlation score (Mellor et al. 2020) of checkpoints, per training method."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Optional

import typer

from cli.common import Arch, ArchKwargs, DataDir, Dataset, ImageSize, in_range, ranged, table
from kdprobe.ranges import MAX_BATCH, Range

from cli.probe_set import Figures, figure_outputs, figure_paths, write_figures  # noqa: E402

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
    figures: Figures = None,
    device: Annotated[str, O(help="auto | cpu | cuda.")] = "auto",
    dataset: Dataset = None,
    data_dir: DataDir = None,
    arch: Arch = None,
    arch_kwargs: ArchKwargs = None,
    image_size: ImageSize = None,
):
    """Representation diversity per group of checkpoints: mean over models, spread, interval and tests."""
    from kdprobe.api.diversity import diversity as run
    from kdprobe.files.outputs import check_outputs
    from kdprobe.probes.checkpoint_set import checkpoint_paths
    from kdprobe.writers.diversity_files import write_diversity_csv, write_diversity_json
    from kdprobe.writers.diversity_plot import write_diversity_html

    figs = figure_paths("diversity", figures, (html, json, csv))
    check_outputs("diversity", {"--csv": (csv, "csv"), "--json": (json, "json"), "--html": (html, "html"),
                                **figure_outputs(figs)}, {"CHECKPOINTS": checkpoint_paths(checkpoints)})
    result = run(checkpoints, runs=runs, batch_size=batch_size, split=split, seed=seed, bn=bn, output=output,
                 variant=variant, k=k, group_by=group_by, reference=reference, confidence=confidence,
                 interval=interval, device=device, dataset=dataset, data_dir=data_dir, arch=arch,
                 arch_kwargs=arch_kwargs, image_size=image_size, note=lambda text: typer.echo(text, err=True))
    scores, groups, st = result.scores, result.groups, result.settings
    ref = st.reference

    typer.echo(f"Jacobian-correlation score (Mellor et al. 2020; higher = more diverse) on {st.dataset}: N={batch_size}, "
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
        write_diversity_csv(scores, groups, st, csv)
    if json:
        write_diversity_json(scores, groups, st, json)
    if html:
        write_diversity_html(result.table, html)
    if figs:
        typer.echo("wrote " + ", ".join(map(str, write_figures([result.figure()], figs))))
