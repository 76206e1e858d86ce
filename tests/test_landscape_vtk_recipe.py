"""The ParaView recipe of docs/figures.md on kdprobe's VTK files (issue 20 item 3): the file is a height field
already (Warp By Scalar on loss would add the loss to z), Calculator with coordinate results
coordsX*iHat + coordsY*jHat + loss*kHat gives z = the true loss, the z scaling is recorded in every file, and
files written with one height_range share one scale. Checked with VTK's own filters (what ParaView's
Calculator and Warp By Scalar run), and with pvpython where it is installed."""
from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest

vtk = pytest.importorskip("vtk")
from vtk.util.numpy_support import vtk_to_numpy  # noqa: E402

from kdprobe.probes.landscape import SurfaceResult  # noqa: E402
from kdprobe.writers.landscape_vtk import write_surface_vtk  # noqa: E402

XS, YS = np.linspace(-1, 1, 5), np.linspace(-0.5, 0.5, 3)


def _surface(scale: float) -> SurfaceResult:
    X, Y = np.meshgrid(XS, YS)
    loss = scale * (0.2 + X ** 2 + 3 * Y ** 2)  # a basin: loss 0.2 * scale at the centre
    return SurfaceResult(XS, YS, loss, np.full_like(loss, 0.5), np.ones_like(loss, bool), None, "eval", "fp32", 10)


def _read(path):
    if str(path).endswith(".vts"):
        r = vtk.vtkXMLStructuredGridReader()
    else:
        r = vtk.vtkStructuredGridReader()
        r.ReadAllScalarsOn()
        r.ReadAllFieldsOn()
    r.SetFileName(str(path))
    r.Update()
    return r.GetOutput()


def _field(grid) -> dict:
    fd = grid.GetFieldData()
    return {fd.GetArrayName(i): float(vtk_to_numpy(fd.GetArray(i))[0]) for i in range(fd.GetNumberOfArrays())}


@pytest.mark.parametrize("suffix", [".vtk", ".vts"])
def test_calculator_gives_true_heights_and_warp_by_scalar_would_add(tmp_path, suffix):
    res = _surface(1.0)
    path = tmp_path / f"s{suffix}"
    write_surface_vtk(res, path)
    grid = _read(path)
    z = vtk_to_numpy(grid.GetPoints().GetData())[:, 2]
    loss = res.loss.ravel()  # x fastest, as the points are stored
    # the file is a height field: z = the loss scaled to [0, 2] (the grid's larger extent)
    assert np.allclose(z, (loss - loss.min()) * 2.0 / np.ptp(loss), atol=1e-6)
    assert np.allclose(vtk_to_numpy(grid.GetPointData().GetArray("height")), z, atol=1e-6)
    f = _field(grid)
    assert f == pytest.approx({"height_lo": loss.min(), "height_hi": loss.max(), "height_extent": 2.0,
                               "height_log": 0.0}, rel=1e-6)
    calc = vtk.vtkArrayCalculator()  # ParaView's Calculator
    calc.SetInputData(grid)
    calc.AddCoordinateScalarVariable("coordsX", 0)
    calc.AddCoordinateScalarVariable("coordsY", 1)
    calc.AddScalarArrayName("loss")
    calc.SetFunction("coordsX*iHat+coordsY*jHat+loss*kHat")
    calc.SetCoordinateResults(1)
    calc.Update()
    got = vtk_to_numpy(calc.GetOutput().GetPoints().GetData())
    assert np.allclose(got[:, 2], loss, atol=1e-5) and np.allclose(got[:, :2], vtk_to_numpy(
        grid.GetPoints().GetData())[:, :2])
    warp = vtk.vtkWarpScalar()  # ParaView's Warp By Scalar: adds the scalar to z, which is not 0
    warp.SetInputData(grid)
    warp.SetInputArrayToProcess(0, 0, 0, vtk.vtkDataObject.FIELD_ASSOCIATION_POINTS, "loss")
    warp.Update()
    warped = vtk_to_numpy(warp.GetOutput().GetPoints().GetData())[:, 2]
    assert np.allclose(warped, z + loss, atol=1e-5) and not np.allclose(warped, loss, atol=1e-3)


def test_files_written_on_one_height_range_share_one_scale(tmp_path):
    low, high = _surface(1.0), _surface(10.0)  # a KD-like and a scratch-like surface, 10x apart
    shared = (float(low.loss.min()), float(high.loss.max()))
    for name, res in (("low", low), ("high", high)):
        write_surface_vtk(res, tmp_path / f"{name}.vtk", height_range=shared)
    zs = {n: vtk_to_numpy(_read(tmp_path / f"{n}.vtk").GetPoints().GetData())[:, 2] for n in ("low", "high")}
    assert zs["high"].max() == pytest.approx(2.0) and zs["low"].max() < 0.25 * zs["high"].max()  # comparable
    scale = 2.0 / (shared[1] - shared[0])
    for n, res in (("low", low), ("high", high)):
        assert np.allclose(zs[n], (res.loss.ravel() - shared[0]) * scale, atol=1e-5)
        f = _field(_read(tmp_path / f"{n}.vtk"))
        assert (f["height_lo"], f["height_hi"]) == pytest.approx(shared, rel=1e-6)
        assert "z = (loss - " in (tmp_path / f"{n}.vtk").read_bytes().split(b"\n")[1].decode()


@pytest.mark.skipif(shutil.which("pvpython") is None, reason="ParaView's pvpython is not installed")
def test_the_recipe_in_pvpython(tmp_path):
    res = _surface(1.0)
    write_surface_vtk(res, tmp_path / "s.vtk")
    script = tmp_path / "recipe.py"
    script.write_text(
        "import sys\n"
        "from paraview.simple import LegacyVTKReader, Calculator\n"
        "from paraview import servermanager as sm\n"
        "from vtk.util.numpy_support import vtk_to_numpy\n"
        f"s = LegacyVTKReader(FileNames=[{str(tmp_path / 's.vtk')!r}])\n"
        "c = Calculator(Input=s, CoordinateResults=1, Function='coordsX*iHat+coordsY*jHat+loss*kHat')\n"
        "c.UpdatePipeline()\n"
        "z = vtk_to_numpy(sm.Fetch(c).GetPoints().GetData())[:, 2]\n"
        "print(' '.join(repr(float(v)) for v in z))\n")
    out = subprocess.run(["pvpython", str(script)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    z = np.array([float(v) for v in out.stdout.split()[-res.loss.size:]])
    assert np.allclose(z, res.loss.ravel(), atol=1e-5), sys.version
