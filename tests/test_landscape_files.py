"""Landscape files read back with h5py and the official VTK readers; the CLI end to end (resume included)."""
from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from kdprobe.errors import KdprobeError
from kdprobe.probes.landscape import Directions, LineResult, SurfaceResult
from kdprobe.writers.landscape_h5 import (read_directions, read_line_h5, read_surface_h5, write_line_h5,
                                          write_surface_h5)
from kdprobe.writers.landscape_plot import write_line_html, write_surface_html
from kdprobe.writers.landscape_vtk import write_line_vtk, write_surface_vtk

XS, YS = np.array([-1.0, 0.0, 1.0, 2.0]), np.array([-0.5, 0.5, 1.5])  # nx=4, ny=3




def _surface(partial: bool = False) -> SurfaceResult:
    X, Y = np.meshgrid(XS, YS)
    loss = 1.0 + X ** 2 + 3.0 * Y ** 2  # known function: [i, j] is at (x_j, y_i)
    acc = 50.0 + 10 * X - Y
    done = np.ones_like(loss, bool)
    if partial:
        done[2, 1:] = False
        loss, acc = np.where(done, loss, np.nan), np.where(done, acc, np.nan)
    g = torch.Generator().manual_seed(0)
    d = Directions({"conv.weight": torch.randn(2, 3, generator=g), "bn.bias": torch.zeros(2)},
                   {"conv.weight": torch.randn(2, 3, generator=g), "bn.bias": torch.zeros(2)}, 7, False)
    return SurfaceResult(XS, YS, loss, acc, done, d, "eval", "fp32", 64)


def test_h5_layout_read_with_plain_h5py(tmp_path):
    res = _surface()
    p = tmp_path / "s.h5"
    write_surface_h5(res, p, split="test", settings={"checkpoint_sha256": "abc", "samples": 64, "none": None})
    with h5py.File(p, "r") as f:
        assert f["xcoordinates"].shape == (4,) and f["ycoordinates"].shape == (3,)
        loss = f["test_loss"][()]
        assert loss.shape == (3, 4)
        assert loss[2, 1] == pytest.approx(1.0 + 0.0 + 3.0 * 1.5 ** 2)  # x_1 = 0, y_2 = 1.5
        assert f["test_acc"][0, 3] == pytest.approx(50.0 + 20 + 0.5)
        assert f["done"][()].all()
        assert f.attrs["checkpoint_sha256"] == "abc" and f.attrs["split"] == "test"
        assert f["xdirection"].attrs["seed"] == 7
        np.testing.assert_array_equal(f["ydirection"]["conv.weight"][()], res.directions.y["conv.weight"].numpy())
    back, attrs = read_surface_h5(p)
    np.testing.assert_array_equal(back.loss, res.loss)
    assert attrs["samples"] == 64 and back.directions.fingerprint() == res.directions.fingerprint()
    assert read_directions(p).seed == 7


def test_partial_h5_is_readable_and_vtk_refuses_it(tmp_path):
    res = _surface(partial=True)
    write_surface_h5(res, tmp_path / "p.h5")
    back, attrs = read_surface_h5(tmp_path / "p.h5")
    assert not attrs["complete"] and back.done.sum() == 9 and np.isnan(back.loss[2, 3])
    with pytest.raises(KdprobeError, match="complete"):
        write_surface_vtk(back, tmp_path / "p.vtk")
    with pytest.raises(KdprobeError, match="kdprobe surface"):
        write_line_h5(LineResult(XS, XS, XS, np.ones(4, bool), "eval", "fp32", 1), tmp_path / "l.h5")
        read_surface_h5(tmp_path / "l.h5")


