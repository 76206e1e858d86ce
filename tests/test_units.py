"""One unit rule for every output (docs/units.md, issue 20): a checkpoint's accuracy is the same number, a
fraction 0-1, in every file a study and the commands write: checkpoint meta, `kdprobe info --json`, cells.csv,
summary.json (cells, surfaces, probes), the surface .h5 and .vtk, `kdprobe eval` CSV and JSON, calibration
JSON/CSV, `kdprobe interpolate`'s .h5 at t = 0, report.html and report.md (4 decimals); every JSON document
has the envelope; figures/ holds every figure as PDF and PNG with a numbered caption.

The accuracy is counted here directly (the model on the digits test images, no kdprobe evaluator). A tiny
study is built here; KDPROBE_UNITS_STUDY=DIR checks an existing study folder instead (e.g. `make demo`'s:
KDPROBE_UNITS_STUDY=demo-out pytest tests/test_units.py)."""
from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from kdprobe.checkpoints.format import load_checkpoint
from kdprobe.data.datasets import load_dataset, normalize
from kdprobe.files.documents import KEYS

SPEC = """
title = "units"
seeds = [0]
[train]
dataset = "digits"
model = "resnet8b"
model_kwargs = { width = 0.25 }
preset = "fast"
overrides = { epochs = 1 }
[[methods]]
name = "scratch"
[[methods]]
name = "kd-label"
distill = "label"
teacher = "scratch"
[landscape]
methods = ["scratch"]
seeds = [0]
x = "-0.5:0.5:3"
y = "-0.5:0.5:3"
samples = 359
split = "test"
[calibration]
"""


def _run(*args):
    r = CliRunner().invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return r


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    given = os.environ.get("KDPROBE_UNITS_STUDY")
    if given:
        return Path(given)
    tmp = tmp_path_factory.mktemp("units")
    (tmp / "units.toml").write_text(SPEC)
    _run("study", tmp / "units.toml", "--out", tmp / "s", "--device", "cpu", "--quiet")
    return tmp / "s"


def _accuracy(model, n: int | None = None) -> float:
    """Correct / n on the first n digits test images (all by default), counted here."""
    d = load_dataset("digits")
    x, y = d.test_x[:n], d.test_y[:n]
    with torch.no_grad():
        return int((model(normalize(x, d.mean, d.std)).argmax(1) == y).sum()) / len(y)


def _envelope(doc, kind):
    assert set(KEYS) <= set(doc) and doc["kind"] == kind and "fraction" in doc["units"], sorted(doc)
    return doc["data"]


