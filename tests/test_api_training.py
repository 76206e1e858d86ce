"""kdprobe.train / kdprobe.prune / kdprobe.study: the same inputs give the same bits from Python and from the CLI,
and their results (.to_dict, .to_frame, .save, .figure) hold what the files hold."""
import csv
import json
import math
import re

import pytest
import torch
from typer.testing import CliRunner

import kdprobe
from cli.main import app
from kdprobe.checkpoints.format import load_checkpoint
from kdprobe.files.documents import is_envelope
from kdprobe.errors import KdprobeError

TRAIN_OPTS = dict(model="resnet8b", width=0.25, preset="fast", epochs=2, train_subset=64, batch_size=32, seed=3,
                  device="cpu")


def _argv(opts: dict) -> list[str]:
    return [a for k, v in opts.items() for a in (f"--{k.replace('_', '-')}", str(v))]


def _same_weights(a, b) -> bool:
    sa, sb = load_checkpoint(a).model.state_dict(), load_checkpoint(b).model.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("api_train")
    r = CliRunner().invoke(app, ["train", "--out", str(tmp / "cli.pt"), "--quiet", *_argv(TRAIN_OPTS)])
    assert r.exit_code == 0, r.output
    res = kdprobe.train(out=tmp / "api.pt", quiet=True, **TRAIN_OPTS)
    return tmp, r.output, res


def test_train_from_python_equals_the_cli_bit_for_bit(trained):
    tmp, output, res = trained
    assert res.action == "trained" and res.path == tmp / "api.pt" and res.resumed_from_epoch is None
    assert _same_weights(tmp / "cli.pt", tmp / "api.pt")
    cli_meta = load_checkpoint(tmp / "cli.pt").meta
    assert cli_meta["history"] == res.history and len(res.history) == 2  # every per-epoch number, exactly
    assert cli_meta["test_acc"] == res.test_acc and cli_meta["best_acc"] == res.best_acc
    assert cli_meta["config"] == res.meta["config"] == res.config.to_dict()
    # what the CLI printed is the number the result holds
    assert f"scratch resnet8b seed 3: test accuracy {res.test_acc:.2%} (last epoch; best {res.best_acc:.2%})" \
        in output


def test_train_result_accuracy_is_the_checkpoints_own(trained):
    """test_acc recomputed here by hand: the loaded model on the whole digits test split."""
    _, _, res = trained
    ck = res.checkpoint
    data = kdprobe.load_dataset("digits")
    x = (data.test_x.float() / 255.0 - torch.tensor(data.mean).view(1, -1, 1, 1)) / torch.tensor(data.std).view(1, -1, 1, 1)
    with torch.no_grad():
        acc = int((ck.model(x).argmax(1) == data.test_y).sum()) / len(data.test_y)  # a fraction (docs/units.md)
    assert math.isclose(res.test_acc, acc, abs_tol=1e-12) and 0 < res.test_acc <= 1
    assert res.best_acc == max(r["test_acc"] for r in res.history)


def test_train_result_frame_dict_save_figure(trained, tmp_path):
    _, _, res = trained
    frame = res.to_frame()
    assert list(frame["epoch"]) == [1, 2] and list(frame["test_acc"]) == [r["test_acc"] for r in res.history]
    doc = res.to_dict()
    assert is_envelope(doc) and doc["kind"] == "train" and doc["settings"] == res.meta["config"]
    data = doc["data"]
    assert data["path"] == str(res.path) and data["test_acc"] == res.test_acc
    assert data["meta"]["history"] == res.history and data["log"].endswith("api.jsonl")
    saved = json.loads(res.save(tmp_path / "run.json").read_text())
    assert saved["data"]["test_acc"] == res.test_acc and saved["data"]["meta"]["config"]["model"] == "resnet8b"
    for kind, magic in (("pdf", b"%PDF-"), ("png", b"\x89PNG\r\n\x1a\n"), ("svg", b"<?xml")):
        assert res.save(tmp_path / f"run.{kind}").read_bytes().startswith(magic), kind
    rows = list(csv.DictReader(res.save(tmp_path / "run.csv").open()))
    assert [float(r["train_loss"]) for r in rows] == [r["train_loss"] for r in res.history]
    assert res.save(tmp_path / "run.html").read_text().lower().startswith("<!doctype html>")
    fig = res.figure()
    assert [t.name for t in fig.data] == ["train_loss", "test_loss", "train_acc", "test_acc"]
    assert list(fig.data[3].y) == [r["test_acc"] for r in res.history]
    with pytest.raises(KdprobeError, match=r"expected a path ending in \.csv, \.htm, \.html, \.json") as e:
        res.save(tmp_path / "run.pt")  # not a figure suffix either
    assert "\n" not in str(e.value)
    (tmp_path / "notes.json").write_text("a text file, not JSON\n")
    with pytest.raises(KdprobeError):  # another kind of file is never replaced
        res.save(tmp_path / "notes.json")


