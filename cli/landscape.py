"""`kdprobe landscape` (Li et al. 2018 loss surface around a checkpoint) and
`kdprobe interpolate` (loss along the straight line between two checkpoints).

Both run under `torchrun --nproc-per-node K kdprobe ...`: the points are split across
ranks and rank 0 writes the files.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from cli.common import Arch, ArchKwargs, DataDir, Dataset, ImageSize, arch_choice, checked, in_range, table
from kdprobe.ranges import check_extent

O = typer.Option


def _extent(flag: str):
    """Parse-time check that a min:max[:num] range stays within kdprobe.ranges.PROBE_RANGES['extent']."""
    return checked(lambda text: check_extent(text, flag))


OUT_SUFFIXES = (".vtk", ".vts", ".h5", ".html")
# settings that must be equal for a saved partial surface to be continued
RESUME_KEYS = ("checkpoint_sha256", "dataset", "split", "samples", "bn", "precision", "directions_sha256",
               "seed", "include_bn", "x", "y", "image_size")


def _setup(device: str):
    """Device for this process and (rank, world): joins torchrun's group when WORLD_SIZE > 1."""
    from trainers.distributed import DistContext

    ctx = DistContext.from_env(device)  # the same device/process-group rule as training
    return ctx.device, (ctx.rank, ctx.world_size)


def _load_samples(ck, dataset, data_dir, split, samples, dev, also=(), image_size=None):
    """The first `samples` examples of `split` (no augmentation), normalized, on `dev`; `ck` (and the
    checkpoints in `also`) checked against the data first (kdprobe.checkpoints.inputs.check_model_data)."""
    from kdprobe.data.datasets import load_dataset
    from kdprobe.errors import KdprobeError
    from kdprobe.checkpoints.inputs import check_model_data

    if split not in ("train", "test"):
        raise KdprobeError(f"expected --split train or test, got {split!r}")
    name, ddir = ck.data_source(dataset, data_dir)
    data = load_dataset(name, ddir)
    for c in (ck, *also):
        note = check_model_data(c, data, explicit=dataset is not None, image_size=image_size)
        if note:
            typer.echo(note, err=True)
    name = data.name
    if samples < 0:
        raise KdprobeError(f"expected --samples >= 0 (0 = the whole split), got {samples}")
    x, y = data.head(split, samples)
    n, seen = len(y), len(set(y.tolist()))
    if seen < data.num_classes:
        typer.echo(f"note: the first {n} {split} examples cover {seen} of {data.num_classes} classes "
                   f"(the split is stored in that order); raise --samples to cover more", err=True)
    return name, x.to(dev), y.to(dev)


def _paths(command: str, out: Path, h5: Optional[Path], html: bool, inputs: dict, overwrite: bool = False):
    """(h5, vtk, html) paths of a landscape/interpolate run, checked by the one output rule before any work."""
    from kdprobe.errors import KdprobeError
    from kdprobe.files.outputs import check_outputs

    if out.suffix.lower() not in OUT_SUFFIXES:
        raise KdprobeError(f"expected --out ending in {', '.join(OUT_SUFFIXES)}, got {out.name!r}; rename it")
    h5_path = h5 or out.with_suffix(".h5")
    vtk_path = out if out.suffix.lower() in (".vtk", ".vts") else None
    html_path = out if out.suffix.lower() == ".html" else (out.with_suffix(".html") if html else None)
    h5_role = "--h5" if h5 is not None else ("--out" if h5_path == out else "the .h5 next to --out")
    html_role = "--out" if html_path == out else "the .html next to --out"
    check_outputs(command, {h5_role: (h5_path, "surface" if command == "landscape" else "line"),
                            "--out": (vtk_path, out.suffix.lower()[1:]) if vtk_path else (None, ""),
                            html_role: (html_path, "html")},
                  inputs, overwrite=overwrite, keep=(h5_role,))
    return h5_path, vtk_path, html_path