def test_one_checkpoints_accuracy_is_one_number_in_every_output(study, tmp_path):
    summary = json.loads((study / "summary.json").read_text())
    data = _envelope(summary, "study")
    cell = next(c for c in data["cells"] if c["in_study"])
    ck = load_checkpoint(study / cell["path"])
    want = _accuracy(ck.model)
    assert 0.0 < want <= 1.0
    seen = {"checkpoint meta": ck.meta["test_acc"], "meta history": ck.meta["history"][-1]["test_acc"],
            "summary.json cells": cell["test_acc"]}
    rows = {r["path"]: r for r in csv.DictReader((study / "cells.csv").open())}
    seen["cells.csv"] = float(rows[cell["path"]]["test_acc"])
    _run("info", study / cell["path"], "--json", tmp_path / "info.json")
    seen["info --json"] = _envelope(json.loads((tmp_path / "info.json").read_text()), "info")["meta"]["test_acc"]
    _run("eval", study / cell["path"], "--device", "cpu", "--csv", tmp_path / "e.csv", "--json", tmp_path / "e.json")
    seen["eval --json"] = _envelope(json.loads((tmp_path / "e.json").read_text()), "eval")[0]["test_acc"]
    seen["eval --csv"] = float(next(csv.DictReader((tmp_path / "e.csv").open()))["test_acc"])
    for name, v in seen.items():
        assert v == pytest.approx(want, abs=1e-12), name

    # the surfaces: the centre of the plane is the checkpoint itself (on the samples the surface used)
    for rec in [r for r in data["landscapes"] if r["checkpoint"] == cell["path"]]:
        ci, cj = int(np.argmin(np.abs(rec["ycoords"]))), int(np.argmin(np.abs(rec["xcoords"])))
        here = _accuracy(ck.model, rec["samples"])
        with h5py.File(study / rec["h5"]) as f:
            assert f.attrs["format_version"] >= 2 and "fraction" in f.attrs["units"]
            assert float(f[f"{rec['split']}_acc"][ci, cj]) == pytest.approx(here, abs=1e-12), "surface .h5"
        assert rec["acc"][ci][cj] == pytest.approx(here, abs=1e-12), "summary.json landscapes"
        import vtk
        from vtk.util.numpy_support import vtk_to_numpy

        reader = vtk.vtkStructuredGridReader()
        reader.SetFileName(str(study / rec["vtk"]))
        reader.ReadAllScalarsOn()
        reader.ReadAllFieldsOn()
        reader.Update()
        acc = vtk_to_numpy(reader.GetOutput().GetPointData().GetArray("accuracy"))
        assert float(acc[ci * len(rec["xcoords"]) + cj]) == pytest.approx(here, abs=1e-6), ".vtk (float32)"

    # the probes: calibration's per-checkpoint accuracy, on the samples it used
    if "calibration" in data["probes"]:
        cal = data["probes"]["calibration"]
        row = next(r for r in cal["tables"]["checkpoints"] if r["checkpoint"].endswith(Path(cell["path"]).name))
        assert row["acc"] == pytest.approx(_accuracy(ck.model, cal["settings"]["samples_used"]), abs=1e-12)
        doc = json.loads((study / "calibration.json").read_text())
        assert _envelope(doc, "calibration")["checkpoints"] == cal["tables"]["checkpoints"]

    # interpolate from this checkpoint: t = 0 is the checkpoint
    other = next(c for c in data["cells"] if c["path"] != cell["path"])
    _run("interpolate", study / cell["path"], study / other["path"], "--out", tmp_path / "p.h5", "--steps", 2,
         "--split", "test", "--samples", 0, "--device", "cpu")
    with h5py.File(tmp_path / "p.h5") as f:
        assert float(f["test_acc"][0]) == pytest.approx(want, abs=1e-12), "interpolate .h5"
        assert 0.0 <= float(f.attrs["error_barrier"]) <= 1.0  # an error rate: a fraction too

    # the pages show the same number, to 4 decimals, in the cells table
    page, md = (study / "report.html").read_text(), (study / "report.md").read_text()
    assert f"<td>{want:.4f}</td>" in page and f"| {want:.4f} |" in md
    # and no percent anywhere in the files: every accuracy-like number of the tables lies in [0, 1]
    for c in data["cells"]:
        assert 0.0 <= c["test_acc"] <= 1.0 and 0.0 <= c["best_acc"] <= 1.0
    for g in data["accuracy"]:
        assert 0.0 <= g["mean"] <= 1.0


def test_every_json_output_has_the_envelope(study):
    for p in sorted(study.glob("*.json")):
        doc = json.loads(p.read_text())
        assert set(KEYS) <= set(doc), p.name


def test_figures_hold_each_figure_as_pdf_and_png_with_numbered_captions(study):
    from kdprobe.studies.result import from_dict
    from kdprobe.writers.report_figures import study_figures

    figs = study_figures(from_dict(json.loads((study / "summary.json").read_text())))
    captions = (study / "figures" / "captions.md").read_text()
    page, md = (study / "report.html").read_text(), (study / "report.md").read_text()
    assert figs and [int(n) for n in re.findall(r"\*\*Figure (\d+)\.\*\*", captions)] == list(range(1, len(figs) + 1))
    for f in figs:
        pdf, png = study / f.path("pdf"), study / f.path("png")
        assert pdf.read_bytes()[:5] == b"%PDF-" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f.stem
        assert f"<b>{f.label}</b>" in page and f"![{f.label}]({f.path('png')})" in md  # numbered, embedded
