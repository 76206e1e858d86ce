"""kdprobe study: content-named cells, skip/resume, new cells on a changed spec, report and summary numbers."""
import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from kdprobe.checkpoints.format import load_checkpoint
from kdprobe.errors import KdprobeError
from kdprobe.files.io import sha256_file
from kdprobe.studies.result import from_dict, to_dict
from kdprobe.studies.spec import builtin_specs, load_spec
from trainers import study
from trainers.config import make_config

SPEC = """
title = "tiny test study"
seeds = [0, 1]
[train]
dataset = "digits"
model = "resnet8b"
model_kwargs = {{ width = 0.25 }}
preset = "fast"
overrides = {{ epochs = {epochs}, train_subset = 128 }}
[[methods]]
name = "scratch"
[[methods]]
name = "kd-label"
distill = "label"
teacher = "scratch"
[diversity]
batch_size = 16
runs = 2
[landscape]
methods = ["scratch", "kd-label"]
x = "-1:1:3"
y = "-1:1:3"
samples = 32
"""


def _spec(tmp_path, epochs=2, sets=()):
    p = tmp_path / f"tiny{epochs}.toml"
    p.write_text(SPEC.format(epochs=epochs))
    return load_spec(str(p), None, sets)


def _cfg(seed, epochs=2, **kw):
    """The config a cell must have, built here by hand (not through the study's planner)."""
    return make_config("fast", model="resnet8b", model_kwargs={"width": 0.25}, dataset="digits", epochs=epochs,
                       train_subset=128, seed=seed, **kw)


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("study")
    spec, text = _spec(tmp)
    out = tmp / "out"
    res = study.run_study(spec, out, device="cpu", spec_text=text)
    return tmp, out, res


def _pts(out):
    return sorted(p.relative_to(out).as_posix() for p in (out / "cells").rglob("*.pt"))


def _copy(done, tmp_path):
    dst = tmp_path / "out"
    shutil.copytree(done[1], dst)
    return dst


def test_every_cell_is_a_content_named_checkpoint(done):
    _, out, res = done
    want = []
    for s in (0, 1):
        teacher = f"cells/scratch/seed{s}-{_cfg(s).fingerprint()}.pt"
        student = _cfg(s, distill="label", teacher=teacher).fingerprint()
        want += [teacher, f"cells/kd-label/seed{s}-{student}.pt"]
        ck = load_checkpoint(out / want[-1])
        assert ck.meta["teacher"]["sha256"] == sha256_file(out / teacher)  # the same seed's scratch model
        assert ck.meta["seed"] == s and ck.meta["method"] == "kd-label"
    assert _pts(out) == sorted(want)
    assert {c.path for c in res.cells} == set(want)
    assert all(c.action == "trained" for c in res.cells)


def test_rerun_trains_and_recomputes_nothing(done, tmp_path, monkeypatch):
    out = _copy(done, tmp_path)

    def boom(*a, **k):
        raise AssertionError("nothing should be computed again")

    monkeypatch.setattr(study, "train", boom)
    monkeypatch.setattr("kdprobe.probes.landscape.compute_surface", boom)
    spec, _ = _spec(tmp_path)
    res = study.run_study(spec, out, device="cpu")
    assert all(c.action == "existing" for c in res.cells)
    assert to_dict(res)["data"]["cells"][0]["test_acc"] == to_dict(done[2])["data"]["cells"][0]["test_acc"]


def test_changed_spec_value_adds_cells_and_keeps_old_files(done, tmp_path):
    out = _copy(done, tmp_path)
    before = _pts(out)
    spec, _ = _spec(tmp_path, sets=["train.overrides.epochs=3"])
    res = study.run_study(spec, out, device="cpu")
    after = _pts(out)
    assert set(before) < set(after) and len(after) == 2 * len(before)
    assert {c.path for c in res.cells} == set(after) - set(before)
    assert all(c.epochs == 3 and c.action == "trained" for c in res.cells)