class _Saver:
    """Progress bar on every rank 0, and a throttled atomic HDF5 save of the partial result.

    `kept` is how many finished points the file on disk holds; after a failed write (full disk)
    nothing more is attempted, so the error is reported once and the last good file stays."""

    def __init__(self, write, total: int, desc: str, every_s: float, rank: int, kept: int = 0):
        from tqdm import tqdm

        self.write, self.every_s, self.rank, self.last, self.latest = write, every_s, rank, time.monotonic(), None
        self.total, self.kept, self.failed = total, kept, False
        self.bar = tqdm(total=total, desc=desc, unit="pt", file=sys.stderr, dynamic_ncols=True, disable=rank != 0)

    def save(self, partial) -> None:
        """Write `partial` now (rank 0), unless an earlier write failed."""
        if self.rank != 0 or self.failed:
            return
        try:
            self.write(partial)
        except BaseException:
            self.failed = True
            raise
        self.kept = int(partial.done.sum())

    def __call__(self, partial) -> None:
        self.latest = partial
        self.bar.update(int(partial.done.sum()) - self.bar.n)
        if time.monotonic() - self.last >= self.every_s:
            self.save(partial)
            self.last = time.monotonic()

    def flush(self) -> None:
        self.bar.close()
        if self.latest is not None:
            self.save(self.latest)

    def kept_note(self, path) -> str:
        """What a rerun continues from, for an error or Ctrl-C message."""
        if self.kept:
            return f"{path} keeps {self.kept} of {self.total} points"
        return "no finished points were saved" if self.failed else ""


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

    import kdprobe
    from kdprobe.checkpoints.format import load_checkpoint
    from kdprobe.errors import Interrupted, KdprobeError
    from kdprobe.files.io import WriteError
    from kdprobe.probes.distributed import shutdown
    from kdprobe.data.preprocess import input_size_of, parse_image_size
    from kdprobe.probes.landscape import (check_directions, check_grid_memory, compute_surface, make_directions,
                                          parse_grid)
    from kdprobe.probes.landscape_eval import BN_MODES, resolve_precision
    from kdprobe.writers.landscape_h5 import read_directions, read_surface_h5, write_surface_h5
    from kdprobe.writers.landscape_plot import write_surface_html
    from kdprobe.writers.landscape_vtk import VTK_HEIGHTS, write_surface_vtk

    if bn not in BN_MODES:
        raise KdprobeError(f"expected --bn one of {', '.join(BN_MODES)}, got {bn!r}")
    if vtk_height not in VTK_HEIGHTS:
        raise KdprobeError(f"expected --vtk-height one of {', '.join(VTK_HEIGHTS)}, got {vtk_height!r}")
    xs, ys = parse_grid(x), parse_grid(y)
    archs, size = arch_choice(arch, arch_kwargs), parse_image_size(image_size)
    archs.check_used([checkpoint])
    out = out or checkpoint.with_name(checkpoint.stem + "_landscape.vtk")
    h5_path, vtk_path, html_path = _paths("landscape", out, h5, html,
                                          {"CHECKPOINT": checkpoint, "--directions": directions}, overwrite)
    check_grid_memory(xs.size * ys.size, html=html_path is not None)  # before any allocation or loading
    dev, (rank, world) = _setup(device)
    try:
        ck = load_checkpoint(checkpoint, **archs.for_path(checkpoint), map_location=dev, finite=True)
        name, xt, yt = _load_samples(ck, dataset, data_dir, split, samples, dev, image_size=size)
        if directions:
            try:
                dirs = read_directions(directions)
            except KdprobeError as e:
                raise KdprobeError(f"--directions: {e}; pass a surface .h5 written by kdprobe landscape") from None
            try:
                check_directions(ck.model, dirs)
            except KdprobeError as e:
                raise KdprobeError(f"--directions {directions}: {e}") from None
        else:
            dirs = make_directions(ck.model, seed=seed, include_bn=include_bn)
            check_directions(ck.model, dirs)
        settings = {"checkpoint": str(checkpoint), "checkpoint_sha256": ck.sha256, "dataset": name,
                    "split": split, "samples": int(len(yt)), "bn": bn,
                    "precision": resolve_precision(precision, dev), "directions_sha256": dirs.fingerprint(),
                    "directions_file": str(directions or ""), "seed": -1 if dirs.seed is None else dirs.seed,
                    "include_bn": bool(dirs.include_bn), "x": x, "y": y, "kdprobe_version": kdprobe.__version__,
                    "image_size": input_size_of(ck.model),  # None (native) reads back as a missing attribute
                    "method": str(ck.meta.get("method", "")), "reference": "Li et al. 2018, filter-normalized"}
        resume = None
        if h5_path.exists() and not overwrite:
            try:
                resume, old = read_surface_h5(h5_path)
            except KdprobeError as e:
                raise KdprobeError(f"{h5_path} exists but cannot be resumed ({e}); pass --overwrite to replace "
                                   f"it, or choose another --out/--h5") from None
            shown = lambda v: "" if v is None else str(v)  # noqa: E731 - None is stored as '' (and may be absent)
            diff = [f"{k} (file {shown(old.get(k)):.24}, now {shown(settings[k]):.24})" for k in RESUME_KEYS
                    if shown(old.get(k)) != shown(settings[k])]
            if not diff and not (np.array_equal(resume.xcoords, xs) and np.array_equal(resume.ycoords, ys)):
                diff = ["grid coordinates"]
            if diff:
                raise KdprobeError(f"expected the settings of the earlier run in {h5_path}, got a different "
                                   f"{'; '.join(diff)}; pass --overwrite to discard that file, or choose "
                                   f"another --out/--h5")
        save = lambda r: write_surface_h5(r, h5_path, split=split, settings=settings)  # noqa: E731
        before = 0 if resume is None else int(resume.done.sum())
        saver = _Saver(save, xs.size * ys.size, "landscape", save_every, rank, kept=before)
        if resume is not None:
            saver.bar.update(before)
        t0 = time.perf_counter()
        try:
            try:
                res = compute_surface(ck.model, xt, yt, xcoords=xs, ycoords=ys, directions=dirs, bn=bn,
                                      precision=precision, points_per_batch=points_per_batch,
                                      batch_size=batch_size, resume=resume, progress=saver)
            finally:
                saver.flush()  # a Ctrl-C or crash keeps every finished point
            secs = time.perf_counter() - t0
            if rank != 0:
                return
            saver.save(res)
        except WriteError as e:
            note = saver.kept_note(h5_path)
            raise (e.with_note(note) if note else e) from None
        except KeyboardInterrupt:
            raise Interrupted(saver.kept_note(h5_path) or None) from None
        written = [h5_path]
        if vtk_path:
            write_surface_vtk(res, vtk_path, log=log, zmax=zmax, title=f"kdprobe {split} loss, {checkpoint.name}",
                              vtk_height=vtk_height)
            written.append(vtk_path)
        if html_path:
            write_surface_html(res, html_path, log=log, zmax=zmax, split=split,
                               title=f"{checkpoint.name}: {split} loss on the filter-normalized plane (seed {seed})")
            written.append(html_path)
        i0, j0 = np.unravel_index(np.argmin(res.loss), res.loss.shape)
        ci, cj = np.argmin(np.abs(ys)), np.argmin(np.abs(xs))
        new = int(res.done.sum()) - before
        typer.echo(table([
            {"point": f"centre ({xs[cj]:g}, {ys[ci]:g})", "loss": float(res.loss[ci, cj]),
             "acc %": float(res.acc[ci, cj])},
            {"point": f"min ({xs[j0]:g}, {ys[i0]:g})", "loss": float(res.loss[i0, j0]),
             "acc %": float(res.acc[i0, j0])},
            {"point": "max", "loss": float(res.loss.max()), "acc %": float(res.acc[np.unravel_index(
                np.argmax(res.loss), res.loss.shape)])}]))
        typer.echo(f"{ys.size}x{xs.size} grid, {len(yt)} {split} samples, bn={bn}, precision={res.precision}, "
                   f"{world} process(es): {new} points in {secs:.1f}s ({new / max(secs, 1e-9):.2f} points/s)")
        typer.echo("wrote " + ", ".join(str(p) for p in written))
    finally:
        shutdown()


