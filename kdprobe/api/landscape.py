"""kdprobe.landscape and kdprobe.interpolate: the loss surface around a checkpoint on a random plane (Li et al.
2018) and the loss along the straight line between two checkpoints, with their results.

Both take checkpoints as paths, `kdprobe.Checkpoint` objects or plain `torch.nn.Module`s (then `dataset=`
names their data), fit the dataset's images to the model (size, normalization), and run in memory unless
given a file: `h5=` (or `out=`) is where a surface is saved while it is computed, and re-running the same
call continues from what that file holds. Keyword arguments are the CLI's options, with the CLI's defaults;
`kdprobe landscape` and `kdprobe interpolate` call these functions. Under torchrun the points are split
across ranks; every rank returns the whole result and rank 0 writes the files."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from kdprobe.api.results import data_frame, suffix_of
from kdprobe.errors import KdprobeError

__all__ = ["landscape", "interpolate", "LandscapeResult", "InterpolationResult"]

# what --out may end in (the .h5 file is always written too)
OUT_SUFFIXES = (".vtk", ".vts", ".h5", ".html")
# what .save(path) writes, by suffix
SAVE_KINDS = {".vtk": "vtk", ".vts": "vts", ".h5": "h5", ".html": "html", ".htm": "html", ".json": "json",
              ".csv": "csv", ".pdf": "pdf", ".svg": "svg", ".png": "png"}


def _nan_list(a) -> list:
    import numpy as np

    return np.asarray(a, np.float64).tolist()


class _Grid:
    """What LandscapeResult and InterpolationResult share: the split, the frame, and saving by suffix."""

    command = ""
    settings: dict

    @property
    def split(self) -> str:
        return str(self.settings["split"])

    def to_frame(self):
        """One row per point (see .records()) as a pandas DataFrame."""
        return data_frame(self.records(), f"{self.command} result")

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write by suffix, through the CLI's writers: .h5 (the command's HDF5 file; an existing surface
        is replaced only with overwrite=True), .vtk / .vts (a complete result only), .html (the figures),
        .json (.to_dict(), nan as null), .csv (.records()), .pdf / .svg / .png (the 2-D figure as a static file:
        the contour map of a surface, the loss and accuracy of a path). Files are written atomically; another
        kind of file is never replaced. Returns the path."""
        from kdprobe.files.io import run_scope
        from kdprobe.files.outputs import check_outputs

        kind = suffix_of(path, SAVE_KINDS, f"{type(self).__name__}")
        with run_scope():
            check_outputs(self.command, {"path": (path, self._file_kind(kind))}, overwrite=overwrite)
            if kind in ("pdf", "svg", "png"):
                from kdprobe.writers.static_figures import render

                render(self.figure(), path)
            else:
                self._write(Path(path), kind)
        return Path(path)

    def _file_kind(self, kind: str) -> str:
        return ("surface" if self.command == "landscape" else "line") if kind == "h5" else kind


