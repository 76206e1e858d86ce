"""kdprobe.pipeline: the same tiny pruning pipeline from Python and from `kdprobe pipeline pruning` gives the same
checkpoints and numbers bit for bit, and its result (.to_dict, .to_frame, .save, .figure) holds what the files hold."""
from __future__ import annotations

import csv
import json

import pytest
import torch
from typer.testing import CliRunner

import kdprobe
from cli.main import app
from kdprobe.checkpoints.format import load_checkpoint, read_payload
from kdprobe.errors import KdprobeError
from kdprobe.files.documents import is_envelope
from kdprobe.files.io import sha256_file

# the tiny settings of tests/test_pipeline.py
OPTS = dict(model="resnet8a", width=0.25, dataset="digits", train_subset=256, method="l1", remaining="0.5,0.5,0.5",
            distill="label", seeds="0", epochs=2, finetune_epochs=1, device="cpu")
CELLS = ["scratch", "scratch_pruned", "scratch_finetuned", "kd-label", "kd-label_pruned", "pre_distill-label",
         "post_distill-label", "pre_post-label", "self_distill-label"]
TABLES = ("results.csv", "surplus.csv", "surplus.json")


def _argv(opts: dict) -> list[str]:
    return [a for k, v in opts.items() for a in (f"--{k.replace('_', '-')}", str(v))]


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    """The pipeline once through the API (tmp/api) and once through the CLI (tmp/cli)."""
    tmp = tmp_path_factory.mktemp("api_pipeline")
    notes, events = [], []
    res = kdprobe.pipeline(out=tmp / "api", quiet=True, note=notes.append, on_event=events.append, **OPTS)
    r = CliRunner().invoke(app, ["pipeline", "pruning", "--out", str(tmp / "cli"), "--quiet", *_argv(OPTS)])
    assert r.exit_code == 0, r.output
    return tmp, res, r.output, notes, events


def test_python_and_the_cli_make_the_same_checkpoints_and_numbers(ran):
    tmp, res, output, notes, events = ran
    assert res.out == (tmp / "api").resolve()
    assert [c.name for c in res.cells] == CELLS
    for name in CELLS:
        a, b = load_checkpoint(tmp / "api" / "seed0" / f"{name}.pt"), load_checkpoint(tmp / "cli" / "seed0" / f"{name}.pt")
        sa, sb = a.model.state_dict(), b.model.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), name
        assert a.meta.get("test_acc") == b.meta.get("test_acc") and a.meta.get("history") == b.meta.get("history")
    for f in TABLES:  # no paths in these: byte for byte
        assert (tmp / "api" / f).read_bytes() == (tmp / "cli" / f).read_bytes(), f
    # pipeline.json: the same but for the hashes of checkpoints that record their (absolute) teacher/init paths
    docs = [json.loads((tmp / d / "pipeline.json").read_text()) for d in ("api", "cli")]
    for doc in docs:
        for c in doc["data"]["cells"]:
            c.pop("sha256")
    assert docs[0] == docs[1]
    assert res.cells[0].sha256 == sha256_file(tmp / "cli" / "seed0" / "scratch.pt")  # no upstream: same bytes
    # the CLI prints what the result holds; the API told note and on_event what the CLI prints
    assert notes == [f"pipeline: resnet8a-width0.25, l1 pruning 50/50/50, KD label, seeds 0, bn_sparsity 0 -> "
                     f"{tmp / 'api'}"]
    assert notes[0].replace(str(tmp / "api"), str(tmp / "cli")) in output
    assert [(e.index, e.cell.name, e.stage) for e in events if e.stage == "done"] == \
           [(i, n, "done") for i, n in enumerate(CELLS, 1)]
    label = res.rows[1]
    assert label["train_type"] == "label" and f"{label['self_distill']:.4f}" in output
    assert f"{res.surplus[0].surplus:+.4f}" in output
    assert output.rstrip().endswith(f"wrote results.csv, surplus.csv, surplus.json, pipeline.json in "
                                    f"{(tmp / 'cli').resolve()}")


def test_cells_and_rows_are_the_checkpoints_own(ran):
    tmp, res, *_ = ran
    for c in res.cells:
        assert c.path == res.out / c.file and c.sha256 == sha256_file(c.path)
        meta = read_payload(c.path)["meta"]
        if c.phase == "prune":
            assert c.test_acc is None and c.action == "pruned" and c.column is None
            assert c.pruning["params_after"] < c.pruning["params_before"] == meta["pruning"]["params_before"]
        else:
            assert c.test_acc == meta["test_acc"] and c.action == "trained"
    by = {(c.train_type, c.column): c.test_acc for c in res.cells if c.column}
    for row in res.rows:
        for col in ("unpruned", "finetuned", "post_distill", "pre_post", "self_distill"):
            assert row.get(col) == by.get((row["train_type"], col)), (row["train_type"], col)
    s = res.surplus[0]
    assert s.surplus == pytest.approx((by["label", "self_distill"] - by["scratch", "finetuned"])
                                      - (by["label", "unpruned"] - by["scratch", "unpruned"]), abs=1e-12)
    assert (res.model, res.setting, res.warnings) == ("resnet8a-width0.25", "50/50/50", ())


