"""`kdprobe diversity` end to end on tiny digits checkpoints: the CSV holds the raw scores, recomputable directly."""
import csv
import json

import pytest
import torch

checkpoint = pytest.importorskip("kdprobe.checkpoints.format")
typer = pytest.importorskip("typer")
from typer.testing import CliRunner  # noqa: E402

from kdprobe.data.datasets import load_dataset, normalize  # noqa: E402
from kdprobe.models import create_model  # noqa: E402
from kdprobe.probes.diversity import jacobian_score, probe_indices  # noqa: E402


def _app():
    from cli.common import handle_errors
    from cli.diversity import diversity

    app = typer.Typer()
    app.callback()(lambda: None)  # keep "diversity" a subcommand, as in the real app
    app.command("diversity")(handle_errors(diversity))
    return app


def _save(tmp_path, method, seed, dataset="digits"):
    torch.manual_seed(seed)
    m = create_model("resnet8b", num_classes=10, in_channels=1, width=0.25)
    return checkpoint.save_checkpoint(tmp_path / f"{method}-{seed}.pt", m,
                                      {"method": method, "seed": seed, "dataset": dataset})


def test_diversity_csv_holds_raw_scores(tmp_path):
    p1, p2 = _save(tmp_path, "scratch", 0), _save(tmp_path, "kd", 1)
    out = tmp_path / "out"
    res = CliRunner().invoke(_app(), [
        "diversity", str(tmp_path / "*.pt"), "--runs", "2", "--batch-size", "12", "--seed", "3", "--device", "cpu",
        "--csv", str(out / "d.csv"), "--json", str(out / "d.json"), "--html", str(out / "d.html")])
    assert res.exit_code == 0, res.output
    assert "N=12" in res.output and "bn=eval" in res.output and "scratch" in res.output and "1*" in res.output
    rows = list(csv.DictReader(open(out / "d.csv")))
    assert len(rows) == 2 * 2
    data = load_dataset("digits")
    batches = [normalize(data.train_x[i], data.mean, data.std) for i in probe_indices(len(data.train_x), 2, 12, 3)]
    for p in (p1, p2):
        model = checkpoint.load_checkpoint(p).model
        got = [float(r["score"]) for r in rows if r["checkpoint"] == str(p)]
        assert got == pytest.approx([jacobian_score(model, b) for b in batches], rel=1e-12)
    doc = json.loads((out / "d.json").read_text())
    assert doc["settings"]["batch_size"] == 12 and len(doc["data"]["models"]) == 2 and doc["kind"] == "diversity"
    assert (out / "d.html").stat().st_size > 1_000_000


def test_diversity_user_errors(tmp_path):
    _save(tmp_path, "scratch", 0)
    app = _app()
    res = CliRunner().invoke(app, ["diversity", str(tmp_path / "nothing*.pt"), "--device", "cpu"])
    assert res.exit_code == 1 and "no file matches" in res.output
    res = CliRunner().invoke(app, ["diversity", str(tmp_path / "*.pt"), "--device", "cpu"])  # N=128 > 8x8-1
    assert res.exit_code == 1 and "--batch-size <= 63" in res.output
    _save(tmp_path, "kd", 1, dataset="cifar10")
    res = CliRunner().invoke(app, ["diversity", str(tmp_path / "*.pt"), "--batch-size", "8", "--device", "cpu"])
    assert res.exit_code == 1 and "one dataset" in res.output