def test_a_file_at_a_cell_path_is_reused_only_if_it_is_that_cell(done, tmp_path, tiny_imagefolder, monkeypatch):
    """issue 10 item 4: the check trainers.pipeline applies (trainers.cells.check_cell), before any training."""
    from kdprobe.checkpoints.format import save_checkpoint
    from trainers.loop import train

    out = _copy(done, tmp_path)
    cells = {(c.method, c.seed): out / c.path for c in done[2].cells}
    scratch0, kd0 = cells[("scratch", 0)], cells[("kd-label", 0)]
    monkeypatch.setattr(study, "train", lambda *a, **k: (_ for _ in ()).throw(AssertionError("trained")))
    spec, _ = _spec(tmp_path)
    keep = scratch0.read_bytes()

    def refused(match):
        with pytest.raises(KdprobeError, match=match) as e:
            study.run_study(spec, out, device="cpu")
        assert "delete" in str(e.value) and "\n" not in str(e.value)

    # a 3-class RGB checkpoint copied over a digits cell
    train(make_config("fast", model="resnet8b", model_kwargs={"width": 0.25}, epochs=1, batch_size=8,
                      dataset=f"imagefolder:{tiny_imagefolder}"), tmp_path / "rgb.pt", device="cpu")
    shutil.copy(tmp_path / "rgb.pt", scratch0)
    refused(r"cell scratch seed 0: .*scratch/seed0-.*\.pt exists but was trained with dataset='imagefolder:")
    # another cell's checkpoint (the KD student) at the scratch cell's path
    shutil.copy(kd0, scratch0)
    refused(r"cell scratch seed 0: .* exists but was trained with distill='label', expected distill='none'")
    # the teacher cell replaced by a file with the same config but other weights: its students are stale
    ck = load_checkpoint(tmp_path / "rgb.pt")
    scratch0.write_bytes(keep)
    meta = load_checkpoint(scratch0).meta
    other = load_checkpoint(scratch0).model
    with torch.no_grad():
        next(other.parameters()).add_(1e-3)
    save_checkpoint(scratch0, other, meta)
    refused(r"cell kd-label seed 0: .* was made from teacher .*scratch/seed0-.*\.pt with sha256")
    # a foreign file there
    torch.save(ck.model.state_dict(), scratch0)
    refused(r"cell scratch seed 0: .* is not a kdprobe checkpoint")
    scratch0.write_bytes(keep)
    assert all(c.action == "existing" for c in study.run_study(spec, out, device="cpu").cells)


def test_interrupted_study_resumes_without_redoing_finished_cells(tmp_path, monkeypatch):
    spec, _ = _spec(tmp_path)
    out, real, calls = tmp_path / "out", study.train, []

    def third_is_killed(config, path, **kw):
        calls.append(path)
        if len(calls) == 3:  # killed mid-run: the loop leaves its .partial state behind
            return real(config, path, stop_after_steps=1, **kw)
        return real(config, path, **kw)

    monkeypatch.setattr(study, "train", third_is_killed)
    with pytest.raises(KeyboardInterrupt):
        study.run_study(spec, out, device="cpu")
    finished = _pts(out)
    assert len(finished) == 2 and (calls[2].with_name(calls[2].name + ".partial")).exists()
    calls.clear()
    res = study.run_study(spec, out, device="cpu")
    assert sorted(p.relative_to(out).as_posix() for p in calls) == sorted(set(_pts(out)) - set(finished))
    actions = {c.path: c.action for c in res.cells}
    assert [actions[p] for p in finished] == ["existing", "existing"]
    assert sorted(actions.values()) == ["existing", "existing", "resumed", "trained"]


def _naive_score(model, x, k=1e-5):
    """Mellor et al. v1 by hand: per-sample gradients one at a time, numpy corrcoef and eigenvalues."""
    rows = []
    for i in range(x.shape[0]):
        xi = x[i:i + 1].clone().requires_grad_(True)
        model(xi).sum().backward()
        rows.append(xi.grad.reshape(-1).double().numpy())
    v = np.linalg.eigvalsh(np.corrcoef(np.stack(rows)))
    return float(-np.sum(np.log(v + k) + 1.0 / (v + k)))