def interpolate(
    checkpoint_a: Annotated[Path, typer.Argument(help="Checkpoint A (t = 0).")],
    checkpoint_b: Annotated[Path, typer.Argument(help="Checkpoint B (t = 1), same architecture.")],
    out: Annotated[Optional[Path], O(help="Output file: .vtk | .vts | .h5 | .html; the HDF5 file is always "
                                          "written too. Default: <A>_to_<B>.h5.")] = None,
    steps: Annotated[int, O(help="Number of t values (>= 2).", callback=in_range("steps"))] = 41,
    range_: Annotated[str, O("--range", callback=_extent("--range"),
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

    import kdprobe
    from kdprobe.checkpoints.format import load_checkpoint
    from kdprobe.errors import KdprobeError
    from kdprobe.checkpoints.inputs import same_data
    from kdprobe.probes.barrier import barrier as path_barrier
    from kdprobe.probes.distributed import shutdown
    from kdprobe.data.preprocess import input_size_of, parse_image_size
    from kdprobe.probes.landscape import check_grid_memory, interpolate as run_interpolate, parse_grid
    from kdprobe.probes.landscape_eval import BN_MODES, resolve_precision
    from kdprobe.writers.landscape_h5 import write_line_h5
    from kdprobe.writers.landscape_plot import write_line_html
    from kdprobe.writers.landscape_vtk import VTK_HEIGHTS, write_line_vtk

    if bn not in BN_MODES:
        raise KdprobeError(f"expected --bn one of {', '.join(BN_MODES)}, got {bn!r}")
    if steps < 2:
        raise KdprobeError(f"expected --steps >= 2, got {steps}")
    if vtk_height not in VTK_HEIGHTS:
        raise KdprobeError(f"expected --vtk-height one of {', '.join(VTK_HEIGHTS)}, got {vtk_height!r}")
    ts = parse_grid(range_, num=steps)
    archs, size = arch_choice(arch, arch_kwargs), parse_image_size(image_size)
    archs.check_used([checkpoint_a, checkpoint_b])
    out = out or checkpoint_a.with_name(f"{checkpoint_a.stem}_to_{checkpoint_b.stem}.h5")
    h5_path, vtk_path, html_path = _paths("interpolate", out, h5, html, {"A": checkpoint_a, "B": checkpoint_b})
    check_grid_memory(ts.size, html=html_path is not None, what="path")
    dev, (rank, world) = _setup(device)
    try:
        a = load_checkpoint(checkpoint_a, **archs.for_path(checkpoint_a), map_location=dev, finite=True)
        b = load_checkpoint(checkpoint_b, **archs.for_path(checkpoint_b), map_location=dev, finite=True)
        if dataset is None and same_data(a.meta, b.meta) is False:
            raise KdprobeError(f"expected two checkpoints of one dataset, got {a.path} trained on "
                               f"{a.meta.get('dataset')} and {b.path} on {b.meta.get('dataset')} (other data); "
                               "pass --dataset to evaluate both on one")
        name, xt, yt = _load_samples(a, dataset, data_dir, split, samples, dev, also=(b,), image_size=size)
        saver = _Saver(lambda r: None, ts.size, "interpolate", 1e9, rank)
        t0 = time.perf_counter()
        try:
            res = run_interpolate(a.model, b.model, xt, yt, ts, bn=bn, precision=precision,
                                  points_per_batch=points_per_batch, batch_size=batch_size, progress=saver)
        finally:
            saver.bar.close()
        secs = time.perf_counter() - t0
        if rank != 0:
            return
        settings = {"checkpoint_a": str(checkpoint_a), "checkpoint_b": str(checkpoint_b),
                    "checkpoint_a_sha256": a.sha256, "checkpoint_b_sha256": b.sha256, "dataset": name,
                    "split": split, "samples": int(len(yt)), "bn": bn, "range": range_, "steps": steps,
                    "precision": resolve_precision(precision, dev), "kdprobe_version": kdprobe.__version__,
                    "image_size": input_size_of(a.model)}
        try:
            bar, why = path_barrier(res), ""
            settings.update(loss_barrier=bar.loss_barrier, loss_barrier_t=bar.t_loss,
                            error_barrier=bar.error_barrier, error_barrier_t=bar.t_error)
        except KdprobeError as e:  # t = 0 or 1 is not a grid point: no barrier, and say why
            bar, why = None, str(e)
        write_line_h5(res, h5_path, split=split, settings=settings)
        written = [h5_path]
        if vtk_path:
            write_line_vtk(res, vtk_path, log=log, zmax=zmax, vtk_height=vtk_height)
            written.append(vtk_path)
        if html_path:
            write_line_html(res, html_path, log=log, zmax=zmax, split=split,
                            title=f"{checkpoint_a.name} (t=0) to {checkpoint_b.name} (t=1): {split} loss")
            written.append(html_path)
        rows = []
        for label, i in (("A (t=0)", np.argmin(np.abs(ts))), ("B (t=1)", np.argmin(np.abs(ts - 1))),
                         ("max on path", int(np.argmax(res.loss))), ("min on path", int(np.argmin(res.loss)))):
            rows.append({"point": label, "t": float(ts[i]), "loss": float(res.loss[i]), "acc %": float(res.acc[i])})
        typer.echo(table(rows))
        typer.echo(f"barrier (Frankle et al. 2020; max over t in [0,1] of value - linear interpolation of the ends; "
                   f"bn={bn}): loss {bar.loss_barrier:.4f} at t={bar.t_loss:g}, error {bar.error_barrier:.2f} "
                   f"points at t={bar.t_error:g}" if bar else f"barrier: not computed ({why})")
        typer.echo(f"{ts.size} points, {len(yt)} {split} samples, bn={bn}, precision={res.precision}, "
                   f"{world} process(es), {secs:.1f}s")
        typer.echo("wrote " + ", ".join(str(p) for p in written))
    finally:
        shutdown()
