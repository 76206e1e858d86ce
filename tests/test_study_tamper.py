"""A reused leaf cell whose weights were replaced is refused (DIR/cells.sha256), like a changed teacher:
otherwise the probes would read the new weights and the accuracy table the numbers recorded inside."""
import shutil

import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from kdprobe.checkpoints.format import load_checkpoint, save_checkpoint
from kdprobe.errors import KdprobeError
from kdprobe.files.io import sha256_file
from kdprobe.studies.spec import load_spec
from trainers import study
from trainers.study_hashes import MANIFEST, read_hashes

SPEC = """
title = "tiny tamper study"
seeds = [0]
[train]
dataset = "digits"
model = "resnet8b"
model_kwargs = { width = 0.25 }
preset = "fast"
overrides = { epochs = 1, train_subset = 64 }
[[methods]]
name = "scratch"
[[methods]]
name = "kd-label"
distill = "label"
teacher = "scratch"
[diversity]
batch_size = 16
runs = 1
"""


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tamper")
    (tmp / "tiny.toml").write_text(SPEC)
    spec, text = load_spec(str(tmp / "tiny.toml"))
    out = tmp / "out"
    res = study.run_study(spec, out, device="cpu", spec_text=text)
    return tmp, out, res


def _copy(done, tmp_path):
    shutil.copytree(done[1], tmp_path / "out")
    return tmp_path / "out"


def _cells(res, out):
    return {c.method: out / c.path for c in res.cells}


def _tamper(path):
    """The same checkpoint (config, metadata, recorded accuracy) with one weight changed."""
    ck = load_checkpoint(path)
    with torch.no_grad():
        next(ck.model.parameters()).add_(1e-3)
    save_checkpoint(path, ck.model, ck.meta)


def _no_training(monkeypatch):
    monkeypatch.setattr(study, "train", lambda *a, **k: (_ for _ in ()).throw(AssertionError("trained")))


def test_every_cell_file_is_recorded_when_it_is_made(done):
    _, out, res = done
    hashes = read_hashes(out)
    assert set(hashes) == {c.path for c in res.cells}
    assert all(hashes[c.path] == sha256_file(out / c.path) for c in res.cells)


def test_a_tampered_leaf_cell_is_refused_and_no_report_is_written(done, tmp_path, monkeypatch):
    out = _copy(done, tmp_path)
    leaf = _cells(done[2], out)["kd-label"]  # no cell is made from it: no student vouches for it
    spec, _ = load_spec(str(done[0] / "tiny.toml"))
    reports = {p: p.read_bytes() for p in (out / "report.html", out / "summary.json", out / "report.md")}
    _tamper(leaf)
    _no_training(monkeypatch)
    with pytest.raises(KdprobeError) as e:
        study.run_study(spec, out, device="cpu")
    msg = str(e.value)
    assert msg.startswith(f"cell kd-label seed 0: {leaf} is not the file this study made") and "\n" not in msg
    assert "restore the original file, or delete it" in msg and "retrain" in msg
    assert {p: p.read_bytes() for p in reports} == reports  # nothing written from the mixed cells


def test_the_cli_says_it_in_one_line(done, tmp_path):
    out = _copy(done, tmp_path)
    _tamper(_cells(done[2], out)["kd-label"])
    r = CliRunner().invoke(app, ["study", str(done[0] / "tiny.toml"), "--out", str(out), "--device", "cpu", "--quiet"])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.exit_code == 1 and len(lines) == 1, r.output
    assert lines[0].startswith("error: cell kd-label seed 0: ") and "delete it" in lines[0]
    assert not list(out.rglob("*.lock"))


def test_restored_file_is_reused_and_a_deleted_one_retrained(done, tmp_path, monkeypatch):
    out = _copy(done, tmp_path)
    leaf = _cells(done[2], out)["kd-label"]
    spec, _ = load_spec(str(done[0] / "tiny.toml"))
    keep = leaf.read_bytes()
    _tamper(leaf)
    leaf.write_bytes(keep)  # restored
    with monkeypatch.context() as m:
        _no_training(m)
        assert all(c.action == "existing" for c in study.run_study(spec, out, device="cpu").cells)
    _tamper(leaf)
    leaf.unlink()  # deleted: retrained, and the new file recorded
    res = study.run_study(spec, out, device="cpu")
    assert {c.method: c.action for c in res.cells} == {"scratch": "existing", "kd-label": "trained"}
    assert read_hashes(out)[leaf.relative_to(out).as_posix()] == sha256_file(leaf)


def test_a_study_folder_without_records_is_recorded_on_first_use_then_checked(done, tmp_path, monkeypatch):
    out = _copy(done, tmp_path)
    (out / MANIFEST).unlink()  # a study folder made before cells were recorded
    spec, _ = load_spec(str(done[0] / "tiny.toml"))
    _no_training(monkeypatch)
    study.run_study(spec, out, device="cpu")
    assert read_hashes(out) == read_hashes(done[1])
    _tamper(_cells(done[2], out)["kd-label"])
    with pytest.raises(KdprobeError, match="is not the file this study made"):
        study.run_study(spec, out, device="cpu")


def test_a_damaged_record_is_one_line(done, tmp_path):
    out = _copy(done, tmp_path)
    (out / MANIFEST).write_text("not a sha256 line\n")
    spec, _ = load_spec(str(done[0] / "tiny.toml"))
    with pytest.raises(KdprobeError, match=r"cells.sha256:1: expected 'SHA256  PATH'") as e:
        study.run_study(spec, out, device="cpu")
    assert "\n" not in str(e.value)