@dataclass(frozen=True)
class LandscapeResult(_Grid):
    """The loss surface of kdprobe.landscape.

    surface: the kdprobe.probes.landscape.SurfaceResult (xcoords (nx,), ycoords (ny,), loss / acc / done
    (ny, nx) with [i, j] at (x_j, y_i); loss = mean cross-entropy, acc a fraction (0-1), nan where not done;
    directions, bn, precision, num_samples). settings: the run's settings as written to the .h5 file
    (checkpoint, checkpoint_sha256, dataset, split, samples, bn, precision, directions_sha256,
    directions_file, seed, include_bn, x, y, kdprobe_version, image_size, method, reference). log, zmax,
    vtk_height: how .save() and .figure() draw the height. name: the checkpoint's name in titles. files:
    the paths the call wrote (rank 0). evaluated: points computed by this call (fewer than the grid when it
    continued a saved surface); seconds: their time; processes: torchrun ranks; rank: this process's."""

    surface: object
    settings: dict
    name: str = "checkpoint"
    log: bool = False
    zmax: float | None = None
    vtk_height: str = "scaled"
    files: tuple = ()
    evaluated: int = 0
    seconds: float = field(default=0.0, compare=False)
    processes: int = 1
    rank: int = 0
    command = "landscape"

    @property
    def xcoords(self):
        return self.surface.xcoords

    @property
    def ycoords(self):
        return self.surface.ycoords

    @property
    def loss(self):
        return self.surface.loss

    @property
    def acc(self):
        return self.surface.acc

    @property
    def done(self):
        return self.surface.done

    @property
    def complete(self) -> bool:
        return self.surface.complete

    @property
    def directions(self):
        """The plane (kdprobe.probes.landscape.Directions); pass it, or this result, as directions= of
        another call to put a second checkpoint on the same plane."""
        return self.surface.directions

    def attrs(self) -> dict:
        """The .h5 file's attributes: the settings plus kind, format_version, split, bn, precision,
        num_samples, complete, directions_sha256, seed, include_bn."""
        from kdprobe.writers.landscape_h5 import surface_attrs

        return surface_attrs(self.surface, split=self.split, settings=self.settings)

    def to_dict(self) -> dict:
        """The .h5 file as plain data (kdprobe landscape has no --json), in kdprobe's JSON envelope
        (kdprobe.files.documents): kind "surface", settings (the file's attributes), data {"xcoordinates": [nx],
        "ycoordinates": [ny], "<split>_loss": [[nx] * ny] (nats), "<split>_acc": ... (fractions), "done":
        [[bool]]}, every array as nested lists (nan where not done). The directions, large, are left out: they
        are .directions."""
        from kdprobe.files.documents import envelope

        s = self.split
        return envelope("surface", self.attrs(), {
            "xcoordinates": _nan_list(self.xcoords), "ycoordinates": _nan_list(self.ycoords),
            f"{s}_loss": _nan_list(self.loss), f"{s}_acc": _nan_list(self.acc), "done": self.done.astype(bool).tolist()})

    def records(self) -> list[dict]:
        """One record per grid point, row by row (y outer, x inner, as the arrays are stored):
        x, y (the point's coordinates along directions 1 and 2), loss (nats), acc (a fraction), done."""
        out = []
        for i, yv in enumerate(self.ycoords.tolist()):
            for j, xv in enumerate(self.xcoords.tolist()):
                out.append({"x": xv, "y": yv, "loss": float(self.loss[i, j]), "acc": float(self.acc[i, j]),
                            "done": bool(self.done[i, j])})
        return out

    def _title(self) -> str:
        seed = int(self.settings.get("seed", -1))
        plane = f"seed {seed}" if seed >= 0 else "saved directions"
        return f"{self.name}: {self.split} loss on the filter-normalized plane ({plane})"

    def figure(self, view: str = "contour"):
        """The plotly figure the HTML page shows: view='contour' (the contour map, drawn everywhere) or
        'surface' (the 3-D surface, drawn where WebGL works)."""
        from kdprobe.writers.landscape_plot import surface_figures

        if view not in ("contour", "surface"):
            raise KdprobeError(f"expected view 'contour' or 'surface', got {view!r}")
        contour, surface = surface_figures(self.surface, log=self.log, zmax=self.zmax, split=self.split,
                                           title=self._title())
        return contour if view == "contour" else surface

    def _write(self, path: Path, kind: str) -> None:
        if kind == "h5":
            from kdprobe.writers.landscape_h5 import write_surface_h5

            write_surface_h5(self.surface, path, split=self.split, settings=self.settings)
        elif kind in ("vtk", "vts"):
            from kdprobe.writers.landscape_vtk import write_surface_vtk

            write_surface_vtk(self.surface, path, log=self.log, zmax=self.zmax, vtk_height=self.vtk_height,
                              title=f"kdprobe {self.split} loss, {self.name}")
        elif kind == "html":
            from kdprobe.writers.landscape_plot import write_surface_html

            vtk = next((p.suffix.lower() for p in map(Path, self.files) if p.suffix.lower() in (".vtk", ".vts")), None)
            write_surface_html(self.surface, path, log=self.log, zmax=self.zmax, split=self.split,
                               title=self._title(), vtk_suffix=vtk)
        elif kind == "json":
            from kdprobe.writers.landscape_tables import write_grid_json

            write_grid_json(self.to_dict(), path)
        else:
            from kdprobe.writers.landscape_tables import write_grid_csv

            write_grid_csv(self.records(), path)


