"""`kdprobe landscape` (Li et al. 2018 loss surface around a checkpoint) and
`kdprobe interpolate` (loss along the straight line between two checkpoints).

Both run under `torchrun --nproc-per-node K kdprobe ...`: the points are split across
ranks and rank 0 writes the files. The work (loading, samples, directions, resume, files) is
kdprobe.landscape / kdprobe.interpolate (kdprobe/api/landscape.py); these commands parse, print.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cli.common import Arch, ArchKwargs, DataDir, Dataset, ImageSize, checked, in_range, table
from cli.probe_set import Figures, figure_outputs, figure_paths, write_figures
from kdprobe.probes.landscape_run import Saver as _Saver  # noqa: F401 (the library's saver, patched here by tests)
from kdprobe.ranges import check_extent

O = typer.Option


def _extent(flag: str):
    """Parse-time check that a min:max[:num] range stays within kdprobe.ranges.PROBE_RANGES['extent']."""
    return checked(lambda text: check_extent(text, flag))


def _echo_err(text: str) -> None:
    typer.echo(text, err=True)


def landscape(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint at the centre of the surface (theta).")],
    out: Annotated[Optional[Path], O(help="Output file; its extension picks the format: .vtk (legacy VTK, binary), "
                                          ".vts (XML VTK structured grid), .h5, .html. The HDF5 file is always "
                                          "written too (same name, .h5). Default: <checkpoint>_landscape.vtk.")] = None,
    x: Annotated[str, O("--x", help="Grid along direction 1 as min:max:num (ends within +-10000).",
                        callback=_extent("--x"))] = "-1:1:51",
    y: Annotated[str, O("--y", help="Grid along direction 2 as min:max:num (need not match --x).",
                        callback=_extent("--y"))] = "-1:1:51",
    split: Annotated[str, O(help="Evaluate on train | test (no augmentation).")] = "train",
    samples: Annotated[int, O(help="Use the first N examples of the split, in dataset order; 0 = all.",
                              callback=in_range("samples"))] = 2048,
    bn: Annotated[str, O(help="BatchNorm statistics: eval = the checkpoint's running statistics; recompute = "
                              "re-estimated at every grid point on the samples (train-mode pass, cumulative "
                              "average), then eval. recompute is about twice as slow.")] = "eval",
    seed: Annotated[int, O(help="Seed of the two Gaussian directions.", callback=in_range("seed"))] = 0,
    include_bn: Annotated[bool, O("--include-bn", help="Also perturb 1-D parameters (biases, BN scale/shift), "
                                                        "each scaled to its own norm; default: zero there.")] = False,
    directions: Annotated[Optional[Path], O(help="Reuse the directions saved in this kdprobe landscape .h5 "
                                                 "(compare two checkpoints on one plane); --seed and "
                                                 "--include-bn are then taken from the file.")] = None,
    h5: Annotated[Optional[Path], O(help="Where to write the HDF5 file (default: --out with .h5).")] = None,
    html: Annotated[bool, O("--html", help="Also write an interactive contour + 3-D plot (offline HTML).")] = False,
    figures: Annotated[Optional[str], O(help="Also write the contour map and the 3-D view as static files: a "
                                             "comma-separated list of pdf, svg, png (e.g. pdf,png), drawn with "
                                             "matplotlib: OUT.pdf and OUT-3d.pdf next to --out.")] = None,
    log: Annotated[bool, O("--log", help="Height z = log(loss) in the VTK/HTML output (arrays keep both).")] = False,
    vtk_height: Annotated[str, O(help="VTK z: scaled (default) = the height rescaled to [0, the grid's larger "
                                      "extent], so ParaView opens a surface as tall as it is wide (the raw loss "
                                      "is a needle); raw = the height itself. The point arrays loss, log_loss, "
                                      "accuracy are never changed.")] = "scaled",
    zmax: Annotated[Optional[float], O(help="Clip the loss at this value (loss units, before --log) for the "
                                            "height; the stored arrays are never clipped.", callback=in_range("zmax"))
                    ] = None,
    points_per_batch: Annotated[Optional[int], O(help="Grid points per forward pass (torch.func.vmap); "
                                                      "default 8 on GPU, 1 on CPU where vmap is slower.",
                                                 callback=in_range("points_per_batch"))] = None,
    batch_size: Annotated[Optional[int], O(help="Samples per forward pass (default 1024 on GPU; on CPU "
                                                          "64 in fp32, 128 in bf16).", callback=in_range("batch_size"))
                          ] = None,
    precision: Annotated[str, O(help="fp32 | tf32 | bf16 | auto. fp32 (default, every device) = the exact surface "
                                      "the reference computes, with TF32 off on GPUs; tf32 = a GPU's TF32 matmuls "
                                      "and convolutions (10-bit mantissas, recorded in the file); bf16 = bf16 "
                                      "autocast, faster on GPUs and AVX512-BF16/AMX CPUs but moves losses by up to "
                                      "~1%; auto = bf16 where the hardware has bf16 units, else fp32. Loss sums are "
                                      "fp32 in every case.")] = "fp32",
    save_every: Annotated[float, O(help="Save partial results to the HDF5 file at most this often (seconds); "
                                         "re-running the same command resumes.", callback=in_range("save_every"))
                          ] = 10.0,
    overwrite: Annotated[bool, O("--overwrite", help="Discard an existing HDF5 file made with other settings.")
                         ] = False,
    dataset: Dataset = None,
    data_dir: DataDir = None,
    arch: Arch = None,
    arch_kwargs: ArchKwargs = None,
    image_size: ImageSize = None,
    device: Annotated[str, O(help="auto | cpu | cuda.")] = "auto",
):
    """Loss surface of Li et al. 2018 around a checkpoint: filter-normalized random plane, HDF5 + VTK + HTML."""
    import numpy as np

    from kdprobe.api.landscape import landscape as run

    out = out or checkpoint.with_name(checkpoint.stem + "_landscape.vtk")
    figs = _check_figures("landscape", figures, out, ("", "-3d"), {"CHECKPOINT": checkpoint})
    r = run(checkpoint, out=out, x=x, y=y, split=split, samples=samples, bn=bn, seed=seed, include_bn=include_bn,
            directions=directions, h5=h5, html=html, log=log, vtk_height=vtk_height, zmax=zmax,
            points_per_batch=points_per_batch, batch_size=batch_size, precision=precision, save_every=save_every,
            overwrite=overwrite, dataset=dataset, data_dir=data_dir, arch=arch, arch_kwargs=arch_kwargs,
            image_size=image_size, device=device, note=_echo_err)
    if r.rank != 0:
        return
    xs, ys, loss, acc = r.xcoords, r.ycoords, r.loss, r.acc
    i0, j0 = np.unravel_index(np.argmin(loss), loss.shape)
    ci, cj = np.argmin(np.abs(ys)), np.argmin(np.abs(xs))
    typer.echo(table([
        {"point": f"centre ({xs[cj]:g}, {ys[ci]:g})", "loss": float(loss[ci, cj]), "acc": float(acc[ci, cj])},
        {"point": f"min ({xs[j0]:g}, {ys[i0]:g})", "loss": float(loss[i0, j0]), "acc": float(acc[i0, j0])},
        {"point": "max", "loss": float(loss.max()),
         "acc": float(acc[np.unravel_index(np.argmax(loss), loss.shape)])}]))
    new, secs = r.evaluated, r.seconds
    typer.echo(f"{ys.size}x{xs.size} grid, {r.settings['samples']} {split} samples, bn={bn}, "
               f"precision={r.surface.precision}, {r.processes} process(es): {new} points in {secs:.1f}s "
               f"({new / max(secs, 1e-9):.2f} points/s)")
    typer.echo("wrote " + ", ".join(str(p) for p in r.files + tuple(
        write_figures([r.figure("contour"), r.figure("surface")], figs) if figs else ())))


def _check_figures(command: str, figures, out, suffixes, inputs) -> list:
    """The --figures paths next to --out, checked (and locked) before any work."""
    from kdprobe.files.outputs import check_outputs

    figs = figure_paths(command, figures, (out,), suffixes)
    if figs:
        check_outputs(command, figure_outputs(figs), inputs)
    return figs


def interpolate(
    checkpoint_a: Annotated[Path, typer.Argument(help="Checkpoint A (t = 0).")],
    checkpoint_b: Annotated[Path, typer.Argument(help="Checkpoint B (t = 1), same architecture.")],
    out: Annotated[Optional[Path], O(help="Output file: .vtk | .vts | .h5 | .html; the HDF5 file is always "
                                          "written too. Default: <A>_to_<B>.h5.")] = None,
    steps: Annotated[int, O(help="Number of t values (>= 2).", callback=in_range("steps"))] = 41,
    range: Annotated[str, O("--range", callback=_extent("--range"),  # noqa: A002 (the option is --range)
                             help="t interval as min:max; theta(t) = (1-t) A + t B. Default 0:1 "
                                             "(both end points on the path); e.g. -0.5:1.5 with --steps 81 "
                                             "extrapolates and still hits t = 0 and 1.")] = "0:1",
    split: Annotated[str, O(help="Evaluate on train | test (no augmentation).")] = "train",
    samples: Annotated[int, O(help="Use the first N examples of the split, in dataset order; 0 = all.",
                              callback=in_range("samples"))] = 2048,
    bn: Annotated[str, O(help="eval = interpolated running statistics (BN buffers follow the path too); "
                              "recompute = re-estimated at every t on the samples.")] = "eval",
    h5: Annotated[Optional[Path], O(help="Where to write the HDF5 file (default: --out with .h5).")] = None,
    html: Annotated[bool, O("--html", help="Also write an interactive line plot (offline HTML).")] = False,
    figures: Annotated[Optional[str], O(help="Also write the line plot as static files: a comma-separated list of "
                                             "pdf, svg, png (e.g. pdf,png), drawn with matplotlib, next to --out.")
                       ] = None,
    log: Annotated[bool, O("--log", help="Height z = log(loss) in the VTK/HTML output.")] = False,
    vtk_height: Annotated[str, O(help="VTK z: scaled (default, to [0, the t extent]) | raw (see kdprobe "
                                      "landscape --help).")] = "scaled",
    zmax: Annotated[Optional[float], O(help="Clip the loss at this value for the VTK/HTML height.",
                                       callback=in_range("zmax"))] = None,
    points_per_batch: Annotated[Optional[int], O(help="Points per forward pass (default 8 GPU, 1 CPU).",
                                                 callback=in_range("points_per_batch"))] = None,
    batch_size: Annotated[Optional[int], O(help="Samples per forward pass (default 1024 on GPU; on CPU "
                                                          "64 in fp32, 128 in bf16).", callback=in_range("batch_size"))
                          ] = None,
    precision: Annotated[str, O(help="fp32 (default) | tf32 | bf16 | auto (see kdprobe landscape --help).")] = "fp32",
    dataset: Dataset = None,
    data_dir: DataDir = None,
    arch: Arch = None,
    arch_kwargs: ArchKwargs = None,
    image_size: ImageSize = None,
    device: Annotated[str, O(help="auto | cpu | cuda.")] = "auto",
):
    """Loss and accuracy along the straight line (1-t) A + t B between two checkpoints (BN buffers included)."""
    import numpy as np

    from kdprobe.api.landscape import interpolate as run

    out = out or checkpoint_a.with_name(f"{checkpoint_a.stem}_to_{checkpoint_b.stem}.h5")
    figs = _check_figures("interpolate", figures, out, ("",), {"CHECKPOINT_A": checkpoint_a, "CHECKPOINT_B": checkpoint_b})
    r = run(checkpoint_a, checkpoint_b, out=out, steps=steps, range=range, split=split, samples=samples, bn=bn,
            h5=h5, html=html, log=log, vtk_height=vtk_height, zmax=zmax, points_per_batch=points_per_batch,
            batch_size=batch_size, precision=precision, dataset=dataset, data_dir=data_dir, arch=arch,
            arch_kwargs=arch_kwargs, image_size=image_size, device=device, note=_echo_err)
    if r.rank != 0:
        return
    ts, bar = r.coords, r.barrier
    rows = []
    for label, i in (("A (t=0)", np.argmin(np.abs(ts))), ("B (t=1)", np.argmin(np.abs(ts - 1))),
                     ("max on path", int(np.argmax(r.loss))), ("min on path", int(np.argmin(r.loss)))):
        rows.append({"point": label, "t": float(ts[i]), "loss": float(r.loss[i]), "acc": float(r.acc[i])})
    typer.echo(table(rows))
    typer.echo(f"barrier (Frankle et al. 2020; max over t in [0,1] of value - linear interpolation of the ends; "
               f"bn={bn}): loss {bar.loss_barrier:.4f} at t={bar.t_loss:g}, error {bar.error_barrier:.4f} "
               f"(fraction) at t={bar.t_error:g}" if bar else f"barrier: not computed ({r.barrier_note})")
    typer.echo(f"{ts.size} points, {r.settings['samples']} {split} samples, bn={bn}, precision={r.line.precision}, "
               f"{r.processes} process(es), {r.seconds:.1f}s")
    typer.echo("wrote " + ", ".join(str(p) for p in r.files + tuple(write_figures([r.figure()], figs) if figs else ())))