def test_train_leaves_an_existing_checkpoint_alone(trained):
    tmp, _, res = trained
    before = (tmp / "api.pt").stat().st_mtime_ns
    again = kdprobe.train(out=tmp / "api.pt", quiet=True, **TRAIN_OPTS)
    assert again.action == "existing" and again.test_acc == res.test_acc
    assert (tmp / "api.pt").stat().st_mtime_ns == before


@pytest.mark.parametrize("kwargs, match", [
    (dict(init="x.pt", model="resnet8b"), r"--init x.pt gives the model and its widths, so --model"),
    (dict(model_kwargs=[1]), r"expected --model-kwargs as a dict or a JSON object"),
    (dict(model_kwargs="{nope"), r"--model-kwargs"),
    (dict(milestones="a,b"), r"expected --milestones as comma-separated epochs"),
    (dict(epochs=0), r"--epochs"),
    (dict(distill="label"), r"--distill label needs a teacher"),
])
def test_train_bad_options_are_one_line_errors_before_any_file(tmp_path, kwargs, match):
    if "init" in kwargs:
        kwargs = dict(kwargs, init=str(tmp_path / kwargs["init"]))
        match = match.replace("x.pt", ".*x.pt")
    with pytest.raises(KdprobeError, match=match) as e:
        kdprobe.train(out=tmp_path / "m.pt", quiet=True, **kwargs)
    assert "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_prune_from_python_equals_the_cli_bit_for_bit(trained, tmp_path):
    tmp, _, res = trained
    src = str(res.path)
    r = CliRunner().invoke(app, ["prune", src, "--method", "weight", "--remaining", "0.5", "--out",
                                 str(tmp_path / "cli.pt")])
    assert r.exit_code == 0, r.output
    p = kdprobe.prune(src, method="weight", remaining=0.5, out=tmp_path / "api.pt")
    assert p.remaining == "0.5" and p.method == "weight" and p.arch == "resnet8b"
    assert _same_weights(tmp_path / "cli.pt", tmp_path / "api.pt")
    a, b = load_checkpoint(tmp_path / "cli.pt"), load_checkpoint(tmp_path / "api.pt")
    assert a.extra["masks"].keys() == b.extra["masks"].keys()
    assert all(torch.equal(a.extra["masks"][k], b.extra["masks"][k]) for k in a.extra["masks"])
    assert a.meta["pruning"] == b.meta["pruning"] == p.info
    # sizes counted here by hand on the source and the pruned model
    model = p.checkpoint.model
    assert p.before["params"] == sum(t.numel() for t in res.checkpoint.model.parameters())
    assert p.after["nonzero"] == sum(int((t != 0).sum()) for t in model.parameters()) < p.before["nonzero"]
    assert f"wrote {tmp_path / 'cli.pt'}" in r.output


def test_prune_result_frame_dict_save_figure_and_warnings(trained, tmp_path):
    _, _, res = trained
    notes = []
    p = kdprobe.prune(res.path, method="slimming", remaining="0.5", out=tmp_path / "s.pt", note=notes.append)
    assert notes and tuple(notes) == p.warnings and "bn-sparsity" in notes[0]
    frame = p.to_frame()
    assert list(frame["step"]) == ["before", "after"]
    assert list(frame["params"]) == [p.before["params"], p.after["params"]] and p.after["params"] < p.before["params"]
    assert frame["test_acc"][0] == res.test_acc  # the source's recorded accuracy; nothing measured after
    doc = p.to_dict()
    assert is_envelope(doc) and doc["kind"] == "prune" and doc["settings"]["method"] == "slimming"
    assert doc["data"]["pruning"]["source_sha256"] == load_checkpoint(tmp_path / "s.pt").meta["pruning"]["source_sha256"]
    assert json.loads(p.save(tmp_path / "s.json").read_text())["data"]["after"] == p.after
    assert p.save(tmp_path / "s.pdf").read_bytes().startswith(b"%PDF-")
    assert [r["step"] for r in csv.DictReader(p.save(tmp_path / "s.csv").open())] == ["before", "after"]
    fig = p.figure()
    assert [t.name for t in fig.data] == ["before", "after"] and list(fig.data[1].y) == list(p.after.values())
    with pytest.raises(KdprobeError, match="expected --method one of") as e:
        kdprobe.prune(res.path, method="nope", remaining="0.5", out=tmp_path / "n.pt")
    assert "\n" not in str(e.value) and not (tmp_path / "n.pt").exists()
    with pytest.raises(KdprobeError, match="expected --remaining as a fraction"):
        kdprobe.prune(res.path, method="weight", remaining=["half"], out=tmp_path / "n.pt")
    with pytest.raises(KdprobeError, match="expected --arch-kwargs as a dict"):
        kdprobe.prune(res.path, method="weight", remaining="0.5", out=tmp_path / "n.pt", arch_kwargs=3)