@dataclass(frozen=True)
class InterpolationResult(_Grid):
    """The loss along (1-t) A + t B of kdprobe.interpolate.

    line: the kdprobe.probes.landscape.LineResult (coords = t (n,), loss, acc (a fraction), done; bn,
    precision, num_samples). settings: as written to the .h5 file (checkpoint_a, checkpoint_b, their
    sha256, dataset, split, samples, bn, range, steps, precision, kdprobe_version, image_size, and where
    t = 0 and 1 are on the path loss_barrier, loss_barrier_t, error_barrier, error_barrier_t). barrier: the
    kdprobe.probes.barrier.Barrier (Frankle et al. 2020), or None with barrier_note saying why. names: the
    two checkpoints' names in titles. log, zmax, vtk_height, files, evaluated, seconds, processes, rank: as
    in LandscapeResult."""

    line: object
    settings: dict
    barrier: object = None
    barrier_note: str = ""
    names: tuple = ("A", "B")
    log: bool = False
    zmax: float | None = None
    vtk_height: str = "scaled"
    files: tuple = ()
    evaluated: int = 0
    seconds: float = field(default=0.0, compare=False)
    processes: int = 1
    rank: int = 0
    command = "interpolate"

    @property
    def coords(self):
        return self.line.coords

    @property
    def loss(self):
        return self.line.loss

    @property
    def acc(self):
        return self.line.acc

    @property
    def done(self):
        return self.line.done

    def attrs(self) -> dict:
        """The .h5 file's attributes: the settings plus kind, format_version, split, bn, precision,
        num_samples, complete."""
        from kdprobe.writers.landscape_h5 import line_attrs

        return line_attrs(self.line, split=self.split, settings=self.settings)

    def to_dict(self) -> dict:
        """The .h5 file as plain data (kdprobe interpolate has no --json), in kdprobe's JSON envelope
        (kdprobe.files.documents): kind "path", settings (the file's attributes), data {"coordinates": [n] (the
        t values), "<split>_loss": [n] (nats), "<split>_acc": [n] (fractions), "done": [n]}."""
        from kdprobe.files.documents import envelope

        s = self.split
        return envelope("path", self.attrs(), {
            "coordinates": _nan_list(self.coords), f"{s}_loss": _nan_list(self.loss), f"{s}_acc": _nan_list(self.acc),
            "done": self.done.astype(bool).tolist()})

    def records(self) -> list[dict]:
        """One record per point on the path: t, loss (nats), acc (a fraction), done."""
        return [{"t": t, "loss": float(lo), "acc": float(ac), "done": bool(d)}
                for t, lo, ac, d in zip(self.coords.tolist(), self.loss, self.acc, self.done)]

    def _title(self) -> str:
        a, b = self.names
        return f"{a} (t=0) to {b} (t=1): {self.split} loss"

    def figure(self):
        """The plotly figure the HTML page shows: loss (left axis) and accuracy (right axis) along t."""
        from kdprobe.writers.landscape_plot import line_figure

        return line_figure(self.line, log=self.log, zmax=self.zmax, split=self.split, title=self._title())

    def _write(self, path: Path, kind: str) -> None:
        if kind == "h5":
            from kdprobe.writers.landscape_h5 import write_line_h5

            write_line_h5(self.line, path, split=self.split, settings=self.settings)
        elif kind in ("vtk", "vts"):
            from kdprobe.writers.landscape_vtk import write_line_vtk

            write_line_vtk(self.line, path, log=self.log, zmax=self.zmax, vtk_height=self.vtk_height)
        elif kind == "html":
            from kdprobe.writers.landscape_plot import write_line_html

            write_line_html(self.line, path, log=self.log, zmax=self.zmax, split=self.split, title=self._title())
        elif kind == "json":
            from kdprobe.writers.landscape_tables import write_grid_json

            write_grid_json(self.to_dict(), path)
        else:
            from kdprobe.writers.landscape_tables import write_grid_csv

            write_grid_csv(self.records(), path)


