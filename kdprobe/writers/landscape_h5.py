"""HDF5 files for loss landscapes: the surface (or path), its directions and every setting.

Surface layout (close to Li et al.'s loss-landscape files, readable with plain h5py):
  xcoordinates (nx,), ycoordinates (ny,)        float64
  <split>_loss, <split>_acc  (ny, nx)           float64, [i, j] at (x_j, y_i);
                                                 loss in nats, acc a fraction (0-1; format 1
                                                 wrote percent, read back as fractions);
                                                 nan where not yet done
  done (ny, nx)                                  uint8, 1 where evaluated (resume state)
  xdirection/<param name>, ydirection/<name>     float32, one dataset per parameter,
                                                 keyed by its state_dict name; attrs seed, include_bn
  file attrs: kind="surface", format_version, units, split, bn, precision, num_samples,
              directions_sha256, complete, and every setting the caller passes.
Path layout: coordinates (n,), <split>_loss, <split>_acc (n,), done, same attrs, kind="path".
Every write replaces the whole file atomically, so the file is valid after every save. The
file is built in memory and written with one plain write: a full disk then fails once with a
clear errno (kdprobe.files.io.WriteError), never inside HDF5 (tracebacks per object, a crash at exit).
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import h5py
import numpy as np
import torch

from kdprobe.errors import KdprobeError
from kdprobe.files.io import atomic_write_bytes
from kdprobe.probes.landscape import Directions, LineResult, SurfaceResult

FORMAT_VERSION = 2  # 2: <split>_acc is a fraction (0-1), as every accuracy kdprobe writes; 1 held percent
#: the file attribute that says so, for readers other than kdprobe (docs/units.md)
UNITS = "loss: mean cross-entropy (nats); acc: fraction of samples classified correctly (0-1)"


def _attr(v):
    """HDF5 attributes hold numbers and strings; None becomes '' and paths become str."""
    if v is None:
        return ""
    if isinstance(v, (bool, int, float, str, np.number, np.bool_)):
        return v
    return str(v)


def _common_attrs(kind: str, split: str, result, settings: dict | None) -> dict:
    attrs = {k: _attr(v) for k, v in (settings or {}).items()}
    attrs.update(kind=kind, format_version=FORMAT_VERSION, units=UNITS, split=split, bn=result.bn,
                 precision=result.precision, num_samples=int(result.num_samples),
                 complete=bool(result.done.all()))
    return attrs


def surface_attrs(result: SurfaceResult, *, split: str = "train", settings: dict | None = None) -> dict:
    """The file attributes write_surface_h5 gives a surface: every setting (None as '', paths as str), then
    kind, format_version, units, split, bn, precision, num_samples, complete, directions_sha256, seed,
    include_bn."""
    attrs = _common_attrs("surface", split, result, settings)
    attrs.update(directions_sha256=result.directions.fingerprint(),
                 seed=-1 if result.directions.seed is None else int(result.directions.seed),
                 include_bn=bool(result.directions.include_bn))
    return attrs


def line_attrs(result: LineResult, *, split: str = "train", settings: dict | None = None) -> dict:
    """The file attributes write_line_h5 gives a path: every setting, then kind, format_version, split, bn,
    precision, num_samples, complete."""
    return _common_attrs("path", split, result, settings)


def _write_arrays(f: h5py.File, split: str, result, attrs: dict) -> None:
    f.attrs.update(attrs)
    f.create_dataset(f"{split}_loss", data=np.asarray(result.loss, np.float64))
    f.create_dataset(f"{split}_acc", data=np.asarray(result.acc, np.float64))
    f.create_dataset("done", data=np.asarray(result.done, np.uint8))


def write_directions(f: h5py.Group, directions: Directions) -> None:
    """Store both directions as groups xdirection/ydirection, one dataset per parameter."""
    for tag, d in (("xdirection", directions.x), ("ydirection", directions.y)):
        g = f.create_group(tag)
        g.attrs.update(seed=-1 if directions.seed is None else int(directions.seed),
                       include_bn=bool(directions.include_bn))
        for name, t in d.items():
            g.create_dataset(name, data=t.detach().to("cpu", torch.float32).numpy())


def _write_h5(path: str | os.PathLike, fill) -> None:
    """Build an HDF5 file in memory with fill(h5py.File), then write it atomically."""
    buf = io.BytesIO()
    with h5py.File(buf, "w") as f:
        fill(f)
    atomic_write_bytes(path, buf.getvalue())


def write_surface_h5(result: SurfaceResult, path: str | os.PathLike, *, split: str = "train",
                     settings: dict | None = None) -> None:
    """Write a (partial or complete) surface, its directions and settings, atomically."""
    def fill(f: h5py.File) -> None:
        f.create_dataset("xcoordinates", data=np.asarray(result.xcoords, np.float64))
        f.create_dataset("ycoordinates", data=np.asarray(result.ycoords, np.float64))
        _write_arrays(f, split, result, surface_attrs(result, split=split, settings=settings))
        write_directions(f, result.directions)
    _write_h5(path, fill)


def write_line_h5(result: LineResult, path: str | os.PathLike, *, split: str = "train",
                  settings: dict | None = None) -> None:
    """Write a (partial or complete) interpolation path and its settings, atomically."""
    def fill(f: h5py.File) -> None:
        f.create_dataset("coordinates", data=np.asarray(result.coords, np.float64))
        _write_arrays(f, split, result, line_attrs(result, split=split, settings=settings))
    _write_h5(path, fill)


# what a reader needs, per kind: datasets (besides <split>_loss/_acc), groups, attributes
_NEEDS = {"surface": (("xcoordinates", "ycoordinates", "done"), ("xdirection", "ydirection"),
                      ("split", "bn", "precision", "num_samples")),
          "path": (("coordinates", "done"), (), ("split", "bn", "precision", "num_samples"))}


def _open(path, kind: str) -> h5py.File:
    """Open a kdprobe HDF5 file of `kind` for reading; a wrong or incomplete file is a one-line error."""
    if not Path(path).is_file():
        raise KdprobeError(f"expected an HDF5 file at {path}, got nothing there; check the path")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise KdprobeError(f"expected a readable HDF5 file at {path}, got {e}; delete or replace it") from None
    if f.attrs.get("kind") != kind:
        got = f.attrs.get("kind", "no kind attribute")
        f.close()
        raise KdprobeError(f"expected a kdprobe {kind} file at {path}, got {got!r}; pass a {kind} file")
    datasets, groups, attrs = _NEEDS[kind]
    missing = [f"attribute {a!r}" for a in attrs if a not in f.attrs]
    split = f.attrs.get("split", "")
    if not missing:
        datasets = datasets + (f"{split}_loss", f"{split}_acc")
    missing += [f"dataset {d!r}" for d in datasets if not isinstance(f.get(d), h5py.Dataset)]
    missing += [f"group {g!r}" for g in groups if not isinstance(f.get(g), h5py.Group)]
    if missing:
        f.close()
        raise KdprobeError(f"{path} is not a complete kdprobe {kind} file (missing {', '.join(missing[:3])})")
    try:
        _check_declared_size(f, Path(path))
    except KdprobeError:
        f.close()
        raise
    return f


def _check_declared_size(f: h5py.File, path: Path) -> None:
    """Refuse, before reading, datasets that declare more data than the file can justify: an HDF5 dataset can
    declare 10^12 elements in a kilobyte (chunked, unwritten: read back as fill values), and reading allocates
    what it declares. kdprobe writes its arrays uncompressed; 64x the file (or 64 MiB) leaves room for a file
    repacked with compression, and the memory free now is a hard limit."""
    from kdprobe.runtime.machine import available_memory

    sizes: list[tuple[str, int]] = []
    f.visititems(lambda name, obj: sizes.append((name, int(obj.size) * int(obj.dtype.itemsize)))
                 if isinstance(obj, h5py.Dataset) else None)
    total = sum(n for _, n in sizes)
    limit = max(64 * path.stat().st_size, 64 << 20)
    free = available_memory()
    if free is not None:
        limit = min(limit, free)
    if total > limit:
        name = max(sizes, key=lambda s: s[1])[0]
        raise KdprobeError(f"{path} declares {total / 2**20:,.1f} MiB of arrays (largest: {name!r}) in a "
                           f"{path.stat().st_size / 2**20:,.2f} MiB file, more than kdprobe will read "
                           f"({limit / 2**20:,.1f} MiB); the file is damaged or hostile: re-create it")


def _read(path, kind: str, fn):
    """Run fn(open file) and turn any structural failure (wrong shapes, unreadable data) into one line."""
    with _open(path, kind) as f:
        try:
            return fn(f)
        except KdprobeError:
            raise
        except (KeyError, OSError, ValueError, TypeError) as e:
            why = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
            raise KdprobeError(f"{path} is not a readable kdprobe {kind} file ({why})") from None


def read_directions(path: str | os.PathLike) -> Directions:
    """The xdirection/ydirection groups of a kdprobe surface file."""
    return _read(path, "surface", _directions)


def _directions(f: h5py.File) -> Directions:
    out = []
    for tag in ("xdirection", "ydirection"):
        bad = [n for n, v in f[tag].items() if not isinstance(v, h5py.Dataset)]
        if bad or not len(f[tag]):
            raise KdprobeError(f"{f.filename} is not a complete kdprobe surface file (group {tag!r} "
                               f"{'holds no directions' if not bad else f'has a non-dataset entry {bad[0]!r}'})")
        out.append({n: torch.from_numpy(np.asarray(v)) for n, v in f[tag].items()})
    seed = int(f["xdirection"].attrs.get("seed", -1))
    return Directions(out[0], out[1], None if seed < 0 else seed, bool(f["xdirection"].attrs.get("include_bn", False)))


def _attrs(f: h5py.File) -> dict:
    return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()}


def _accuracy(f: h5py.File, values: np.ndarray) -> np.ndarray:
    """<split>_acc as a fraction: a format-1 file held percent."""
    version = f.attrs.get("format_version", 1)
    return values / 100.0 if int(version) < 2 else values


def _surface(f: h5py.File):
    a, split = _attrs(f), f.attrs["split"]
    xs, ys = np.asarray(f["xcoordinates"], np.float64), np.asarray(f["ycoordinates"], np.float64)
    arrays = [np.asarray(f[k]) for k in (f"{split}_loss", f"{split}_acc", "done")]
    if xs.ndim != 1 or ys.ndim != 1 or any(v.shape != (ys.size, xs.size) for v in arrays):
        raise KdprobeError(f"{f.filename} is not a complete kdprobe surface file (arrays of shapes "
                           f"{[v.shape for v in arrays]} for a {ys.size}x{xs.size} grid)")
    res = SurfaceResult(xs, ys, arrays[0].astype(np.float64), _accuracy(f, arrays[1].astype(np.float64)),
                        arrays[2].astype(bool),
                        _directions(f), str(a["bn"]), str(a["precision"]), int(a["num_samples"]))
    return res, a


def read_surface_h5(path: str | os.PathLike) -> tuple[SurfaceResult, dict]:
    """A surface file back as (SurfaceResult, attributes)."""
    return _read(path, "surface", _surface)


def _line(f: h5py.File):
    a, split = _attrs(f), f.attrs["split"]
    ts = np.asarray(f["coordinates"], np.float64)
    arrays = [np.asarray(f[k]) for k in (f"{split}_loss", f"{split}_acc", "done")]
    if ts.ndim != 1 or any(v.shape != ts.shape for v in arrays):
        raise KdprobeError(f"{f.filename} is not a complete kdprobe path file (arrays of shapes "
                           f"{[v.shape for v in arrays]} for {ts.size} points)")
    res = LineResult(ts, arrays[0].astype(np.float64), _accuracy(f, arrays[1].astype(np.float64)), arrays[2].astype(bool),
                     str(a["bn"]), str(a["precision"]), int(a["num_samples"]))
    return res, a


def read_line_h5(path: str | os.PathLike) -> tuple[LineResult, dict]:
    """A path file back as (LineResult, attributes)."""
    return _read(path, "path", _line)