def _read_vtk(path):
    vtk = pytest.importorskip("vtk")
    from vtk.util.numpy_support import vtk_to_numpy

    reader = vtk.vtkXMLStructuredGridReader() if path.suffix == ".vts" else vtk.vtkStructuredGridReader()
    reader.SetFileName(str(path))
    reader.Update()
    grid = reader.GetOutput()
    pts = vtk_to_numpy(grid.GetPoints().GetData())
    pd = grid.GetPointData()
    arrays = {pd.GetArrayName(i): vtk_to_numpy(pd.GetArray(i)) for i in range(pd.GetNumberOfArrays())}
    dims = [0, 0, 0]
    grid.GetDimensions(dims)  # vtk >= 9.4 fills a list; older versions also accept it
    return tuple(dims), pts, arrays


@pytest.mark.parametrize("suffix", [".vtk", ".vts"])
def test_surface_vtk_read_back_with_vtk(tmp_path, suffix):
    res = _surface()
    p = tmp_path / f"s{suffix}"
    write_surface_vtk(res, p, log=True, zmax=5.0)
    dims, pts, arrays = _read_vtk(p)
    assert tuple(dims) == (4, 3, 1)
    X, Y = np.meshgrid(XS, YS)
    # VTK point order: x fastest, then y
    np.testing.assert_allclose(pts[:, 0], X.ravel(), rtol=1e-6)
    np.testing.assert_allclose(pts[:, 1], Y.ravel(), rtol=1e-6)
    np.testing.assert_allclose(pts[:, 2], np.log(np.minimum(res.loss, 5.0)).ravel(), rtol=1e-6)
    np.testing.assert_allclose(arrays["loss"], res.loss.ravel(), rtol=1e-6)
    np.testing.assert_allclose(arrays["log_loss"], np.log(res.loss).ravel(), rtol=1e-6)
    np.testing.assert_allclose(arrays["accuracy"], res.acc.ravel(), rtol=1e-6)


@pytest.mark.parametrize("suffix", [".vtk", ".vts"])
def test_line_vtk_and_h5_read_back(tmp_path, suffix):
    t = np.linspace(0, 1, 5)
    line = LineResult(t, 2.0 + t * (1 - t), 90 - t, np.ones(5, bool), "eval", "fp32", 32)
    write_line_vtk(line, tmp_path / f"l{suffix}")
    dims, pts, arrays = _read_vtk(tmp_path / f"l{suffix}")
    assert tuple(dims) == (5, 1, 1)
    np.testing.assert_allclose(pts[:, 0], t, atol=1e-7)
    np.testing.assert_allclose(pts[:, 2], line.loss, rtol=1e-6)
    np.testing.assert_allclose(arrays["accuracy"], line.acc, rtol=1e-6)
    write_line_h5(line, tmp_path / "l.h5", split="test")
    with h5py.File(tmp_path / "l.h5", "r") as f:
        np.testing.assert_array_equal(f["coordinates"][()], t)
        np.testing.assert_array_equal(f["test_loss"][()], line.loss)
    assert read_line_h5(tmp_path / "l.h5")[0].num_samples == 32


def test_html_is_self_contained(tmp_path):
    write_surface_html(_surface(partial=True), tmp_path / "s.html", log=True)
    t = np.linspace(0, 1, 3)
    write_line_html(LineResult(t, t + 1, t, np.ones(3, bool), "eval", "fp32", 1), tmp_path / "l.html")
    for name in ("s.html", "l.html"):
        text = (tmp_path / name).read_text()
        assert len(text) > 1_000_000 and '<script src="http' not in text  # plotly.js inlined: works offline
        assert "Plotly.newPlot" in text


# ---- CLI end to end on digits (sklearn, offline) ----

def _app():
    typer = pytest.importorskip("typer")
    from cli.common import handle_errors
    from cli.landscape import interpolate, landscape

    app = typer.Typer()
    app.command("landscape")(handle_errors(landscape))
    app.command("interpolate")(handle_errors(interpolate))
    return app


def _ckpt(tmp_path, seed):
    from kdprobe.checkpoint import save_checkpoint
    from kdprobe.models import create_model

    torch.manual_seed(seed)
    m = create_model("resnet8b", num_classes=10, in_channels=1, width=0.25)
    return save_checkpoint(tmp_path / f"m{seed}.pt", m, {"method": "scratch", "seed": seed, "dataset": "digits"})


