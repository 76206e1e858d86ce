"""Foreign RepDistiller checkpoints on real CIFAR-10 (the shared JPEG archive), with no --arch: info names the
detected architecture, landscape and diversity run on it, and the standard KD pairs train (label and feature
KD, a few steps on CPU). Skipped where the archive is absent."""
from __future__ import annotations

import json

import h5py
import pytest
import torch
from typer.testing import CliRunner

from conftest import SHARED_CIFAR, StepLog, shared_cifar_available

pytestmark = pytest.mark.skipif(not shared_cifar_available(), reason="needs ../shared/data/cifar10-jpeg.tar.gz")
DATASET = f"imagefolder:{SHARED_CIFAR}"


def _invoke(*args):
    from cli.main import app

    return CliRunner().invoke(app, [str(a) for a in args])


def _repdistiller_file(path, name, seed=0):
    """A checkpoint as RepDistiller's train_teacher.py saves it; random weights, BN statistics settled."""
    from conftest import settle_bn
    from kdprobe.models import create_model

    torch.manual_seed(seed)
    model = settle_bn(create_model(f"repdistiller:{name}", num_classes=10))
    torch.save({"epoch": 240, "model": model.state_dict(), "best_acc": 75.0, "optimizer": {}}, path)
    return model


@pytest.fixture(scope="module")
def cifar():
    from kdprobe.data.datasets import load_dataset

    return load_dataset(DATASET)


def test_info_landscape_and_diversity_on_a_foreign_wrn_16_2(tmp_path, cifar):
    from kdprobe.probes.evaluate import evaluate
    from kdprobe.probes.diversity import jacobian_score, probe_batches

    model = _repdistiller_file(tmp_path / "wrn_16_2_best.pth", "wrn_16_2").eval()
    r = _invoke("info", tmp_path / "wrn_16_2_best.pth")
    assert r.exit_code == 0, r.output
    assert "repdistiller:wrn_16_2" in r.output and "detected from the tensor names and shapes" in r.output
    r = _invoke("landscape", tmp_path / "wrn_16_2_best.pth", "--dataset", DATASET, "--x", "-0.5:0.5:3", "--y",
                "-0.5:0.5:3", "--samples", 64, "--device", "cpu", "--out", tmp_path / "s.h5")
    assert r.exit_code == 0, r.output
    with h5py.File(tmp_path / "s.h5") as f:
        centre = float(f["train_loss"][1, 1])
    want = evaluate(model, cifar.train_x[:64], cifar.train_y[:64], cifar.mean, cifar.std)
    assert centre == pytest.approx(want.loss, rel=1e-4)
    r = _invoke("diversity", tmp_path / "wrn_16_2_best.pth", "--dataset", DATASET, "--batch-size", 16, "--runs", 2,
                "--device", "cpu", "--json", tmp_path / "d.json")
    assert r.exit_code == 0, r.output
    doc = json.loads((tmp_path / "d.json").read_text())
    assert doc["data"]["models"][0]["group"] == "foreign"
    want = [jacobian_score(model, b) for b in probe_batches(cifar, "train", 2, 16, 0)]  # the library, by hand
    assert doc["data"]["models"][0]["values"] == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("teacher, student", [("wrn_40_2", "wrn_16_2"), ("resnet32x4", "ShuffleV1")])
@pytest.mark.parametrize("distill", ["label", "feature"])
def test_standard_kd_pairs_train_a_few_steps(tmp_path, cifar, teacher, student, distill):
    from kdprobe.checkpoints.format import read_payload
    from trainers.config import TrainConfig
    from trainers.loop import partial_path, train

    _repdistiller_file(tmp_path / "t.pth", teacher)
    cfg = TrainConfig(model=f"repdistiller:{student}", dataset=DATASET, train_subset=64, batch_size=16, epochs=1,
                      distill=distill, teacher=str(tmp_path / "t.pth"), lr=0.05)
    steps = StepLog()
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "s.pt", progress=steps, stop_after_steps=2)
    assert len(steps.terms) == 2 and all(torch.isfinite(torch.tensor(t["loss"])) for t in steps.terms)
    assert set(steps.terms[0]) >= ({"ce", "kd"} if distill == "label" else {"ce", "feat", "feat_raw"})
    saved = read_payload(partial_path(tmp_path / "s.pt"))  # the state a rerun would continue from
    assert saved["step"] == 2 and ("regressor" in " ".join(saved["student"]) if distill == "feature" else True)
