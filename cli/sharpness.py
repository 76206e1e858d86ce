"""`kdprobe sharpness`: top Hessian eigenvalues, Hessian trace and eigenvalue density of the training loss, per group."""
from __future__ import annotations

from typing import Annotated

import typer

from cli.common import table
from cli.probe_set import (Figures, figure_paths, Arch, ArchKwargs, ImageSize,
                           Confidence, Csv, DataDir, Dataset, Device, GroupBy, Html, Interval, Json, Reference,
                           Samples, Seed, Split, check_set_outputs, group_table, in_range, write_outputs)

O = typer.Option


def sharpness(
    checkpoints: Annotated[list[str], typer.Argument(help="Checkpoint files or globs ('runs/*/*.pt'), one dataset."
                                                          " Sharpness of the training loss (mean cross-entropy over the"
                                                          " first --samples examples of --split) at each checkpoint: top"
                                                          " Hessian eigenvalue(s) with iterations and residual ||Hv -"
                                                          " lambda v||, Hessian trace by Hutchinson with its standard"
                                                          " error, optional SLQ density; exact Hessian-vector products"
                                                          " through torch.func. Groups compared with the reference"
                                                          " (Welch + Holm, Hedges' g; unit = one checkpoint).")],
    split: Split = "train",
    samples: Samples = 1024,
    top_k: Annotated[int, O(help="Number of top eigenvalues (largest magnitude; at most 1,000 and the model's "
                                 "parameter count).", callback=in_range("top_k"))] = 1,
    method: Annotated[str, O(help="lanczos (default): Ritz values of a Lanczos run with full reorthogonalization, "
                                  "far fewer products for the same tolerance; power: power iteration with deflation "
                                  "(PyHessian's method).")] = "lanczos",
    iterations: Annotated[int, O(help="Cap on Lanczos steps, or power steps per eigenvalue (PyHessian: 100; at most "
                                      "10,000).", callback=in_range("iterations"))] = 100,
    tol: Annotated[float, O(help="Relative tolerance on the eigenvalues: power stops when the relative change is "
                                 "below it; lanczos also needs its error bound min(r, r^2/gap) below tol x |value| "
                                 "(0 = always --iterations; PyHessian: 1e-3).", callback=in_range("tol"))] = 1e-3,
    trace_samples: Annotated[int, O(help="Cap on the random vectors for the trace (each estimate is kept).",
                                    callback=in_range("trace_samples"))] = 100,
    trace_method: Annotated[str, O(help="hutch++ (default): the Lanczos basis (or, with --method power, Hutch++'s "
                                        "sketch) is deflated exactly and Hutchinson runs on the rest, much lower "
                                        "variance; hutchinson: plain Rademacher v^T H v.")] = "hutch++",
    trace_rtol: Annotated[float, O(help="Stop sampling the trace once its standard error is below this fraction of "
                                        "|trace| (at least 10 vectors; 0 = always --trace-samples).",
                                   callback=in_range("tol"))] = 0.0,
    trace_sketch: Annotated[int, O(help="hutch++: directions deflated (Lanczos runs at least this many steps; with "
                                        "--method power, 2 x this extra products).",
                                   callback=in_range("top_k"))] = 10,
    density: Annotated[bool, O("--density", help="Also the eigenvalue density by stochastic Lanczos quadrature.")] = False,
    lanczos_steps: Annotated[int, O(help="Lanczos steps per density run (at most 10,000 and the model's parameter "
                                         "count).", callback=in_range("lanczos_steps"))] = 80,
    density_runs: Annotated[int, O(help="Random starts averaged in the density.", callback=in_range("density_runs"))
                            ] = 1,
    bn: Annotated[str, O(help="eval (default): BN with the checkpoint's running statistics, every sample's loss its "
                              "own; train: BN with each minibatch's statistics (running ones unused, untouched), so the "
                              "loss and its Hessian depend on how samples are grouped into --batch-size batches.")
                  ] = "eval",
    batch_size: Annotated[int, O(help="Samples per minibatch; with --bn eval the result does not depend on it.",
                                 callback=in_range("batch_size"))] = 128,
    vectors_per_pass: Annotated[int, O(help="Hutchinson vectors that share one forward+gradient pass per minibatch "
                                            "(memory: 2 x this x parameters).", callback=in_range("vectors_per_pass"))
                                ] = 25,
    hvp: Annotated[str, O(help="reuse: vjp of grad, forward+gradient once per minibatch for many vectors; jvp: "
                               "forward-over-reverse, recomputed per vector. Both exact.")] = "reuse",
    keep_graphs: Annotated[bool, O("--keep-graphs", help="Keep every minibatch's graph for the whole run (faster "
                                                         "power iteration; memory about 3.5 MB per CIFAR image for "
                                                         "a ResNet-20).")] = False,
    group_by: GroupBy = "method",
    reference: Reference = None,
    confidence: Confidence = 0.99,
    interval: Interval = "t",
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
    """Sharpness of the training loss: top Hessian eigenvalues, Hessian trace, eigenvalue density."""
    from kdprobe.api.probes import sharpness as run

    figs = figure_paths("sharpness", figures, (html, json, csv))
    check_set_outputs("sharpness", checkpoints, (csv, json, html), figs)
    result = run(checkpoints, split=split, samples=samples, top_k=top_k, method=method, iterations=iterations,
                 tol=tol, trace_samples=trace_samples, trace_method=trace_method, trace_rtol=trace_rtol,
                 trace_sketch=trace_sketch, density=density, lanczos_steps=lanczos_steps, density_runs=density_runs,
                 bn=bn, batch_size=batch_size, vectors_per_pass=vectors_per_pass, hvp=hvp, keep_graphs=keep_graphs,
                 group_by=group_by, reference=reference, confidence=confidence, interval=interval, seed=seed,
                 arch=arch, arch_kwargs=arch_kwargs, image_size=image_size, dataset=dataset, data_dir=data_dir,
                 device=device, note=lambda text: typer.echo(text, err=True))
    tables, settings = result.tables, result.settings
    rows, ref = tables.table("checkpoints"), settings["reference"]
    typer.echo(f"Sharpness of the {split} loss on {settings['dataset']}: {settings['samples_used']} samples, bn={bn}, "
               f"top-{top_k} by {method} (<= {iterations} steps, tol {tol:g}), trace by {trace_method} from "
               f"<= {trace_samples} vectors" + (f" (stop at relative se {trace_rtol:g})" if trace_rtol else "")
               + f", seed {seed}")
    typer.echo(table([{"checkpoint": r["checkpoint"], "group": r["group"], "loss": r["loss"],
                       "top eigenvalue": r["top_eigenvalue"], "residual": r["top_residual"],
                       "iters": r["top_iterations"], "trace": r["trace"], "± se": r["trace_se"]} for r in rows]))
    typer.echo(table(group_table(tables.table("groups"), ["top_eigenvalue", "trace"], digits=3, tested=2)))
    typer.echo(f"mean over checkpoints ± {confidence * 100:g}% CI ({interval}); unit = one checkpoint; "
               + (f"p(Holm), g = vs {ref} (Welch, Holm-adjusted over groups; Hedges' g)" if ref else "no tests"))
    for row, r in zip(rows, result.details):
        if not r.trace_stable:  # the interval may be too narrow: say so, with what to do
            typer.echo(f"warning: {row['checkpoint']}: trace {r.trace:.4g} [{r.trace_low:.4g}, {r.trace_high:.4g}] "
                       f"({r.trace_confidence:.0%}, {r.trace_vectors} vectors) not yet stable: {r.trace_note}")
    if bn == "train":
        typer.echo(f"note: bn=train uses each minibatch's statistics: the loss depends on --batch-size ({batch_size})")
    write_outputs(tables, "checkpoints", csv, json, html, figs)