def test_cli_landscape_resume_and_settings_guard(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import cli.landscape as cl

    ck, out = _ckpt(tmp_path, 0), tmp_path / "surf.vts"
    args = ["landscape", str(ck), "--out", str(out), "--x", "-1:1:3", "--y", "-1:1:4", "--samples", "40",
            "--device", "cpu", "--precision", "fp32", "--save-every", "0"]
    run = lambda extra=(): CliRunner().invoke(_app(), args + list(extra))  # noqa: E731
    full = run(["--html"])
    assert full.exit_code == 0, full.output
    ref, attrs = read_surface_h5(tmp_path / "surf.h5")
    assert ref.complete and attrs["samples"] == 40 and (tmp_path / "surf.html").exists()
    assert _read_vtk(out)[0] == (3, 4, 1)

    # kill after 2 saved chunks, then re-run the same command: it continues
    (tmp_path / "surf.h5").unlink()
    calls, orig = [], cl._Saver.__call__

    def dying(self, partial):
        orig(self, partial)
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(cl._Saver, "__call__", dying)
    killed = run()
    assert killed.exit_code == 130
    part, _ = read_surface_h5(tmp_path / "surf.h5")
    assert part.done.sum() == 2 and not part.complete
    monkeypatch.setattr(cl._Saver, "__call__", orig)
    resumed = run()
    assert resumed.exit_code == 0, resumed.output
    assert "10 points in" in resumed.output  # 12 - 2 already done
    np.testing.assert_allclose(read_surface_h5(tmp_path / "surf.h5")[0].loss, ref.loss, rtol=1e-6)

    changed = run(["--seed", "1"])
    assert changed.exit_code == 1 and "--overwrite" in changed.output and "seed" in changed.output
    grid = run(["--x", "-1:1:5"])
    assert grid.exit_code == 1 and "--overwrite" in grid.output
    assert run(["--seed", "1", "--overwrite"]).exit_code == 0
    bad = run(["--x", "-1:1"])
    assert bad.exit_code == 1 and "min:max:num" in bad.output

    # a second checkpoint on the first one's plane
    other = CliRunner().invoke(_app(), ["landscape", str(_ckpt(tmp_path, 1)), "--out", str(tmp_path / "b.h5"),
                                        "--x", "-1:1:3", "--y", "-1:1:4", "--samples", "40", "--device", "cpu",
                                        "--directions", str(tmp_path / "surf.h5")])
    assert other.exit_code == 0, other.output
    assert read_directions(tmp_path / "b.h5").fingerprint() == read_directions(tmp_path / "surf.h5").fingerprint()


def test_cli_interpolate(tmp_path):
    from typer.testing import CliRunner

    a, b = _ckpt(tmp_path, 0), _ckpt(tmp_path, 1)
    res = CliRunner().invoke(_app(), ["interpolate", str(a), str(b), "--out", str(tmp_path / "path.vtk"),
                                      "--steps", "5", "--range", "-0.5:1.5", "--samples", "30",
                                      "--device", "cpu", "--precision", "fp32"])
    assert res.exit_code == 0, res.output
    line, attrs = read_line_h5(tmp_path / "path.h5")
    np.testing.assert_allclose(line.coords, [-0.5, 0, 0.5, 1, 1.5])
    assert attrs["samples"] == 30 and line.done.all()
    assert _read_vtk(tmp_path / "path.vtk")[0] == (5, 1, 1)
    # t = 0 is checkpoint A itself
    from kdprobe.checkpoint import load_checkpoint
    from kdprobe.data import load_dataset, normalize

    d = load_dataset("digits")
    x = normalize(d.train_x[:30], d.mean, d.std)
    with torch.no_grad():
        la = torch.nn.functional.cross_entropy(load_checkpoint(a).model(x), d.train_y[:30]).item()
    assert line.loss[1] == pytest.approx(la, abs=1e-5)
