"""The real `kdprobe` command, end to end on tiny runs; user errors are one line, exit 1."""
import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from cli.main import app
from kdprobe.checkpoints.format import load_checkpoint
from kdprobe.probes.evaluate import evaluate
from kdprobe.data.datasets import load_dataset

runner = CliRunner()
TINY = ["--model", "resnet8b", "--width", "0.25", "--train-subset", "128", "--epochs", "1", "--quiet"]


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("t") / "teacher.pt"
    r = run("train", *TINY, "--out", out)
    assert r.exit_code == 0, r.output
    return out


def test_train_eval_info_end_to_end(teacher, tmp_path):
    ck = load_checkpoint(teacher)
    d = load_dataset("digits")
    expect = evaluate(ck.model, d.test_x, d.test_y, d.mean, d.std)
    r = run("eval", teacher, "--csv", tmp_path / "e.csv", "--json", tmp_path / "e.json")
    assert r.exit_code == 0, r.output
    rows = json.loads((tmp_path / "e.json").read_text())["data"]
    assert rows[0]["test_acc"] == pytest.approx(expect.acc) and rows[0]["test_acc"] == pytest.approx(ck.meta["test_acc"])
    assert "test_acc" in (tmp_path / "e.csv").read_text().splitlines()[0]
    r = run("info", teacher)
    assert r.exit_code == 0 and "resnet8b" in r.output and "params" in r.output and "scratch" in r.output


def test_train_existing_output_is_not_retrained(teacher):
    r = run("train", *TINY, "--out", teacher)
    assert r.exit_code == 0 and "exists" in r.output


def test_kd_student_trains_from_teacher_and_reloads_as_plain_model(teacher, tmp_path):
    out = tmp_path / "student.pt"
    r = run("train", *TINY, "--distill", "feature", "--teacher", teacher, "--augment", "cutmix", "--out", out)
    assert r.exit_code == 0, r.output
    ck = load_checkpoint(out)
    assert ck.meta["method"] == "kd-feature+cutmix"
    assert ck.meta["teacher"]["sha256"] == load_checkpoint(teacher).sha256
    assert "regressor" in ck.extra  # saved for resume, but the model itself is plain
    assert set(ck.model.state_dict()) == set(load_checkpoint(teacher).model.state_dict())


@pytest.mark.parametrize("args, message", [
    (["eval", "nope/*.pt"], "no file matches"),
    (["eval", "missing.pt"], "does not exist"),
    (["train", "--model", "resnet7", "--out", "x.pt"], "unknown model"),
    (["train", "--augment", "mixup", "--out", "x.pt"], "--augment"),
    (["train", "--distill", "label", "--out", "x.pt"], "--teacher"),
    (["train", "--dataset", "imagefolder:/nonexistent", "--out", "x.pt"], "does not exist"),
    (["info", "missing.pt"], "does not exist"),
])
def test_user_errors_are_one_line(args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = run(*args)
    assert r.exit_code == 1
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.output
    assert "Traceback" not in r.output


def test_teacher_with_other_classes_is_refused_before_training(tmp_path, tiny_imagefolder):
    t = tmp_path / "t3.pt"
    assert run("train", "--model", "resnet8b", "--width", "0.25", "--dataset", f"imagefolder:{tiny_imagefolder}",
               "--epochs", "1", "--quiet", "--out", t).exit_code == 0
    r = run("train", *TINY, "--distill", "label", "--teacher", t, "--out", tmp_path / "s.pt")
    assert r.exit_code == 1 and "teacher" in r.output and ("classes" in r.output or "inputs" in r.output)


def test_console_script_help_works():
    r = subprocess.run([sys.executable, "-m", "cli.main", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "train" in r.stdout and "eval" in r.stdout
    for cmd in ("train", "eval", "info", "prune", "surplus"):
        r = runner.invoke(app, [cmd, "--help"])
        assert r.exit_code == 0 and "Usage" in r.output


def test_info_reports_sizes_before_and_after_pruning(teacher, tmp_path):
    from kdprobe.pruning import count_params
    out = tmp_path / "p.pt"
    r = run("prune", teacher, "--method", "l1", "--remaining", "0.5", "--out", out)
    assert r.exit_code == 0, r.output
    before, after = count_params(load_checkpoint(teacher).model), count_params(load_checkpoint(out).model)
    r = run("info", out)
    assert r.exit_code == 0, r.output
    line = next(ln for ln in r.output.splitlines() if ln.strip().startswith("params") and "->" in ln)
    assert [int(v.replace(",", "")) for v in line.split()[1:4:2]] == [before, after]