def test_to_dict_is_pipeline_json(ran):
    _, res, *_ = ran
    doc = res.to_dict()
    assert doc == json.loads(res.files["pipeline_json"].read_text())
    assert is_envelope(doc) and doc["kind"] == "pipeline" and doc["settings"]["model"] == "resnet8a-width0.25"
    assert [c["sha256"] for c in doc["data"]["cells"]] == [c.sha256 for c in res.cells]
    doc["kind"] = "changed"  # a copy: the result is not changed through it
    assert res.to_dict()["kind"] == "pipeline"


def test_to_frame_every_table(ran):
    _, res, *_ = ran
    results = res.to_frame()
    assert list(results.columns) == ["model", "setting", "train_type", "seed", "unpruned", "finetuned",
                                     "post_distill", "pre_post", "self_distill"]
    assert list(results["train_type"]) == ["scratch", "label"] and results["self_distill"][1] == res.rows[1]["self_distill"]
    surplus = res.to_frame("surplus")
    assert list(surplus["kd_type"]) == ["label"] and surplus["surplus"][0] == res.surplus[0].surplus
    cells = res.to_frame("cells")
    assert list(cells["name"]) == CELLS and list(cells["sha256"]) == [c.sha256 for c in res.cells]
    assert list(cells["action"]) == [c.action for c in res.cells]
    with pytest.raises(KdprobeError, match="no table 'nope'; it has results, surplus, cells"):
        res.to_frame("nope")


def test_save_every_suffix(ran, tmp_path):
    _, res, *_ = ran
    assert res.save(tmp_path / "p.json").read_bytes() == res.files["pipeline_json"].read_bytes()
    assert res.save(tmp_path / "r.csv").read_bytes() == res.files["results_csv"].read_bytes()
    assert res.save(tmp_path / "s.csv", table="surplus").read_bytes() == res.files["surplus_csv"].read_bytes()
    rows = list(csv.DictReader(res.save(tmp_path / "c.csv", table="cells").open()))
    assert [r["name"] for r in rows] == CELLS and [r["sha256"] for r in rows] == [c.sha256 for c in res.cells]
    assert res.save(tmp_path / "p.html").read_text().lower().startswith("<!doctype html>")
    for kind, magic in (("pdf", b"%PDF-"), ("png", b"\x89PNG\r\n\x1a\n"), ("svg", b"<?xml")):
        assert res.save(tmp_path / f"p.{kind}").read_bytes().startswith(magic), kind
    with pytest.raises(KdprobeError, match="ending in"):
        res.save(tmp_path / "p.txt")
    with pytest.raises(KdprobeError, match="no table 'x'"):
        res.save(tmp_path / "x.csv", table="x")
    assert not (tmp_path / "x.csv").exists()
    before = res.files["results_csv"].read_bytes()
    with pytest.raises(KdprobeError, match="input"):  # never over a file the pipeline wrote
        res.save(res.files["results_csv"], table="cells")
    assert res.files["results_csv"].read_bytes() == before


def test_figure_shows_the_accuracies_and_the_surplus(ran):
    _, res, *_ = ran
    fig = res.figure()
    bars = {t.name: dict(zip(t.x, t.y)) for t in fig.data if t.name != "surplus"}
    assert bars["unpruned"] == {"scratch": res.rows[0]["unpruned"], "label": res.rows[1]["unpruned"]}
    assert bars["self_distill"] == {"label": res.rows[1]["self_distill"]}  # scratch has no such cell
    (surplus,) = [t for t in fig.data if t.name == "surplus"]
    assert list(surplus.y) == [res.surplus[0].surplus] and list(surplus.x) == ["label"]
    assert "resnet8a-width0.25 50/50/50" in fig.layout.title.text


def test_running_again_resumes_and_skips_every_cell(ran, monkeypatch):
    tmp, res, *_ = ran
    from trainers import loop

    monkeypatch.setattr(loop, "train", lambda *a, **k: pytest.fail("trained a cell whose checkpoint exists"))
    again = kdprobe.pipeline(out=tmp / "api", quiet=True, **OPTS)
    assert [c.action for c in again.cells] == ["skipped"] * len(CELLS)
    assert again.to_dict() == res.to_dict() and again.rows == res.rows


@pytest.mark.parametrize("bad, flag", [
    (dict(width=-1), "--width"), (dict(seeds="0,x"), "--seeds"), (dict(seeds=[-1]), "--seeds"),
    (dict(epochs=0), "--epochs"), (dict(finetune_epochs=0), "--finetune-epochs"), (dict(lr=float("nan")), "--lr"),
    (dict(distill="mixup"), "--distill"), (dict(kd_settings="{"), "--kd-settings"),
    (dict(kd_settings={"dkd": {"beta": 2}}), "--kd-settings"), (dict(executor="ssh"), "--executor"),
    (dict(partition="gpu"), "--partition"), (dict(log_dir="logs"), "--log-dir"), (dict(log="nope"), "--log"),
])
def test_bad_input_is_one_line_naming_the_option_before_any_work(tmp_path, bad, flag):
    notes = []
    with pytest.raises(KdprobeError) as e:
        kdprobe.pipeline(out=tmp_path / "out", quiet=True, note=notes.append, **{**OPTS, **bad})
    msg = str(e.value)
    assert flag in msg and "\n" not in msg, msg
    assert not notes and not (tmp_path / "out").exists()


def test_an_out_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(KdprobeError, match="is a file"):
        kdprobe.pipeline(out=tmp_path / "notes.txt", quiet=True, **OPTS)
    assert (tmp_path / "notes.txt").read_text() == "mine"