# ---- the runs ---------------------------------------------------------------------------------------------

def _check_options(choices: dict, numbers: dict, extents: dict) -> None:
    """One-line errors for options out of range (the CLI checks the same ranges when it parses them)."""
    from kdprobe.ranges import PROBE_RANGES, check_extent

    for name, (value, allowed) in choices.items():
        if value not in allowed:
            raise KdprobeError(f"expected --{name.replace('_', '-')} one of {', '.join(allowed)}, got {value!r}")
    for name, value in numbers.items():
        if value is not None:
            PROBE_RANGES[name].check(value, name)
    for name, text in extents.items():
        check_extent(text, name)


def _arch_choice(arch, arch_kwargs):
    """The --arch / --arch-kwargs choice; arch_kwargs may also be a dict (for every file)."""
    import json

    from kdprobe.checkpoints.selection import arch_choice

    if isinstance(arch_kwargs, dict):
        arch_kwargs = json.dumps(arch_kwargs)
    return arch_choice(arch, arch_kwargs)


def _input_path(item) -> Path | None:
    """The file behind a checkpoint argument (a path, or a loaded kdprobe.Checkpoint's), for the output check."""
    from kdprobe.checkpoints.format import LoadedCheckpoint

    if isinstance(item, (str, Path)):
        return Path(item)
    return Path(item.path) if isinstance(item, LoadedCheckpoint) else None


def _display(item, ck) -> str:
    """How settings name a checkpoint: its path as given, a Checkpoint's path, or 'module'."""
    return str(Path(item)) if isinstance(item, (str, Path)) else str(ck.path)


def output_paths(command: str, out, h5, html: bool, inputs: dict, overwrite: bool = False):
    """(h5, vtk, html) paths of a run, checked by the one output rule (kdprobe.files.outputs) before any
    work: out picks its file type by suffix (.vtk/.vts/.h5/.html), the .h5 file goes next to it unless h5
    names one, html=True adds the page next to out (or h5). All None: the run stays in memory."""
    from kdprobe.files.outputs import check_outputs

    out = None if out is None else Path(out)
    h5 = None if h5 is None else Path(h5)
    if out is not None and out.suffix.lower() not in OUT_SUFFIXES:
        raise KdprobeError(f"expected --out ending in {', '.join(OUT_SUFFIXES)}, got {out.name!r}; rename it")
    base = out if out is not None else h5
    if base is None:
        if html:
            raise KdprobeError("html=True writes the page next to out= (or h5=); pass one of them, or call "
                               ".save('NAME.html') on the result")
        return None, None, None
    h5_path = h5 or out.with_suffix(".h5")
    vtk_path = out if out is not None and out.suffix.lower() in (".vtk", ".vts") else None
    html_path = out if out is not None and out.suffix.lower() == ".html" else (
        base.with_suffix(".html") if html else None)
    h5_role = "--h5" if h5 is not None else ("--out" if h5_path == out else "the .h5 next to --out")
    html_role = "--out" if html_path == out else f"the .html next to {'--out' if out is not None else '--h5'}"
    outputs = {h5_role: (h5_path, "surface" if command == "landscape" else "line")}
    if vtk_path is not None:
        outputs["--out"] = (vtk_path, out.suffix.lower()[1:])
    if html_path is not None:
        outputs[html_role] = (html_path, "html")
    check_outputs(command, outputs, inputs, overwrite=overwrite, keep=(h5_role,))
    return h5_path, vtk_path, html_path


