"""Experiment trackers (--log tensorboard|wandb|mlflow): every epoch and the config, read back with each tracker's
own reader (tests/tracker_readers.py), equal to the run's own log OUT.jsonl; resumed and retrained runs; studies."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cli.main import app
from kdprobe.errors import KdprobeError
from tracker_readers import mlflow_runs, tensorboard_scalars, tensorboard_text, wandb_offline_runs
from trainers.config import make_config
from trainers.loop import log_path, partial_path, train
from trainers.trackers import METRICS, TrackerSpec, metrics_of, parse_log

pytest.importorskip("tensorboard")
pytest.importorskip("wandb")
pytest.importorskip("mlflow")

TINY = ["--model", "resnet8b", "--width", "0.25", "--preset", "fast", "--train-subset", "128", "--quiet"]
CFG = dict(model="resnet8b", model_kwargs={"width": 0.25}, train_subset=128, epochs=3)
STEPS_PER_EPOCH = 2  # 128 images, batch 64


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    """The trackers' defaults, whatever this machine's environment says; W&B's own settings kept in tmp."""
    for var in ("WANDB_MODE", "MLFLOW_TRACKING_URI", "WANDB_DIR", "WANDB_PROJECT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))


def _cli(*args):
    r = CliRunner().invoke(app, [str(a) for a in args])
    return r.exit_code, r.output


def _epochs(out: Path) -> list[dict]:
    return [json.loads(line) for line in log_path(out).read_text().splitlines()]


def _expected(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """metric -> [(epoch, value)] from OUT.jsonl, through the documented name map (seconds are not in the jsonl)."""
    want: dict[str, list] = {}
    for r in records:
        for key, value in r.items():
            name = METRICS.get(key) or (f"loss/{key}" if key.startswith("train_") else None)
            if name is not None and key not in ("epoch", "test_images"):
                want.setdefault(name, []).append((r["epoch"], value))
    return want


def _f32(pairs):
    """TensorBoard stores scalars as float32: the exact float32 of each value."""
    return [(s, float(np.float32(v))) for s, v in pairs]


def test_train_log_tensorboard_every_epoch_readable_by_tensorboard(tmp_path):
    out = tmp_path / "runs" / "scratch.pt"
    code, text = _cli("train", "--out", out, *TINY, "--epochs", 3, "--log", "tensorboard")
    assert code == 0, text
    folder = tmp_path / "runs" / "logs" / "tensorboard" / "scratch"  # default: logs/ next to the checkpoint
    assert f"trackers: tensorboard --logdir {folder.parent}" in text  # where it went, and how to open it
    scalars = tensorboard_scalars(folder)
    records = _epochs(out)
    want = _expected(records)
    assert set(want) <= set(scalars) and "time/epoch_seconds" in scalars
    for name, pairs in want.items():
        assert scalars[name] == _f32(pairs), name  # every epoch, once, its value bit for bit (as float32)
    assert [s for s, _ in scalars["accuracy/test"]] == [1, 2, 3]
    assert all(0.0 <= v <= 1.0 for _, v in scalars["accuracy/test"])  # a fraction, as everywhere in kdprobe
    config = json.loads(tensorboard_text(folder).strip().removeprefix("```json").removesuffix("```"))
    from kdprobe.checkpoints.format import read_payload

    meta = read_payload(out)["meta"]
    assert config["config"] == meta["config"] and config["fingerprint"] == meta["fingerprint"]
    assert config["checkpoint"] == str(out.resolve())


def test_kd_run_logs_its_loss_terms_and_they_add_up(tmp_path):
    teacher = tmp_path / "t.pt"
    assert _cli("train", "--out", teacher, *TINY, "--epochs", 1)[0] == 0
    out = tmp_path / "kd.pt"
    code, text = _cli("train", "--out", out, *TINY, "--epochs", 2, "--distill", "label", "--teacher", teacher,
                      "--log", "tensorboard", "--log-dir", tmp_path / "tb")
    assert code == 0, text
    records = _epochs(out)
    for r in records:  # label KD minimizes (1 - a) CE + a KD; the epoch means are weighted alike (a = 0.9)
        assert r["train_loss"] == pytest.approx(0.1 * r["train_ce"] + 0.9 * r["train_kd"], rel=1e-6)
    scalars = tensorboard_scalars(tmp_path / "tb" / "tensorboard" / "kd")
    assert scalars["loss/train_kd"] == _f32([(r["epoch"], r["train_kd"]) for r in records])
    assert scalars["loss/train_ce"] == _f32([(r["epoch"], r["train_ce"]) for r in records])


def test_killed_and_resumed_run_continues_each_tracker_run_without_gaps_or_doubles(tmp_path):
    cfg = make_config("fast", **CFG)
    out = tmp_path / "run.pt"
    spec = TrackerSpec(("tensorboard", "wandb", "mlflow"), str(tmp_path / "logs"), "proj", "run")
    with pytest.raises(KeyboardInterrupt):
        train(cfg, out, trackers=spec, stop_after_steps=STEPS_PER_EPOCH + 1)  # killed in epoch 2
    assert partial_path(out).exists()
    res = train(cfg, out, trackers=spec)
    assert res.resumed_from_epoch == pytest.approx(1.5)
    records = _epochs(out)
    want = _expected(records)
    scalars = tensorboard_scalars(tmp_path / "logs" / "tensorboard" / "run")
    for name, pairs in want.items():
        assert scalars[name] == _f32(pairs), name
    wb = wandb_offline_runs(tmp_path / "logs")
    assert len(wb) == 2 and len({r["id"] for r in wb}) == 1  # the resumed process reopened the same W&B run
    steps = [h["step"] for r in wb for h in r["history"]]
    assert steps == [1, 2, 3]
    got = {h["step"]: h["metrics"] for r in wb for h in r["history"]}
    for name, pairs in want.items():
        assert [(s, got[s][name]) for s, _ in pairs] == pairs, name  # W&B keeps float64: exact
    assert wb[0]["project"] == "proj" and wb[0]["name"] == "run"
    assert wb[0]["config"]["config"]["epochs"] == 3
    (ml,) = mlflow_runs(tmp_path / "logs", "proj")  # one MLflow run, continued
    assert ml["status"] == "FINISHED" and ml["name"] == "run"
    for name, pairs in want.items():
        assert ml["metrics"][name] == pairs, name
    assert ml["params"]["config.epochs"] == "3" and ml["params"]["method"] == "scratch"
    assert "config.json" in ml["artifacts"]
    assert ml["artifact_uri"].startswith((tmp_path / "logs" / "mlartifacts").resolve().as_uri())


def test_an_epoch_logged_but_not_saved_before_the_kill_is_not_doubled(tmp_path):
    """The kill between an epoch's tracker log and its resume state: the killed process logged epoch 2, the
    partial says 1. Simulated by logging epoch 2 (a stand-in value) into the continued tracker runs by hand."""
    from trainers.loop import partial_path as ppath
    from kdprobe.checkpoints.format import read_payload
    from trainers.trackers import RunLog

    cfg = make_config("fast", **CFG)
    out = tmp_path / "run.pt"
    spec = TrackerSpec(("tensorboard", "mlflow"), str(tmp_path / "logs"), "proj", "run")
    with pytest.raises(KeyboardInterrupt):
        train(cfg, out, trackers=spec, stop_after_steps=STEPS_PER_EPOCH + 1)
    saved = read_payload(ppath(out))
    assert {k: v["logged"] for k, v in saved["trackers"].items()} == {"tensorboard": 1, "mlflow": 1}
    late = RunLog(spec)
    late.start({"checkpoint": str(out.resolve())}, saved["history"], saved["trackers"])
    late.epoch(dict(saved["history"][0], epoch=2, train_loss=123.0))  # what the killed process got out
    late.close(ok=False)
    train(cfg, out, trackers=spec)
    records = _epochs(out)
    scalars = tensorboard_scalars(tmp_path / "logs" / "tensorboard" / "run")
    assert scalars["loss/train"] == _f32([(r["epoch"], r["train_loss"]) for r in records])  # the stand-in hidden
    (ml,) = mlflow_runs(tmp_path / "logs", "proj")
    # step 2 once: the value the killed process logged (a resumed run recomputes the same numbers on the same
    # machine type; here the stand-in shows which one was kept), epochs 1 and 3 as the run's log
    assert ml["metrics"]["loss/train"] == [(1, records[0]["train_loss"]), (2, 123.0), (3, records[2]["train_loss"])]


def test_tracker_added_on_resume_gets_the_epochs_before_it(tmp_path):
    cfg = make_config("fast", **CFG)
    out = tmp_path / "run.pt"
    with pytest.raises(KeyboardInterrupt):
        train(cfg, out, stop_after_steps=2 * STEPS_PER_EPOCH + 1)  # two epochs done without a tracker
    spec = TrackerSpec(("tensorboard", "mlflow"), str(tmp_path / "logs"), "proj", "run")
    train(cfg, out, trackers=spec)
    want = _expected(_epochs(out))
    scalars = tensorboard_scalars(tmp_path / "logs" / "tensorboard" / "run")
    (ml,) = mlflow_runs(tmp_path / "logs", "proj")
    for name, pairs in want.items():
        assert scalars[name] == _f32(pairs) and ml["metrics"][name] == pairs, name


def test_retrained_checkpoint_replaces_its_tensorboard_run_and_makes_a_new_one_elsewhere(tmp_path):
    out = tmp_path / "a.pt"
    logs = ["--log", "tensorboard,mlflow", "--log-dir", tmp_path / "logs"]
    assert _cli("train", "--out", out, *TINY, "--epochs", 2, *logs)[0] == 0
    first = _epochs(out)
    code, text = _cli("train", "--out", out, *TINY, "--epochs", 2, "--lr", 0.01, "--overwrite", *logs)
    assert code == 0, text
    second = _epochs(out)
    assert first[0]["train_loss"] != second[0]["train_loss"]
    scalars = tensorboard_scalars(tmp_path / "logs" / "tensorboard" / "a")
    assert scalars["loss/train"] == _f32([(r["epoch"], r["train_loss"]) for r in second])  # the old run hidden
    runs = mlflow_runs(tmp_path / "logs", "kdprobe")
    assert [r["metrics"]["loss/train"] for r in runs] == [[(r["epoch"], r["train_loss"]) for r in x]
                                                          for x in (first, second)]


def test_a_tracker_failing_mid_run_is_said_and_dropped_not_fatal(tmp_path, monkeypatch, capsys):
    from trainers import trackers

    real = trackers._TensorBoard.epoch

    def flaky(self, record):
        if record["epoch"] == 2:
            raise OSError("No space left on device")
        real(self, record)

    monkeypatch.setattr(trackers._TensorBoard, "epoch", flaky)
    spec = TrackerSpec(("tensorboard", "mlflow"), str(tmp_path / "logs"), "proj", "run")
    res = train(make_config("fast", **CFG), tmp_path / "run.pt", trackers=spec)
    assert res.path.exists()  # the training finished
    err = capsys.readouterr().err
    assert "--log tensorboard: logging epoch 2 failed (OSError: No space left on device)" in err
    assert [s for s, _ in tensorboard_scalars(tmp_path / "logs" / "tensorboard" / "run")["loss/train"]] == [1]
    (ml,) = mlflow_runs(tmp_path / "logs", "proj")  # the other tracker logged on
    assert [s for s, _ in ml["metrics"]["loss/train"]] == [1, 2, 3] and ml["status"] == "FINISHED"


def test_two_checkpoints_of_one_name_never_share_a_tensorboard_run(tmp_path):
    logs = ["--log", "tensorboard", "--log-dir", tmp_path / "shared"]
    assert _cli("train", "--out", tmp_path / "a" / "run.pt", *TINY, "--epochs", 1, *logs)[0] == 0
    code, text = _cli("train", "--out", tmp_path / "b" / "run.pt", *TINY, "--epochs", 1, *logs)
    assert code != 0 and "holds the run of" in text and "pass another --log-dir" in text and "Traceback" not in text
    assert not (tmp_path / "b" / "run.pt").exists()
    scalars = tensorboard_scalars(tmp_path / "shared" / "tensorboard" / "run")  # the first run, untouched
    assert scalars["loss/train"] == _f32([(1, _epochs(tmp_path / "a" / "run.pt")[0]["train_loss"])])


def test_pipeline_takes_the_log_options(tmp_path):
    code, text = _cli("pipeline", "pruning", "--out", tmp_path / "p", "--log-dir", tmp_path / "x")
    assert code != 0 and "no --log names one" in text


def test_api_train_logs_like_the_cli(tmp_path):
    import kdprobe

    r = kdprobe.train(out=tmp_path / "api.pt", model="resnet8b", width=0.25, preset="fast", epochs=2,
                      train_subset=128, quiet=True, log=["mlflow"], log_project="exp")
    (ml,) = mlflow_runs(tmp_path / "logs", "exp")
    assert ml["metrics"]["accuracy/test"] == [(h["epoch"], h["test_acc"]) for h in r.history]


def test_study_logs_one_run_per_trained_cell(tmp_path):
    out = tmp_path / "study"
    code, text = _cli("study", "demo", "--out", out, "--set", "seeds=[0]", "--set", "train.overrides.epochs=2",
                      "--set", "landscape.x=-1:1:3", "--set", "landscape.y=-1:1:3", "--set", "landscape.samples=64",
                      "--figures", "none", "--quiet", "--log", "tensorboard", "--log", "mlflow")
    assert code == 0, text
    cells = json.loads((out / "summary.json").read_text())["data"]["cells"]
    runs = {r["name"]: r for r in mlflow_runs(out / "logs", "demo")}  # default project: the study's name
    assert sorted(runs) == sorted(f"study/{c['method']}/seed{c['seed']}" for c in cells)  # the folder's name first
    for c in cells:
        records = _epochs(out / c["path"])
        name = f"study/{c['method']}/seed{c['seed']}"
        assert runs[name]["tags"]["kdprobe.method"] == c["method"] and runs[name]["tags"]["kdprobe.group"] == "demo"
        assert runs[name]["metrics"]["accuracy/test"] == [(r["epoch"], r["test_acc"]) for r in records]
        scalars = tensorboard_scalars(out / "logs" / "tensorboard" / "study" / c["method"] / f"seed{c['seed']}")
        assert scalars["accuracy/test"] == _f32([(r["epoch"], r["test_acc"]) for r in records])


def test_slurm_cell_job_logs_its_run(tmp_path):
    """What a study's Slurm job runs (trainers.study_slurm.CellJob), called here: the tracker spec travels with it."""
    from trainers.study_slurm import CellJob

    spec = TrackerSpec(("mlflow",), str(tmp_path / "logs"), "s", "scratch/seed0", "s", (("method", "scratch"),))
    job = CellJob(make_config("fast", **dict(CFG, epochs=2)).to_dict(), str(tmp_path / "c.pt"), "cpu",
                  trackers=spec.to_dict())
    assert job()["action"] == "trained"
    (ml,) = mlflow_runs(tmp_path / "logs", "s")
    assert ml["name"] == "scratch/seed0" and ml["tags"]["kdprobe.method"] == "scratch"
    assert [s for s, _ in ml["metrics"]["loss/train"]] == [1, 2]


@pytest.mark.parametrize("args, message", [
    (["--log", "tensorbored"], "--log tensorbored: expected one of tensorboard, wandb, mlflow"),
    (["--log-dir", "x"], "--log-dir says where trackers write, but no --log names one"),
    (["--log", "mlflow", "--log-project", " "], "--log-project is empty"),
])
def test_bad_log_options_fail_in_one_line_before_training(tmp_path, args, message):
    code, text = _cli("train", "--out", tmp_path / "a.pt", *TINY, "--epochs", 1, *args)
    assert code != 0 and message in text and "Traceback" not in text
    assert not (tmp_path / "a.pt").exists() and not partial_path(tmp_path / "a.pt").exists()


def test_log_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("")
    code, text = _cli("train", "--out", tmp_path / "a.pt", *TINY, "--log", "tensorboard", "--log-dir", tmp_path / "f")
    assert code != 0 and "is a file; pass a folder" in text


def test_missing_tracker_package_says_how_to_install_it(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(KdprobeError, match=r"pip install 'kdprobe\[wandb\]'"):
        parse_log("wandb")


def test_parse_log_and_metric_names():
    assert parse_log(["tensorboard,mlflow", "tensorboard", " WandB "]) == ("tensorboard", "mlflow", "wandb")
    assert parse_log(None) == ()
    rec = {"epoch": 2, "lr": 0.1, "train_loss": 1.0, "train_acc": 0.5, "test_loss": 2.0, "test_acc": 0.25,
           "test_images": 10, "train_kd": 0.3, "seconds": 1.5}
    assert metrics_of(rec) == {"lr": 0.1, "loss/train": 1.0, "accuracy/train": 0.5, "loss/test": 2.0,
                               "accuracy/test": 0.25, "loss/train_kd": 0.3, "time/epoch_seconds": 1.5}
    with pytest.raises(KdprobeError, match="unknown trackers"):
        TrackerSpec.from_dict({"kinds": ["os.system"], "dir": "/tmp", "project": "p", "run": "r"})