def _figure_traces(page: str) -> tuple[list, list]:
    """Trace types of every plotly figure in a page: (SVG figures drawn directly, figures drawn only
    after the page's WebGL test)."""
    import re

    dec = json.JSONDecoder()
    flat = [[t["type"] for t in dec.raw_decode(page, m.end())[0]]
            for m in re.finditer(r'Plotly\.newPlot\(\s*"[^"]+",\s*', page)]
    guarded = []
    for m in re.finditer(r'class="kd-webgl"></div><script', page):
        i = page.index("getContext", m.end())  # the WebGL test comes before the figure
        j = page.index("var fig = ", i) + len("var fig = ")
        guarded.append([t["type"] for t in dec.raw_decode(page, j)[0]["data"]])
    return flat, guarded


def test_report_and_summary_numbers_come_from_the_checkpoints(done):
    from kdprobe.data.datasets import load_dataset, normalize
    from kdprobe.probes.diversity import probe_indices

    _, out, res = done
    page = (out / "report.html").read_text()
    # one plotly.js bundle; three figures: the diversity strip plot, the landscape group's contour maps and,
    # separately and behind a WebGL test, its 3-D surfaces (issue 10 item 17: no WebGL must not blank 2-D views)
    assert page.count("* plotly.js v") == 1 and page.count("Plotly.newPlot") == 3
    flat, solid = _figure_traces(page)
    assert flat == [["scatter"] * 3, ["contour", "contour"]] and solid == [["surface", "surface"]]
    summary = json.loads((out / "summary.json").read_text())["data"]
    acc = {}
    for c in summary["cells"]:
        acc.setdefault(c["method"], []).append(load_checkpoint(out / c["path"]).meta["test_acc"])
    for g in summary["accuracy"]:
        vals = np.array(acc[g["group"]])
        assert g["mean"] == pytest.approx(vals.mean()) and g["std"] == pytest.approx(vals.std(ddof=1))
        assert f"{vals.mean():.4f} ± {vals.std(ddof=1):.4f}" in page and 0 < vals.mean() <= 1  # fractions
    data = load_dataset("digits")
    x_all = data.train_x
    batches = [normalize(x_all[i], data.mean, data.std) for i in probe_indices(len(x_all), 2, 16, 0)]
    means = {}
    for m in summary["diversity"]["scores"]:
        model = load_checkpoint(out / m["path"]).model
        naive = [_naive_score(model, b) for b in batches]
        assert m["values"] == pytest.approx(naive, rel=1e-5)
        means.setdefault(m["group"], []).append(np.mean(naive))
    for g in summary["diversity"]["groups"]:
        vals = np.array(means[g["group"]])
        assert g["mean"] == pytest.approx(vals.mean(), rel=1e-5)
        assert f"{g['mean']:.3f} ± {g['std']:.3f}" in page and f"{vals.mean():.2f}" in f"{g['mean']:.2f}"
    for rec in summary["landscapes"]:  # the surface in the summary is the one in its HDF5 file
        import h5py

        assert Path(rec["h5"]).name.startswith(rec["method"] + "-seed")  # file names carry the method
        with h5py.File(out / rec["h5"]) as f:
            assert np.allclose(np.asarray(f["train_loss"]), np.asarray(rec["loss"]))
        assert rec["h5"] in page and rec["vtk"] in page
    for rel in ("diversity.csv", "summary.json", "cells.csv"):
        assert f'href="{rel}"' in page and (out / rel).exists()


def test_summary_json_round_trips(done):
    _, out, res = done
    d = json.loads((out / "summary.json").read_text())
    assert to_dict(res) == d
    back = from_dict(d)
    assert to_dict(back) == d
    assert back.cells == res.cells and back.diversity.scores == res.diversity.scores
    assert math.isnan(back.accuracy[0].p_value)  # the reference row: nan -> null -> nan


