"""kdprobe.landscape / kdprobe.interpolate: the CLI's numbers bit for bit, paths, Checkpoint objects and plain
nn.Modules alike, resume from a saved partial surface, and what the results offer (to_dict, to_frame, save,
figure), with values checked against the model evaluated directly."""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import kdprobe
from kdprobe.errors import KdprobeError
from tolerance import cross_entropy_atol

GRID = dict(x="-1:1:3", y="-1:1:3", samples=24, device="cpu", progress=False)
CLI_GRID = ["--x", "-1:1:3", "--y", "-1:1:3", "--samples", "24", "--device", "cpu"]


def _model(seed: int):
    torch.manual_seed(seed)
    return kdprobe.create_model("resnet8b", num_classes=10, in_channels=1, width=0.25)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    from kdprobe.checkpoints.format import save_checkpoint

    d = tmp_path_factory.mktemp("api_landscape")
    return [save_checkpoint(d / f"m{s}.pt", _model(s), {"method": "scratch", "seed": s, "dataset": "digits"})
            for s in (0, 1)]


@pytest.fixture(scope="module")
def surface(ckpts):
    return kdprobe.landscape(ckpts[0], **GRID)


def _cli(*args):
    from typer.testing import CliRunner

    from cli.main import app

    r = CliRunner().invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return r


def _h5(path):
    with h5py.File(path, "r") as f:
        attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()}
        return attrs, {k: f[k][()] for k in f if isinstance(f[k], h5py.Dataset)}


def _direct_loss(path, n: int):
    """Mean cross-entropy of the checkpoint itself on the first n digits train images (no landscape code)."""
    from kdprobe.data.datasets import load_dataset, normalize

    d = load_dataset("digits")
    x = normalize(d.train_x[:n], d.mean, d.std)
    model = kdprobe.load(path).model.eval()
    with torch.no_grad():
        logits = model(x)
    return torch.nn.functional.cross_entropy(logits, d.train_y[:n]).item(), cross_entropy_atol(model, x, logits)


def test_landscape_from_python_equals_the_cli_bit_for_bit(ckpts, surface, tmp_path):
    _cli("landscape", ckpts[0], "--out", tmp_path / "s.h5", *CLI_GRID)
    attrs, data = _h5(tmp_path / "s.h5")
    doc = surface.to_dict()
    assert doc["settings"] == attrs  # every file attribute, the settings included
    for k in ("xcoordinates", "ycoordinates", "train_loss", "train_acc"):
        assert np.array_equal(np.asarray(doc["data"][k]), data[k]), k
    assert doc["kind"] == "surface" and attrs["format_version"] == 2 and "fraction" in attrs["units"]
    assert np.array_equal(surface.loss, data["train_loss"]) and np.array_equal(surface.acc, data["train_acc"])
    assert np.array_equal(surface.done, data["done"].astype(bool)) and surface.complete
    assert attrs["samples"] == 24 and attrs["seed"] == 0 and attrs["checkpoint"] == str(ckpts[0])
    # the centre of the plane is the checkpoint itself: its loss, computed without the landscape code
    want, atol = _direct_loss(ckpts[0], 24)
    assert surface.loss[1, 1] == pytest.approx(want, rel=0, abs=atol)
    assert surface.files == () and surface.evaluated == 9  # in memory: nothing written


def test_interpolate_from_python_equals_the_cli_bit_for_bit(ckpts, tmp_path):
    _cli("interpolate", ckpts[0], ckpts[1], "--out", tmp_path / "p.h5", "--steps", "3", "--samples", "24",
         "--device", "cpu")
    attrs, data = _h5(tmp_path / "p.h5")
    r = kdprobe.interpolate(ckpts[0], ckpts[1], steps=3, samples=24, device="cpu", progress=False)
    doc = r.to_dict()
    assert doc["settings"] == attrs
    for k in ("coordinates", "train_loss", "train_acc"):
        assert np.array_equal(np.asarray(doc["data"][k]), data[k]), k
    # the barrier, recomputed from the path: max over t of loss(t) - ((1 - t) loss(0) + t loss(1))
    t, loss = data["coordinates"], data["train_loss"]
    excess = loss - ((1 - t) * loss[0] + t * loss[-1])
    assert r.barrier.loss_barrier == pytest.approx(float(excess.max()), abs=1e-12)
    assert attrs["loss_barrier"] == r.barrier.loss_barrier and attrs["loss_barrier_t"] == float(t[excess.argmax()])
    want, atol = _direct_loss(ckpts[1], 24)  # t = 1 is checkpoint B itself
    assert r.loss[-1] == pytest.approx(want, rel=0, abs=atol)


def test_modules_and_checkpoint_objects_give_the_path_result(ckpts, surface):
    from_module = kdprobe.landscape(_model(0), dataset="digits", **GRID)  # the same weights as m0.pt
    from_object = kdprobe.landscape(kdprobe.load(ckpts[0]), **GRID)
    for r in (from_module, from_object):
        assert np.array_equal(r.loss, surface.loss) and np.array_equal(r.acc, surface.acc)
        assert r.settings["directions_sha256"] == surface.settings["directions_sha256"]
    assert from_module.settings["checkpoint"] == "module"
    with pytest.raises(KdprobeError, match="dataset="):
        kdprobe.landscape(_model(0), **GRID)
    by_path = kdprobe.interpolate(ckpts[0], ckpts[1], steps=2, samples=16, device="cpu", progress=False)
    by_module = kdprobe.interpolate(_model(0), _model(1), dataset="digits", steps=2, samples=16, device="cpu",
                                    progress=False)
    assert np.array_equal(by_path.loss, by_module.loss)
    # the plane can be reused: the second checkpoint's surface on the first one's directions
    other = kdprobe.landscape(ckpts[1], directions=surface, **GRID)
    assert other.settings["directions_sha256"] == surface.settings["directions_sha256"]
    assert not np.array_equal(other.loss, surface.loss)