def _plane(directions, model, *, seed: int, include_bn: bool):
    """(Directions, the file they came from or ''): drawn with seed/include_bn, or taken from `directions`
    (a surface .h5 path, a Directions, a SurfaceResult or a LandscapeResult), checked against the model."""
    from kdprobe.probes.landscape import Directions, SurfaceResult, check_directions, make_directions
    from kdprobe.writers.landscape_h5 import read_directions

    if directions is None:
        dirs = make_directions(model, seed=seed, include_bn=include_bn)
        check_directions(model, dirs)
        return dirs, ""
    if isinstance(directions, LandscapeResult):
        directions = directions.surface
    if isinstance(directions, SurfaceResult):
        directions = directions.directions
    if isinstance(directions, Directions):
        try:
            check_directions(model, directions)
        except KdprobeError as e:
            raise KdprobeError(f"directions: {e}") from None
        return directions, ""
    try:
        dirs = read_directions(directions)
    except KdprobeError as e:
        raise KdprobeError(f"--directions: {e}; pass a surface .h5 written by kdprobe landscape") from None
    try:
        check_directions(model, dirs)
    except KdprobeError as e:
        raise KdprobeError(f"--directions {directions}: {e}") from None
    return dirs, str(Path(directions))


def _resume(h5_path, settings: dict, xs, ys, overwrite: bool):
    """The partial surface saved in h5_path by an earlier run with the same settings, or None (no file, or
    overwrite); a file of other settings, or one that cannot be read, is a one-line error."""
    from kdprobe.probes.landscape_run import resume_differences
    from kdprobe.writers.landscape_h5 import read_surface_h5

    if h5_path is None or overwrite or not h5_path.exists():
        return None
    try:
        partial, old = read_surface_h5(h5_path)
    except KdprobeError as e:
        raise KdprobeError(f"{h5_path} exists but cannot be resumed ({e}); pass --overwrite to replace "
                           f"it, or choose another --out/--h5") from None
    diff = resume_differences(old, settings, partial, xs, ys)
    if diff:
        raise KdprobeError(f"expected the settings of the earlier run in {h5_path}, got a different "
                           f"{'; '.join(diff)}; pass --overwrite to discard that file, or choose "
                           f"another --out/--h5")
    return partial


def landscape(checkpoint, *, out: str | os.PathLike | None = None, x: str = "-1:1:51", y: str = "-1:1:51",
              split: str = "train", samples: int = 2048, bn: str = "eval", seed: int = 0, include_bn: bool = False,
              directions=None, h5: str | os.PathLike | None = None, html: bool = False, log: bool = False,
              vtk_height: str = "scaled", zmax: float | None = None, points_per_batch: int | None = None,
              batch_size: int | None = None, precision: str = "fp32", save_every: float = 10.0,
              overwrite: bool = False, dataset: str | None = None, data_dir=None, arch=None, arch_kwargs=None,
              image_size=None, device: str = "auto", note=None, progress: bool = True) -> LandscapeResult:
    """The loss surface around a checkpoint (Li et al. 2018): mean cross-entropy and accuracy at
    theta + x d1 + y d2 on a grid, d1 and d2 seeded Gaussian directions, filter-normalized.

    checkpoint: a path, a kdprobe.Checkpoint or an nn.Module (with dataset=). x, y: the grid along each
    direction as 'min:max:num'. split, samples: the first `samples` examples of the split (0 = all), no
    augmentation. bn: 'eval' (the checkpoint's BatchNorm statistics) or 'recompute' (re-estimated at every
    point). seed, include_bn: the directions (1-D parameters get zero unless include_bn); directions=
    reuses a plane instead: a surface .h5 path, a Directions, or a LandscapeResult. precision: fp32 (the
    exact surface), tf32, bf16 or auto. points_per_batch, batch_size: grid points and samples per forward.
    Files: none by default (in memory). h5= saves the surface while it is computed (every save_every
    seconds) and a rerun with the same settings continues from it (overwrite=True discards a file of other
    settings); out= also writes .vtk / .vts / .html by its suffix, with the .h5 next to it unless h5= names
    one; html=True adds the page next to it. log, zmax, vtk_height: the drawn height (the stored arrays are
    never changed). dataset, data_dir, arch, arch_kwargs, image_size, device: as the CLI's options.
    note(text) receives remarks (default: stderr); progress=False hides the progress bar.
    Returns a LandscapeResult (.surface, .settings; .to_dict(), .to_frame(), .save(path), .figure()). A
    Ctrl-C raises kdprobe.errors.Interrupted saying what the .h5 file keeps."""
    from kdprobe.files.io import run_scope

    with run_scope():
        return _landscape(checkpoint, out=out, x=x, y=y, split=split, samples=samples, bn=bn, seed=seed,
                          include_bn=include_bn, directions=directions, h5=h5, html=html, log=log,
                          vtk_height=vtk_height, zmax=zmax, points_per_batch=points_per_batch,
                          batch_size=batch_size, precision=precision, save_every=save_every, overwrite=overwrite,
                          dataset=dataset, data_dir=data_dir, arch=arch, arch_kwargs=arch_kwargs,
                          image_size=image_size, device=device, note=note, progress=progress)