@pytest.mark.parametrize("edit, key", [
    (('distill = "label"', 'distill = "lable"'), "methods[1].distill"),
    (('distill = "label"\n', ''), "methods[1].teacher"),  # a teacher without KD
    (("teacher = \"scratch\"", "teacher = \"teacher\""), "methods[1].teacher"),
    (("batch_size = 16", "batch_size = 64"), "diversity.batch_size"),  # digits rows have 64 entries
    (('preset = "fast"', 'preset = "fast"\nepochs = 3'), "train.epochs"),
    (("train_subset = 128", "train_subset = 128, foo = 1"), "train.overrides.foo"),
    (("train_subset = 128", "train_subset = 128, seed = 3"), "train.overrides.seed"),
    (('x = "-1:1:3"', 'x = "-1:1"'), "landscape.x"),
    (("runs = 2", "runs = 0"), "diversity.runs"),
    (("seeds = [0, 1]", "seeds = [0, 0]"), "seeds"),
])
def test_spec_errors_name_the_toml_key(tmp_path, edit, key):
    p = tmp_path / "bad.toml"
    p.write_text(SPEC.format(epochs=2).replace(*edit))
    with pytest.raises(KdprobeError) as e:
        spec, _ = load_spec(str(p))
        study.run_study(spec, tmp_path / "out", device="cpu")
    assert f"{key}:" in str(e.value) and "\n" not in str(e.value)
    assert not list((tmp_path / "out").rglob("*.pt"))  # refused before any training


def test_builtin_specs_resolve_at_every_scale_and_plan(tmp_path):
    assert {"table6", "table7", "pruning-l1"} <= set(builtin_specs())
    for name in builtin_specs():
        for scale in ("digits", "paper"):
            spec, _ = load_spec(name, scale)
            cells = study.plan_cells(spec, tmp_path)
            assert len(cells) == len(spec.methods) * len(spec.seeds)
    t6, _ = load_spec("table6")  # default scale: digits, N below the 64-entry Jacobian rows
    assert t6.scale == "digits" and t6.diversity.batch_size < 64 and len(t6.seeds) == 5
    from trainers.study_probes import check_probes
    check_probes(t6)
    t7 = study.plan_cells(load_spec("table7", "digits")[0], tmp_path)
    # end of lr stages 1 and 2 of 8 epochs (x0.1 at 50%, 75%), for the surfaces' seed 0 only
    assert [(c.seed, c.snapshots) for c in t7 if c.snapshots] == [(0, (4, 6))] * 3 and len(t7) == 9
    with pytest.raises(KdprobeError, match="scales"):
        load_spec("table6", "huge")


@pytest.mark.slow  # two subprocesses each import torch and sklearn: ~10 s on 2 busy cores
def test_parallel_jobs_give_the_same_checkpoints(done, tmp_path):
    spec, _ = _spec(tmp_path, sets=['methods=[{name = "scratch"}]', "diversity.methods=[\"scratch\"]",
                                    'landscape.methods=["scratch"]'])
    out = tmp_path / "par"
    res = study.run_study(spec, out, device="cpu", jobs=2)
    assert [c.action for c in res.cells] == ["trained", "trained"]
    for c in res.cells:
        a, b = load_checkpoint(out / c.path).model.state_dict(), load_checkpoint(done[1] / c.path).model.state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert not list(out.rglob("*.job.json"))


def test_cli_list_and_one_line_errors(tmp_path):
    import typer
    from typer.testing import CliRunner

    from cli.common import handle_errors
    from cli.study import study as study_cmd

    app = typer.Typer()
    app.command("study")(handle_errors(study_cmd))
    app.command("noop")(lambda: None)
    r = CliRunner().invoke(app, ["study", "--list"])
    line = next(ln for ln in r.output.splitlines() if ln.startswith("table6 "))
    assert r.exit_code == 0 and "digits" in line and "paper" in line
    bad = tmp_path / "bad.toml"
    bad.write_text(SPEC.format(epochs=2).replace("runs = 2", "runs = -1"))
    r = CliRunner().invoke(app, ["study", str(bad), "--out", str(tmp_path / "o")])
    assert r.exit_code == 1 and "diversity.runs" in r.output


def test_cells_csv_names_model_and_dataset(done):
    _, out, res = done
    rows = list(csv.DictReader((out / "cells.csv").open()))
    assert len(rows) == len(res.cells) == 4
    for r in rows:
        meta = load_checkpoint(out / r["path"]).meta
        assert r["model"] == "resnet8b-width0.25" and r["dataset"] == meta["dataset"] == "digits"


