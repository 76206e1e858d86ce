"""VTK files (ParaView, VisIt, vtk) for loss landscapes, chosen by the path's extension.

  .vtk  legacy STRUCTURED_GRID, BINARY (big-endian float32, as the legacy format requires;
        written here: the format is ten lines of text plus raw arrays)
  .vts  XML StructuredGrid with raw appended binary data, written by pyevtk.gridToVTK
A surface is a height field: point (x_j, y_i, z). A path is a 1-D structured grid of points
(t, 0, z). h = loss (clipped at zmax, then log(h) with log=True), and by default (`vtk_height
="scaled"`) z = (h - min h) / (max h - min h) x the grid's larger extent, so the file opens in
ParaView as a surface about as tall as it is wide: with the raw loss (0.01 to 30 nats over a
[-1, 1] grid) the minimum is a needle 15 times taller than the plane. `vtk_height="raw"` keeps
z = h. Point arrays, never clipped or scaled: loss (nats), log_loss (natural log) and accuracy (a
fraction 0-1, docs/units.md); `height` is the z coordinate itself.

The file is a height field already: open it and colour by loss (nothing to warp: "Warp By Scalar" on
loss would ADD the loss to z). For z = the true loss, ParaView's Calculator with "Result Array
Name" anything, "Coordinate Results" on and the expression coordsX*iHat + coordsY*jHat + loss*kHat
(log_loss for a log surface). Several files on one scale (a study's surfaces): pass one
height_range=(lo, hi) to every write; the scaling is recorded in each file as field data
(height_lo, height_hi, height_extent, height_log: z = (h - height_lo) * height_extent /
(height_hi - height_lo), h = log(loss) when height_log is 1) and in the legacy header's title line.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from kdprobe.errors import KdprobeError
from kdprobe.files.io import atomic_path, locked_side_file
from kdprobe.probes.landscape import LineResult, SurfaceResult

VTK_SUFFIXES = (".vtk", ".vts")
VTK_HEIGHTS = ("scaled", "raw")
_TINY = float(np.finfo(np.float32).tiny)  # log() floor for a loss of exactly 0


def height(loss: np.ndarray, *, log: bool = False, zmax: float | None = None) -> np.ndarray:
    """The z coordinate of the height field: loss clipped at zmax (loss units), then optional log."""
    z = np.asarray(loss, np.float64)
    if zmax is not None:
        z = np.minimum(z, zmax)
    return np.log(np.maximum(z, _TINY)) if log else z


def vtk_z(h: np.ndarray, extent: float, mode: str = "scaled", height_range: tuple | None = None) -> np.ndarray:
    """The VTK z coordinate from the height h: 'raw' (z = h) or 'scaled' to [0, extent] (see module doc), over
    height_range=(lo, hi) when given (several files on one scale), else h's own minimum and maximum."""
    if mode not in VTK_HEIGHTS:
        raise KdprobeError(f"expected a VTK height in {VTK_HEIGHTS}, got {mode!r}; pick one of them")
    h = np.asarray(h, np.float64)
    if mode == "raw":
        return h
    lo, hi = height_range if height_range is not None else (float(np.min(h)), float(np.max(h)))
    return np.zeros_like(h) if hi <= lo else (h - lo) * (float(extent) / (hi - lo))


def scaling(h: np.ndarray, extent: float, mode: str, log: bool, height_range: tuple | None = None) -> dict:
    """The field data recording how z was made from the height: height_lo, height_hi, height_extent (z of
    height_hi; 0 extent = raw, z = h), height_log (1: h = log(loss))."""
    h = np.asarray(h, np.float64)
    lo, hi = height_range if height_range is not None else (float(np.min(h)), float(np.max(h)))
    raw = mode == "raw"
    return {"height_lo": 0.0 if raw else float(lo), "height_hi": 1.0 if raw else float(hi),
            "height_extent": 0.0 if raw else float(extent), "height_log": float(bool(log))}


def _arrays(loss: np.ndarray, acc: np.ndarray, z: np.ndarray) -> dict[str, np.ndarray]:
    loss = np.asarray(loss, np.float64)
    return {"loss": loss, "log_loss": np.log(np.maximum(loss, _TINY)), "accuracy": np.asarray(acc, np.float64),
            "height": np.asarray(z, np.float64)}


def _title(title: str, field: dict) -> str:
    if field["height_extent"] == 0:
        return f"{title}; z = {'log ' if field['height_log'] else ''}loss"
    return (f"{title}; z = ({'log ' if field['height_log'] else ''}loss - {field['height_lo']:.6g}) * "
            f"{field['height_extent']:.6g} / {field['height_hi'] - field['height_lo']:.6g}")


def _write_legacy(path: Path, dims: tuple[int, int, int], pts: np.ndarray, data: dict, title: str,
                  field: dict | None = None) -> None:
    """Legacy VTK STRUCTURED_GRID, BINARY; point order x fastest, then y, then z; `field`: dataset field data
    (one float each)."""
    n = pts.shape[0]
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(b"# vtk DataFile Version 3.0\n")
        f.write(title.replace("\n", " ")[:255].encode("ascii", "replace") + b"\n")
        f.write(b"BINARY\nDATASET STRUCTURED_GRID\n")
        if field:
            f.write(f"FIELD FieldData {len(field)}\n".encode())
            for name, v in field.items():
                f.write(f"{name} 1 1 float\n".encode())
                f.write(np.asarray([v], ">f4").tobytes())
                f.write(b"\n")
        f.write(f"DIMENSIONS {dims[0]} {dims[1]} {dims[2]}\nPOINTS {n} float\n".encode())
        f.write(np.ascontiguousarray(pts, ">f4").tobytes())
        f.write(f"\nPOINT_DATA {n}\n".encode())
        # the first array as SCALARS (the active one ParaView colours by), the others as a FIELD:
        # vtk's legacy reader loads only the first SCALARS block unless told to read all
        (first, v0), *rest = data.items()
        f.write(f"SCALARS {first} float 1\nLOOKUP_TABLE default\n".encode())
        f.write(np.ascontiguousarray(v0.reshape(-1), ">f4").tobytes())
        f.write(f"\nFIELD FieldData {len(rest)}\n".encode())
        for name, v in rest:
            f.write(f"{name} 1 {n} float\n".encode())
            f.write(np.ascontiguousarray(v.reshape(-1), ">f4").tobytes())
            f.write(b"\n")