def _landscape(checkpoint, *, out, x, y, split, samples, bn, seed, include_bn, directions, h5, html, log,
               vtk_height, zmax, points_per_batch, batch_size, precision, save_every, overwrite, dataset,
               data_dir, arch, arch_kwargs, image_size, device, note, progress) -> LandscapeResult:
    from kdprobe.data.preprocess import input_size_of, parse_image_size
    from kdprobe.errors import Interrupted
    from kdprobe.files.io import WriteError
    from kdprobe.probes.landscape import check_grid_memory, compute_surface, parse_grid
    from kdprobe.probes.landscape_eval import BN_MODES, resolve_precision
    from kdprobe.probes.checkpoint_set import stderr_note
    from kdprobe.probes.landscape_run import Saver, checkpoint_of, grid_samples, run_process
    from kdprobe.version import __version__
    from kdprobe.writers.landscape_h5 import write_surface_h5
    from kdprobe.writers.landscape_vtk import VTK_HEIGHTS

    note = note or stderr_note
    _check_options({"bn": (bn, BN_MODES), "vtk_height": (vtk_height, VTK_HEIGHTS)},
                   {"samples": samples, "seed": seed, "zmax": zmax, "points_per_batch": points_per_batch,
                    "batch_size": batch_size, "save_every": save_every}, {"x": x, "y": y})
    xs, ys = parse_grid(x), parse_grid(y)
    archs, size = _arch_choice(arch, arch_kwargs), parse_image_size(image_size)
    archs.check_used([p for p in [checkpoint] if isinstance(p, (str, Path))])
    reused = directions if isinstance(directions, (str, Path)) else None
    h5_path, vtk_path, html_path = output_paths("landscape", out, h5, html,
                                                {"CHECKPOINT": _input_path(checkpoint), "--directions": reused},
                                                overwrite)
    check_grid_memory(xs.size * ys.size, html=html_path is not None)  # before any allocation or loading
    proc = run_process(device)
    dev = proc.device
    try:
        ck = checkpoint_of(checkpoint, device=dev, dataset=dataset, name="module", archs=archs)
        name, xt, yt = grid_samples(ck, dataset=dataset, data_dir=data_dir, split=split, samples=samples,
                                    device=dev, image_size=size, note=note)
        dirs, dirs_file = _plane(directions, ck.model, seed=seed, include_bn=include_bn)
        settings = {"checkpoint": _display(checkpoint, ck), "checkpoint_sha256": ck.sha256, "dataset": name,
                    "split": split, "samples": int(len(yt)), "bn": bn,
                    "precision": resolve_precision(precision, dev), "directions_sha256": dirs.fingerprint(),
                    "directions_file": dirs_file, "seed": -1 if dirs.seed is None else dirs.seed,
                    "include_bn": bool(dirs.include_bn), "x": x, "y": y, "kdprobe_version": __version__,
                    "image_size": input_size_of(ck.model),  # None (native) reads back as a missing attribute
                    "method": str(ck.meta.get("method", "")), "reference": "Li et al. 2018, filter-normalized"}
        resume = _resume(h5_path, settings, xs, ys, overwrite)
        write = None if h5_path is None else (lambda r: write_surface_h5(r, h5_path, split=split, settings=settings))
        before = 0 if resume is None else int(resume.done.sum())
        saver = Saver(write, xs.size * ys.size, "landscape", save_every, proc.rank, kept=before, bar=progress)
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
            if proc.rank == 0:
                saver.save(res)
        except WriteError as e:
            kept = saver.kept_note(h5_path)
            raise (e.with_note(kept) if kept else e) from None
        except KeyboardInterrupt:
            raise Interrupted(saver.kept_note(h5_path) or None) from None
        display = Path(str(ck.path)).name
        result = LandscapeResult(res, settings, name=display, log=log, zmax=zmax, vtk_height=vtk_height,
                                 evaluated=int(res.done.sum()) - before, seconds=secs, processes=proc.world,
                                 rank=proc.rank)
        if proc.rank != 0:
            return result
        written = [p for p in (h5_path,) if p is not None]
        for path, kind in ((vtk_path, "vtk"), (html_path, "html")):
            if path is not None:
                result._write(path, kind)
                written.append(path)
                result = replace(result, files=tuple(written))  # the page's no-WebGL note names the VTK file
        return replace(result, files=tuple(written))
    finally:
        proc.close()