def test_report_never_shows_an_interval_outside_what_the_metric_can_take(done):
    from dataclasses import replace

    from kdprobe.probes.diversity_table import GroupStats
    from kdprobe.writers.report import report_html

    _, out, res = done
    # an accuracy group at 0.985 +- 0.031 (a few seeds, wide t interval): raw interval [0.954, 1.016]
    acc = GroupStats("scratch", 3, 0.985, 0.012, 0.007, 0.031, 0.954, 1.016, math.nan, math.nan, math.nan, False)
    # a v1 diversity group at N=16 whose interval would reach -2.0, above the largest possible score -16
    d = res.diversity
    div = replace(d.groups[0], mean=-30.0, half_width=28.0, low=-58.0, high=-2.0)
    page = report_html(replace(res, accuracy=(acc,), diversity=replace(d, groups=(div,) + d.groups[1:])))
    assert "[0.9540, 1.0000*]" in page and "1.0160" not in page and "clipped to what an accuracy can take" in page
    assert "[-58.000, -16.000*]" in page and "-2.000" not in page
    assert to_dict(replace(res, accuracy=(acc,)))["data"]["accuracy"][0]["high"] == 1.016  # files keep the raw end


def test_spec_toml_with_a_bom_loads_and_other_encodings_are_one_line(tmp_path):
    p = tmp_path / "bom.toml"
    text = "# d\u00e9mo\n" + SPEC.format(epochs=2)
    p.write_bytes(b"\xef\xbb\xbf" + text.encode())  # UTF-8 with a byte-order mark: simply works
    spec, got = load_spec(str(p))
    assert spec.seeds == (0, 1) and got == text
    p.write_bytes(text.encode("latin-1"))
    with pytest.raises(KdprobeError, match=r"bom.toml:1: expected a UTF-8 TOML file, got byte 0xe9") as e:
        load_spec(str(p))
    assert "\n" not in str(e.value)


def test_report_markdown_holds_the_reports_tables_and_the_landscape_page_its_figure(done):
    _, out, res = done
    md = (out / "report.md").read_text()
    summary = json.loads((out / "summary.json").read_text())["data"]
    section = md.split("## Test accuracy", 1)[1].split("\n## ", 1)[0]
    rows = {ln.split("|")[1].strip(): ln for ln in section.splitlines() if ln.startswith("| ")}
    for g in summary["accuracy"]:  # each group's row carries the summary's mean and std, as the HTML shows them
        assert f"| {g['mean']:.4f} ± {g['std']:.4f} |" in rows[g["group"]]
    assert "## Test accuracy" in md and "## Loss landscapes" in md and "newPlot" not in md and "<" not in md
    assert "|---|---:|" in md  # text columns left, numbers right
    page = (out / "landscapes.html").read_text()
    assert page.count("* plotly.js v") == 1 and '"type":"contour"' in page.replace(" ", "")


def test_html_to_markdown_by_hand():
    from kdprobe.writers.report_markdown import html_to_markdown

    page = ("<html><head><style>td{}</style><script>var x=1;</script></head><body><h1>T</h1><nav><a>skip</a></nav>"
            "<p class='note'>a  <b>b</b><br>c</p><table><tr><th>m</th><th>acc</th></tr>"
            "<tr><td>kd|x</td><td>1.50 ± 0.20</td></tr></table><pre>{\n  \"k\": 1\n}</pre></body></html>")
    assert html_to_markdown(page) == ("# T\n\na b c\n\n| m | acc |\n|---|---:|\n| kd\\|x | 1.50 ± 0.20 |\n\n"
                                      "```\n{\n  \"k\": 1\n}\n```\n")


def test_a_fresh_rerun_reproduces_the_summary_number_for_number(done, tmp_path):
    """issue 13's promise at digits scale: same spec, same seeds, same machine -> `kdprobe compare` finds
    every number equal (cells retrained from nothing, probes recomputed)."""
    from typer.testing import CliRunner

    from cli.main import app

    tmp, out, _ = done
    spec, text = _spec(tmp_path)
    again = tmp_path / "again"
    study.run_study(spec, again, device="cpu", spec_text=text)
    r = CliRunner().invoke(app, ["compare", str(out), str(again)])
    assert r.exit_code == 0, r.output
    assert ": the same (" in r.output