STUDY = """
title = "tiny api study"
seeds = [0, 1]
[train]
dataset = "digits"
model = "resnet8b"
model_kwargs = { width = 0.25 }
preset = "fast"
overrides = { epochs = 1, train_subset = 64 }
[[methods]]
name = "scratch"
[diversity]
batch_size = 16
runs = 1
"""


@pytest.fixture(scope="module")
def studied(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("api_study")
    spec = tmp / "tiny.toml"
    spec.write_text(STUDY)
    r = CliRunner().invoke(app, ["study", str(spec), "--out", str(tmp / "cli"), "--device", "cpu", "--quiet"])
    assert r.exit_code == 0, r.output
    res = kdprobe.study(spec, out=tmp / "api", device="cpu", quiet=True)
    return tmp, r.output, res


def test_study_from_python_equals_the_cli(studied):
    tmp, output, res = studied
    cli_summary = json.loads((tmp / "cli" / "summary.json").read_text())["data"]
    same = ("method", "seed", "model", "dataset", "test_acc", "best_acc", "epochs", "path", "fingerprint", "teacher")
    assert [{k: c[k] for k in same} for c in cli_summary["cells"]] == [{k: c[k] for k in same} for c in res.table()]
    assert cli_summary["accuracy"] == res.to_dict()["data"]["accuracy"]
    assert cli_summary["diversity"]["scores"] == res.to_dict()["data"]["diversity"]["scores"]
    for c in res.table():
        assert _same_weights(tmp / "cli" / c["path"], tmp / "api" / c["path"])
    assert f"study tiny (scale as written): 1 methods x 2 seeds -> {tmp / 'cli'}" in output


def test_study_result_holds_what_its_files_hold(studied, tmp_path):
    tmp, _, res = studied
    assert res.to_dict() == json.loads((tmp / "api" / "summary.json").read_text())
    rows = res.table()
    assert len(rows) == 2 and {r["seed"] for r in rows} == {0, 1}
    for r in rows:  # the results table's numbers are the checkpoints' own
        assert r["test_acc"] == load_checkpoint(tmp / "api" / r["path"]).meta["test_acc"]
    acc = res.table("accuracy")[0]
    assert acc["group"] == "scratch" and math.isclose(acc["mean"], sum(r["test_acc"] for r in rows) / 2, rel_tol=1e-12)
    assert list(res.to_frame()["test_acc"]) == [r["test_acc"] for r in rows]
    assert (res.save(tmp_path / "cells.csv").read_text() == (tmp / "api" / "cells.csv").read_text())
    uuid = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")  # plotly's div ids
    page = uuid.sub("ID", res.save(tmp_path / "r.html").read_text())
    assert page == uuid.sub("ID", (tmp / "api" / "report.html").read_text()) and "scratch" in page
    assert json.loads(res.save(tmp_path / "s.json").read_text()) == res.to_dict()
    # the study's report.md also embeds its figures/ PNGs, which a copy saved elsewhere has no folder for
    study_md = "".join(ln for ln in (tmp / "api" / "report.md").read_text().splitlines(True)
                       if not ln.startswith("![Figure"))
    assert res.save(tmp_path / "r.md").read_text() == re.sub(r"\n{3,}", "\n\n", study_md)
    acc_rows = list(csv.DictReader(res.save(tmp_path / "acc.csv", table="accuracy").open()))
    assert float(acc_rows[0]["mean"]) == acc["mean"]
    fig = res.figure()
    assert fig is not None and res.figure("diversity").to_json() == fig.to_json()
    for bad in (lambda: res.table("nope"), lambda: res.figure("nope"), lambda: res.save(tmp_path / "x.txt")):
        with pytest.raises(KdprobeError) as e:
            bad()
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("kwargs, match", [
    (dict(name_or_spec="no-such-study"), "expected a built-in study"),
    (dict(name_or_spec="demo", jobs=0), "--jobs"),
    (dict(name_or_spec="demo", set="train.nope=1"), "train"),
])
def test_study_bad_input_is_a_one_line_error_before_any_folder(tmp_path, kwargs, match):
    with pytest.raises(KdprobeError, match=match) as e:
        kdprobe.study(out=tmp_path / "s", quiet=True, **kwargs)
    assert "\n" not in str(e.value) and not (tmp_path / "s").exists()


def test_list_studies_names_the_builtins():
    from kdprobe.api.training import list_studies
    from kdprobe.studies.spec import builtin_specs

    assert [r["study"] for r in list_studies()] == list(builtin_specs())