def interpolate(a, b, *, out: str | os.PathLike | None = None, steps: int = 41, range: str = "0:1",  # noqa: A002
                split: str = "train", samples: int = 2048, bn: str = "eval", h5: str | os.PathLike | None = None,
                html: bool = False, log: bool = False, vtk_height: str = "scaled", zmax: float | None = None,
                points_per_batch: int | None = None, batch_size: int | None = None, precision: str = "fp32",
                dataset: str | None = None, data_dir=None, arch=None, arch_kwargs=None, image_size=None,
                device: str = "auto", note=None, progress: bool = True) -> InterpolationResult:
    """Loss and accuracy along the straight line theta(t) = (1-t) A + t B between two checkpoints of one
    architecture (BatchNorm buffers follow the path too), and the barrier on it (Frankle et al. 2020).

    a, b: paths, kdprobe.Checkpoint objects or nn.Modules (with dataset=). steps, range: `steps` values of t
    evenly over range 'min:max' (default 0:1; e.g. -0.5:1.5 extrapolates). split, samples, bn, precision,
    points_per_batch, batch_size: as in kdprobe.landscape ('recompute' re-estimates BN statistics at every
    t, the fair choice for a barrier). Files: none by default; h5= writes the path's .h5 file, out= also a
    .vtk / .vts / .html by its suffix (the .h5 next to it unless h5= names one), html=True adds the page.
    log, zmax, vtk_height: the drawn height. dataset, data_dir, arch, arch_kwargs, image_size, device: as
    the CLI's options. note(text) receives remarks; progress=False hides the progress bar.
    Returns an InterpolationResult (.line, .settings, .barrier; .to_dict(), .to_frame(), .save(path),
    .figure())."""
    from kdprobe.files.io import run_scope

    with run_scope():
        return _interpolate(a, b, out=out, steps=steps, t_range=range, split=split, samples=samples, bn=bn, h5=h5,
                            html=html, log=log, vtk_height=vtk_height, zmax=zmax, points_per_batch=points_per_batch,
                            batch_size=batch_size, precision=precision, dataset=dataset, data_dir=data_dir,
                            arch=arch, arch_kwargs=arch_kwargs, image_size=image_size, device=device, note=note,
                            progress=progress)