def _write_vts(path: Path, x3: np.ndarray, y3: np.ndarray, z3: np.ndarray, data: dict,
               field: dict | None = None) -> None:
    """XML structured grid through pyevtk; arrays shaped (nx, ny, nz), index [i, j, k]; `field`: field data."""
    from pyevtk.hl import gridToVTK  # imported here: only .vts output needs it

    with atomic_path(path) as tmp, locked_side_file(tmp, ".vts") as side:  # gridToVTK appends ".vts" itself
        written = gridToVTK(str(tmp), *(np.asfortranarray(a, np.float64) for a in (x3, y3, z3)),
                            pointData={k: np.asfortranarray(v, np.float64) for k, v in data.items()},
                            fieldData={k: np.asarray([v], np.float64) for k, v in (field or {}).items()})
        assert Path(written) == side, (written, side)
        raw = Path(side).read_bytes()  # a few hundred KB at most
        head, sep, tail = raw.partition(b"<AppendedData")
        # pyevtk puts FieldData inside <Piece>, where VTK's reader ignores it: the dataset's field data goes
        # before the piece (the appended data's offsets do not depend on where the header lists them)
        m = re.search(rb"<FieldData>.*?</FieldData>\n?", head, re.S)
        if m:
            head = head[:m.start()] + head[m.end():]
            block = m.group(0).replace(b"<DataArray ", b'<DataArray NumberOfTuples="1" ')  # one value each
            head = head.replace(b"<Piece", block + b"<Piece", 1)
        Path(tmp).write_bytes(head + sep + tail)  # into the locked temp file itself


def _check_suffix(path: Path) -> str:
    suf = path.suffix.lower()
    if suf not in VTK_SUFFIXES:
        raise KdprobeError(f"expected a VTK path ending in {' or '.join(VTK_SUFFIXES)}, got {path.name!r}; "
                           "rename the output")
    return suf


def write_surface_vtk(result: SurfaceResult, path: str | os.PathLike, *, log: bool = False,
                      zmax: float | None = None, title: str = "kdprobe loss surface",
                      vtk_height: str = "scaled", height_range: tuple | None = None) -> None:
    """Write a complete surface as a height field (.vtk legacy or .vts XML, by extension); height_range=(lo, hi)
    puts several files on one height scale (see the module doc); the scaling is recorded in the file."""
    path = Path(path)
    suf = _check_suffix(path)
    if not result.complete:
        raise KdprobeError(f"expected a complete surface, got {int(result.done.sum())} of "
                           f"{result.done.size} points; finish the run first")
    ny, nx = result.loss.shape
    X, Y = np.meshgrid(result.xcoords, result.ycoords)  # (ny, nx), [i, j] = (x_j, y_i)
    extent = max(np.ptp(result.xcoords), np.ptp(result.ycoords))
    h = height(result.loss, log=log, zmax=zmax)
    Z = vtk_z(h, extent, vtk_height, height_range)
    field = scaling(h, extent, vtk_height, log, height_range)
    data = _arrays(result.loss, result.acc, Z)
    if suf == ".vtk":
        pts = np.stack([X.reshape(-1), Y.reshape(-1), Z.reshape(-1)], 1)  # row-major = x fastest
        _write_legacy(path, (nx, ny, 1), pts, data, _title(title, field), field)
    else:
        t = lambda a: a.T[:, :, None]  # noqa: E731  (ny, nx) -> (nx, ny, 1)
        _write_vts(path, t(X), t(Y), t(Z), {k: t(v) for k, v in data.items()}, field)


def write_line_vtk(result: LineResult, path: str | os.PathLike, *, log: bool = False,
                   zmax: float | None = None, title: str = "kdprobe interpolation path",
                   vtk_height: str = "scaled") -> None:
    """Write a complete path as a 1-D structured grid of points (t, 0, z)."""
    path = Path(path)
    suf = _check_suffix(path)
    if not result.done.all():
        raise KdprobeError(f"expected a complete path, got {int(result.done.sum())} of "
                           f"{result.done.size} points; finish the run first")
    t = np.asarray(result.coords, np.float64)
    h = height(result.loss, log=log, zmax=zmax)
    z = vtk_z(h, np.ptp(t), vtk_height)
    field = scaling(h, np.ptp(t), vtk_height, log)
    data = _arrays(result.loss, result.acc, z)
    if suf == ".vtk":
        pts = np.stack([t, np.zeros_like(t), z], 1)
        _write_legacy(path, (t.size, 1, 1), pts, data, _title(title, field), field)
    else:
        c = lambda a: np.asarray(a, np.float64).reshape(-1, 1, 1)  # noqa: E731
        _write_vts(path, c(t), c(np.zeros_like(t)), c(z), {k: c(v) for k, v in data.items()}, field)
