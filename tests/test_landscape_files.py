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
from tolerance import cross_entropy_atol

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
@pytest.mark.parametrize("mode", ["scaled", "raw"])
def test_surface_vtk_read_back_with_vtk(tmp_path, suffix, mode):
    res = _surface()
    p = tmp_path / f"s{suffix}"
    write_surface_vtk(res, p, log=True, zmax=5.0, **({} if mode == "scaled" else {"vtk_height": "raw"}))
    dims, pts, arrays = _read_vtk(p)
    assert tuple(dims) == (4, 3, 1)
    X, Y = np.meshgrid(XS, YS)
    # VTK point order: x fastest, then y
    np.testing.assert_allclose(pts[:, 0], X.ravel(), rtol=1e-6)
    np.testing.assert_allclose(pts[:, 1], Y.ravel(), rtol=1e-6)
    h = np.log(np.minimum(res.loss, 5.0))
    if mode == "scaled":  # the default: heights spread over [0, the larger grid extent], here x's 3.0
        h = (h - h.min()) / (h.max() - h.min()) * max(XS.max() - XS.min(), YS.max() - YS.min())
        assert pts[:, 2].min() == pytest.approx(0.0, abs=1e-6) and pts[:, 2].max() == pytest.approx(3.0, rel=1e-6)
    np.testing.assert_allclose(pts[:, 2], h.ravel(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(arrays["loss"], res.loss.ravel(), rtol=1e-6)
    np.testing.assert_allclose(arrays["log_loss"], np.log(res.loss).ravel(), rtol=1e-6)
    np.testing.assert_allclose(arrays["accuracy"], res.acc.ravel(), rtol=1e-6)


@pytest.mark.parametrize("suffix", [".vtk", ".vts"])
def test_line_vtk_and_h5_read_back(tmp_path, suffix):
    t = np.linspace(0, 1, 5)
    line = LineResult(t, 2.0 + t * (1 - t), 90 - t, np.ones(5, bool), "eval", "fp32", 32)
    write_line_vtk(line, tmp_path / f"l{suffix}", vtk_height="raw")
    dims, pts, arrays = _read_vtk(tmp_path / f"l{suffix}")
    assert tuple(dims) == (5, 1, 1)
    np.testing.assert_allclose(pts[:, 0], t, atol=1e-7)
    np.testing.assert_allclose(pts[:, 2], line.loss, rtol=1e-6)
    write_line_vtk(line, tmp_path / f"m{suffix}")  # default: loss 2..2.25 spread over t's extent 1
    _, pts, arrays = _read_vtk(tmp_path / f"m{suffix}")
    np.testing.assert_allclose(pts[:, 2], (line.loss - 2.0) / 0.25, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(arrays["loss"], line.loss, rtol=1e-6)
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
    from kdprobe.checkpoints.format import save_checkpoint
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
    from kdprobe.checkpoints.format import load_checkpoint
    from kdprobe.data.datasets import load_dataset, normalize

    d = load_dataset("digits")
    x = normalize(d.train_x[:30], d.mean, d.std)
    model = load_checkpoint(a).model.eval()
    with torch.no_grad():
        logits = model(x)
    la = torch.nn.functional.cross_entropy(logits, d.train_y[:30]).item()
    # the command evaluates in its own batches: equal up to the rounding bound of two fp32 evaluations
    assert line.loss[1] == pytest.approx(la, rel=0, abs=cross_entropy_atol(model, x, logits))


# ---- issue 10: damaged HDF5 files, degenerate --directions, huge grids, the fp32 default ----

def _drop(path, *, member=None, attr=None):
    with h5py.File(path, "r+") as f:
        if member:
            del f[member]
        if attr:
            del f.attrs[attr]


@pytest.mark.parametrize("member, attr, words", [
    ("xdirection", None, "missing group 'xdirection'"),
    (None, "bn", "missing attribute 'bn'"),
    ("test_loss", None, "missing dataset 'test_loss'"),
])
def test_incomplete_surface_files_are_named_not_tracebacks(tmp_path, member, attr, words):
    p = tmp_path / "s.h5"
    write_surface_h5(_surface(), p, split="test")
    _drop(p, member=member, attr=attr)
    with pytest.raises(KdprobeError, match=f"is not a complete kdprobe surface file \\({words}"):
        read_surface_h5(p)
    if member != "test_loss":
        with pytest.raises(KdprobeError, match=words):
            read_directions(p)
    q = tmp_path / "q.h5"  # a surface whose arrays do not fit its grid
    write_surface_h5(_surface(), q, split="test")
    with h5py.File(q, "r+") as f:
        del f["done"]
        f["done"] = np.ones((2, 2), np.uint8)
    with pytest.raises(KdprobeError, match="arrays of shapes"):
        read_surface_h5(q)


def test_cli_refuses_damaged_files_and_bad_directions_in_one_line(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    ck = _ckpt(tmp_path, 0)
    base = ["landscape", str(ck), "--x", "-1:1:2", "--y", "-1:1:2", "--samples", "16", "--device", "cpu"]
    run = lambda *extra: CliRunner().invoke(_app(), base + [str(e) for e in extra])  # noqa: E731
    assert run("--out", tmp_path / "a.h5").exit_code == 0

    def one_line_error(res, *words):
        assert res.exit_code == 1 and "internal error" not in res.output, res.output
        errors = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and "Traceback" not in res.output and all(w in errors[0] for w in words), res.output

    _drop(tmp_path / "a.h5", member="ydirection")
    one_line_error(run("--out", tmp_path / "a.h5"), "cannot be resumed", "missing group 'ydirection'",
                   "--overwrite")
    one_line_error(run("--out", tmp_path / "b.h5", "--directions", tmp_path / "a.h5"), "--directions",
                   "missing group 'ydirection'")
    assert run("--out", tmp_path / "a.h5", "--overwrite").exit_code == 0
    with h5py.File(tmp_path / "a.h5", "r+") as f:  # NaN in a saved direction
        name = next(iter(f["xdirection"]))
        d = f["xdirection"][name]
        d[...] = np.full(d.shape, np.nan, np.float32)
    one_line_error(run("--out", tmp_path / "c.h5", "--directions", tmp_path / "a.h5"), "NaN or inf", name)

    import kdprobe.probes.landscape as ls

    monkeypatch.setattr(ls, "available_memory", lambda: 4 * 2**30)
    one_line_error(CliRunner().invoke(_app(), ["landscape", str(ck), "--x", "-1:1:100000", "--y", "-1:1:100000",
                                               "--out", str(tmp_path / "huge.h5"), "--device", "cpu"]),
                   "10,000,000,000 points", "GiB", "use fewer points")
    # --steps has a declared range now: the real command group refuses it at parse time, before any work
    from cli.main import app

    one_line_error(CliRunner().invoke(app, ["interpolate", str(ck), str(ck), "--steps", str(10**12),
                                            "--out", str(tmp_path / "p.h5"), "--device", "cpu"]),
                   "--steps", "<= 1000000")
    assert not (tmp_path / "huge.h5").exists() and not (tmp_path / "p.h5").exists()


def test_default_precision_is_fp32_even_where_bf16_is_fast(tmp_path, monkeypatch):
    """issue 10 item 15: the default surface is the exact fp32 one on every device; bf16 only when asked."""
    from typer.testing import CliRunner

    import kdprobe.probes.landscape_eval as le

    monkeypatch.setattr(le, "bf16_is_fast", lambda device: True)  # a CPU with AVX512-BF16/AMX, or a GPU
    ck = _ckpt(tmp_path, 0)
    args = ["landscape", str(ck), "--x", "-1:1:2", "--y", "-1:1:2", "--samples", "16", "--device", "cpu"]
    assert CliRunner().invoke(_app(), args + ["--out", str(tmp_path / "d.h5")]).exit_code == 0
    assert read_surface_h5(tmp_path / "d.h5")[0].precision == "fp32"
    assert CliRunner().invoke(_app(), args + ["--out", str(tmp_path / "a.h5"), "--precision", "auto"]).exit_code == 0
    assert read_surface_h5(tmp_path / "a.h5")[0].precision == "bf16"  # auto stays as an explicit choice
    res = CliRunner().invoke(_app(), ["interpolate", str(ck), str(ck), "--steps", "2", "--samples", "8",
                                      "--out", str(tmp_path / "l.h5"), "--device", "cpu"])
    assert res.exit_code == 0 and read_line_h5(tmp_path / "l.h5")[0].precision == "fp32"
    from kdprobe.studies.spec import _LANDSCAPE

    assert _LANDSCAPE["precision"] == "fp32"


def test_surface_html_keeps_3d_apart_from_the_contour(tmp_path):
    """issue 10 item 17: plotly blanks a whole figure without WebGL, so the 3-D view is its own figure,
    drawn only after a WebGL test; the contour map is drawn directly."""
    write_surface_html(_surface(), tmp_path / "s.html")
    page = (tmp_path / "s.html").read_text()
    gl = page.index('class="kd-webgl"')
    assert page.count("Plotly.newPlot") == 2 and page.count('class="kd-webgl"') == 1
    assert page.index('"type":"contour"') < gl and "getContext" in page[gl:] and '"type":"surface"' in page[gl:]
    assert "3-D view not drawn" in page[gl:]