def _interpolate(a, b, *, out, steps, t_range, split, samples, bn, h5, html, log, vtk_height, zmax,
                 points_per_batch, batch_size, precision, dataset, data_dir, arch, arch_kwargs, image_size,
                 device, note, progress) -> InterpolationResult:
    from kdprobe.checkpoints.inputs import same_data
    from kdprobe.data.preprocess import input_size_of, parse_image_size
    from kdprobe.probes.barrier import barrier as path_barrier
    from kdprobe.probes.landscape import check_grid_memory, interpolate as run_interpolate, parse_grid
    from kdprobe.probes.landscape_eval import BN_MODES, resolve_precision
    from kdprobe.probes.checkpoint_set import stderr_note
    from kdprobe.probes.landscape_run import Saver, checkpoint_of, grid_samples, run_process
    from kdprobe.version import __version__
    from kdprobe.writers.landscape_vtk import VTK_HEIGHTS

    note = note or stderr_note
    _check_options({"bn": (bn, BN_MODES), "vtk_height": (vtk_height, VTK_HEIGHTS)},
                   {"steps": steps, "samples": samples, "zmax": zmax, "points_per_batch": points_per_batch,
                    "batch_size": batch_size}, {"range": t_range})
    ts = parse_grid(t_range, num=steps)
    archs, size = _arch_choice(arch, arch_kwargs), parse_image_size(image_size)
    archs.check_used([p for p in (a, b) if isinstance(p, (str, Path))])
    h5_path, vtk_path, html_path = output_paths("interpolate", out, h5, html,
                                                {"A": _input_path(a), "B": _input_path(b)})
    check_grid_memory(ts.size, html=html_path is not None, what="path")
    proc = run_process(device)
    dev = proc.device
    try:
        ck_a = checkpoint_of(a, device=dev, dataset=dataset, name="module_a", archs=archs)
        ck_b = checkpoint_of(b, device=dev, dataset=dataset, name="module_b", archs=archs)
        if dataset is None and same_data(ck_a.meta, ck_b.meta) is False:
            raise KdprobeError(f"expected two checkpoints of one dataset, got {ck_a.path} trained on "
                               f"{ck_a.meta.get('dataset')} and {ck_b.path} on {ck_b.meta.get('dataset')} (other "
                               "data); pass --dataset to evaluate both on one")
        name, xt, yt = grid_samples(ck_a, dataset=dataset, data_dir=data_dir, split=split, samples=samples,
                                    device=dev, also=(ck_b,), image_size=size, note=note)
        saver = Saver(None, ts.size, "interpolate", 1e9, proc.rank, bar=progress)
        t0 = time.perf_counter()
        try:
            res = run_interpolate(ck_a.model, ck_b.model, xt, yt, ts, bn=bn, precision=precision,
                                  points_per_batch=points_per_batch, batch_size=batch_size, progress=saver)
        finally:
            saver.bar.close()
        secs = time.perf_counter() - t0
        settings = {"checkpoint_a": _display(a, ck_a), "checkpoint_b": _display(b, ck_b),
                    "checkpoint_a_sha256": ck_a.sha256, "checkpoint_b_sha256": ck_b.sha256, "dataset": name,
                    "split": split, "samples": int(len(yt)), "bn": bn, "range": t_range, "steps": steps,
                    "precision": resolve_precision(precision, dev), "kdprobe_version": __version__,
                    "image_size": input_size_of(ck_a.model)}
        try:
            bar, why = path_barrier(res), ""
            settings.update(loss_barrier=bar.loss_barrier, loss_barrier_t=bar.t_loss,
                            error_barrier=bar.error_barrier, error_barrier_t=bar.t_error)
        except KdprobeError as e:  # t = 0 or 1 is not a grid point: no barrier, and say why
            bar, why = None, str(e)
        names = (Path(str(ck_a.path)).name, Path(str(ck_b.path)).name)
        result = InterpolationResult(res, settings, barrier=bar, barrier_note=why, names=names, log=log, zmax=zmax,
                                     vtk_height=vtk_height, evaluated=int(res.done.sum()), seconds=secs,
                                     processes=proc.world, rank=proc.rank)
        if proc.rank != 0:
            return result
        written = []
        for path, kind in ((h5_path, "h5"), (vtk_path, "vtk"), (html_path, "html")):
            if path is not None:
                result._write(path, kind)
                written.append(path)
        return replace(result, files=tuple(written))
    finally:
        proc.close()