def test_a_saved_partial_surface_is_continued(ckpts, surface, tmp_path):
    from kdprobe.probes.landscape import SurfaceResult
    from kdprobe.writers.landscape_h5 import read_surface_h5, write_surface_h5

    # a run killed after its first row: that row saved with a marker loss, the rest not done
    done = np.zeros((3, 3), bool)
    done[0] = True
    loss = np.where(done, 123.0, np.nan)
    acc = np.where(done, surface.acc, np.nan)
    s = surface.surface
    partial = SurfaceResult(s.xcoords, s.ycoords, loss, acc, done, s.directions, s.bn, s.precision, s.num_samples)
    h5 = tmp_path / "s.h5"
    write_surface_h5(partial, h5, split="train", settings=surface.settings)
    r = kdprobe.landscape(ckpts[0], h5=h5, save_every=0, **GRID)
    assert r.evaluated == 6 and r.files == (h5,)
    assert np.all(r.loss[0] == 123.0)  # kept from the file, not recomputed
    assert np.array_equal(r.loss[1:], surface.loss[1:]) and np.array_equal(r.acc, surface.acc)
    assert np.array_equal(read_surface_h5(h5)[0].loss, r.loss)
    with pytest.raises(KdprobeError, match="seed"):  # other settings: refused, the file kept
        kdprobe.landscape(ckpts[0], h5=h5, seed=1, **GRID)
    fresh = kdprobe.landscape(ckpts[0], h5=h5, seed=1, overwrite=True, **GRID)
    assert fresh.evaluated == 9 and read_surface_h5(h5)[1]["seed"] == 1


def test_interrupted_run_says_what_the_file_keeps(ckpts, tmp_path, monkeypatch):
    from kdprobe.errors import Interrupted
    from kdprobe.probes.landscape_run import Saver

    calls, orig = [], Saver.__call__

    def dying(self, partial):
        orig(self, partial)
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(Saver, "__call__", dying)
    with pytest.raises(Interrupted, match="keeps 2 of 9 points"):
        kdprobe.landscape(ckpts[0], h5=tmp_path / "k.h5", save_every=0, points_per_batch=1, **GRID)
    calls.clear()
    with pytest.raises(Interrupted) as e:  # in memory: nothing was saved
        kdprobe.landscape(ckpts[0], points_per_batch=1, **GRID)
    assert e.value.saved is None


def test_frame_save_and_figure(surface, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    frame = surface.to_frame()
    assert list(frame.columns) == ["x", "y", "loss", "acc", "done"] and len(frame) == 9
    row = frame.iloc[5]  # row 5 = [i, j] = [1, 2]: x = 1, y = 0
    assert (row.x, row.y, row.loss) == (1.0, 0.0, surface.loss[1, 2])

    assert surface.save("s.json") == Path("s.json")
    doc = json.loads((tmp_path / "s.json").read_text())
    assert doc["data"]["train_loss"] == surface.loss.tolist() and doc["settings"]["seed"] == 0
    import pandas as pd

    back = pd.read_csv(surface.save("s.csv"))
    assert np.array_equal(back["loss"].to_numpy(), surface.loss.reshape(-1))
    from kdprobe.writers.landscape_h5 import read_surface_h5

    res, attrs = read_surface_h5(surface.save("s.h5"))
    assert np.array_equal(res.loss, surface.loss)
    assert attrs["directions_sha256"] == surface.settings["directions_sha256"]
    with pytest.raises(KdprobeError, match="--overwrite"):  # a surface is replaced only when asked
        surface.save("s.h5")
    surface.save("s.h5", overwrite=True)
    assert surface.save("s.vtk").read_bytes().startswith(b"# vtk DataFile")
    assert "Plotly.newPlot" in surface.save("s.html").read_text()

    fig = surface.figure()
    assert fig.data[0].type == "contour" and np.array_equal(np.asarray(fig.data[0].z, float), surface.loss)
    assert surface.figure("surface").data[0].type == "surface"
    with pytest.raises(KdprobeError, match="expected a path ending in"):
        surface.save("s.txt")
    with pytest.raises(KdprobeError, match="view"):
        surface.figure("bars")
    with pytest.raises(KdprobeError, match="html=True"):
        kdprobe.landscape(surface.settings["checkpoint"], html=True, **GRID)


def test_interpolation_frame_save_and_figure(ckpts, tmp_path):
    r = kdprobe.interpolate(ckpts[0], ckpts[1], steps=3, range="-0.5:1.5", samples=16, device="cpu", progress=False)
    assert r.barrier is None and "expected the path to include t = 0" in r.barrier_note
    assert r.to_frame()["t"].tolist() == [-0.5, 0.5, 1.5]
    fig = r.figure()
    assert np.array_equal(np.asarray(fig.data[0].y, float), r.loss)
    assert json.loads(r.save(tmp_path / "p.json").read_text())["data"]["coordinates"] == [-0.5, 0.5, 1.5]
    assert r.save(tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the figure as a static file
    with pytest.raises(KdprobeError, match="expected a path ending in"):
        r.save(tmp_path / "p.jpg")
