"""`kdprobe agreement|calibration|cka|sharpness` end to end on tiny digits checkpoints trained here:
the JSON schema and the CSV hold the library's values, recomputed independently from the checkpoints."""
import csv
import json
import math

import pytest
import torch

typer = pytest.importorskip("typer")
from typer.testing import CliRunner  # noqa: E402

from kdprobe.checkpoints.format import load_checkpoint, save_checkpoint  # noqa: E402
from kdprobe.data.datasets import load_dataset, normalize  # noqa: E402
from kdprobe.models import create_model  # noqa: E402
from kdprobe.probes.agreement import agreement as pair_agreement  # noqa: E402
from kdprobe.probes.calibration import calibration, metrics  # noqa: E402
from kdprobe.probes.cka import cka_matrix  # noqa: E402
from kdprobe.probes.ensemble import ensemble_log_probs  # noqa: E402
from kdprobe.probes.sharpness import sharpness  # noqa: E402

SAMPLES = 200


def _probe_doc(path):
    """A probe's --json document (the envelope of docs/units.md) as {command, settings, <table>: records}."""
    doc = json.loads(path.read_text())
    assert {"kind", "kdprobe_version", "units", "settings", "data"} <= set(doc), sorted(doc)
    return {"command": doc["kind"], "settings": doc["settings"], **doc["data"]}


def _app():
    from cli.main import app

    return app


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """3 scratch seeds and 3 label-KD students, student s taught by scratch seed s (2 epochs on digits)."""
    from trainers.config import TrainConfig
    from trainers.loop import train

    d = tmp_path_factory.mktemp("zoo")
    tiny = dict(model="resnet8b", model_kwargs={"width": 0.25}, dataset="digits", epochs=2, batch_size=64)
    for s in range(3):
        train(TrainConfig(**tiny, seed=s), d / f"scratch-{s}.pt")
        train(TrainConfig(**tiny, seed=10 + s, distill="label", teacher=str(d / f"scratch-{s}.pt")), d / f"kd-{s}.pt")
    return d


def _run(*args):
    res = CliRunner().invoke(_app(), [str(a) for a in args])
    return res


def _log_probs(path, split="test", n=SAMPLES):
    data = load_dataset("digits")
    x, y = data.split(split)
    with torch.no_grad():
        z = load_checkpoint(path).model(normalize(x[:n], data.mean, data.std))
    return torch.log_softmax(z.double(), 1), y[:n], z


def _flat_records(doc, name):
    rows = doc[name]
    assert rows and all(isinstance(v, (str, int, float, bool, type(None))) for r in rows for v in r.values())
    return rows


def test_agreement_json_csv_html_hold_the_library_values(zoo, tmp_path):
    out = tmp_path / "o"
    res = _run("agreement", zoo / "*.pt", "--samples", SAMPLES, "--device", "cpu", "--max-subsets", 4,
               "--json", out / "a.json", "--csv", out / "a.csv", "--html", out / "a.html")
    assert res.exit_code == 0, res.output
    assert "student-teacher kd-label->scratch" in res.output and "6 forward passes" in res.output
    doc = _probe_doc(out / "a.json")
    assert doc["command"] == "agreement" and doc["settings"]["forward_passes"] == 6
    pairs = _flat_records(doc, "pairs")
    assert len(pairs) == 15
    assert {p["pair_type"] for p in pairs} == {"within", "between", "student-teacher"}
    st = [p for p in pairs if p["pair_type"] == "student-teacher"]
    assert len(st) == 3 and all(p["a"].endswith(f"kd-{p['b'][-4]}.pt") for p in st)  # each student with its teacher
    p = pairs[0]
    la, y, _ = _log_probs(p["a"])
    lb, _, _ = _log_probs(p["b"])
    ref = pair_agreement(la, lb, y)
    for k in ("disagreement", "normalized_disagreement", "sym_kl", "js"):
        assert p[k] == pytest.approx(getattr(ref, k), rel=1e-9, abs=1e-12)
    assert 0.0 <= p["disagreement"] <= 1.0 and 0.0 <= p["js"] <= math.log(2)
    ck = {r["checkpoint"]: r for r in _flat_records(doc, "checkpoints")}
    m = metrics(la, y)
    assert ck[p["a"]]["acc"] == pytest.approx(m.acc) and ck[p["a"]]["nll"] == pytest.approx(m.nll, rel=1e-9)
    assert 0.0 <= ck[p["a"]]["acc"] <= 1.0 and {"ece", "brier", "group", "seed", "sha256"} <= set(ck[p["a"]])
    scratch = sorted(str(x) for x in zoo.glob("scratch-*.pt"))
    full = metrics(ensemble_log_probs([_log_probs(s)[0] for s in scratch]), y)
    curve = [r for r in doc["ensembles"] if r["group"] == "scratch"]
    assert [r["k"] for r in curve] == [1, 2, 3] and curve[-1]["acc"] == pytest.approx(full.acc)
    assert curve[-1]["nll"] == pytest.approx(full.nll, rel=1e-9)
    gain = next(r for r in doc["ensemble_gains"] if r["group"] == "scratch" and r["metric"] == "nll")
    assert gain["gain"] == pytest.approx(full.nll - sum(ck[s]["nll"] for s in scratch) / 3, rel=1e-9)
    assert {r["group"] for r in doc["gain_tests"]} == {"kd-label"}
    types = {(r["key"], r["metric"]) for r in doc["pair_types"]}
    assert ("within scratch", "disagreement") in types and ("student-teacher kd-label->scratch", "js") in types
    rows = list(csv.DictReader(open(out / "a.csv")))
    assert len(rows) == 15 and float(rows[0]["js"]) == pytest.approx(pairs[0]["js"], rel=1e-12)
    html = (out / "a.html").read_text()
    assert len(html) > 1_000_000 and "Plotly.newPlot" in html and '"type":"scattergl"' not in html
    _assert_svg_only(doc)


def _assert_svg_only(doc):
    """The figure built from the JSON's tables has only SVG trace types (no WebGL anywhere)."""
    from kdprobe.probes.tables import ProbeTables
    from kdprobe.writers.probe_plots import probe_figure

    tables = ProbeTables(doc["command"], doc["settings"],
                         {k: v for k, v in doc.items() if k not in ("command", "settings", "kdprobe_version", "machine")})
    fig = probe_figure(tables)
    assert fig.data and {t.type for t in fig.data} <= {"scatter", "heatmap"}
    assert set(fig.layout.template.data.to_plotly_json()) <= {"scatter", "heatmap"}


def test_calibration_cli_with_temperature(zoo, tmp_path):
    res = _run("calibration", zoo / "*.pt", "--samples", SAMPLES, "--device", "cpu", "--temperature", "--adaptive",
               "--classwise", "--json", tmp_path / "c.json", "--csv", tmp_path / "c.csv", "--html", tmp_path / "c.html")
    assert res.exit_code == 0, res.output
    doc = _probe_doc(tmp_path / "c.json")
    rows = _flat_records(doc, "checkpoints")
    r = rows[0]
    _, y, z = _log_probs(r["checkpoint"])
    ref = calibration(z, y, adaptive=True, classwise=True, temperature=True, seed=0)
    assert r["ece"] == pytest.approx(ref.metrics.ece, rel=1e-9) and r["brier"] == pytest.approx(ref.metrics.brier)
    assert r["adaptive_ece"] == pytest.approx(ref.adaptive_ece) and r["classwise_ece"] == pytest.approx(ref.classwise_ece)
    assert r["temperature"] == pytest.approx(ref.temperature.temperature, rel=1e-9)
    assert r["nll_after"] == pytest.approx(ref.temperature.after.nll, rel=1e-9)
    assert len([b for b in doc["reliability"] if b["checkpoint"] == r["checkpoint"]]) == 15
    groups = {(g["group"], g["metric"]): g for g in doc["groups"]}
    assert groups[("scratch", "ece")]["n"] == 3 and groups[("kd-label", "ece")]["p_holm"] is not None
    assert groups[("scratch", "ece")]["mean"] == pytest.approx(
        sum(x["ece"] for x in rows if x["group"] == "scratch") / 3)
    assert len(list(csv.DictReader(open(tmp_path / "c.csv")))) == 6
    _assert_svg_only(doc)
    assert "ece" in res.output and "p(Holm)" in res.output


def test_cka_matrix_and_group(zoo, tmp_path):
    a, b = zoo / "scratch-0.pt", zoo / "kd-0.pt"
    res = _run("cka", a, b, "--samples", SAMPLES, "--device", "cpu", "--json", tmp_path / "m.json",
               "--csv", tmp_path / "m.csv", "--html", tmp_path / "m.html")
    assert res.exit_code == 0, res.output
    doc = _probe_doc(tmp_path / "m.json")
    data = load_dataset("digits")
    x = normalize(data.test_x[:SAMPLES], data.mean, data.std)
    ref = cka_matrix(load_checkpoint(a).model, load_checkpoint(b).model, x)
    layers = _flat_records(doc, "layers")
    assert len(layers) == len(ref.layers_a) * len(ref.layers_b)
    cell = next(r for r in layers if r["layer_a"] == "fc:in" and r["layer_b"] == "fc:in")
    assert cell["cka"] == pytest.approx(ref.values[ref.layers_a.index("fc:in")][ref.layers_b.index("fc:in")], rel=1e-9)
    (pair,) = doc["pairs"]
    assert pair["pair_type"] == "student-teacher" and pair["cka"] == pytest.approx(cell["cka"])
    assert pair["a"] == str(b)  # the student first
    grp = _run("cka", zoo / "*.pt", "--samples", SAMPLES, "--device", "cpu", "--json", tmp_path / "g.json")
    assert grp.exit_code == 0, grp.output
    g = _probe_doc(tmp_path / "g.json")
    assert len(g["pairs"]) == 15 and g["settings"]["estimator"] == "exact" and g["settings"]["forward_passes"] == 6
    same = next(p for p in g["pairs"] if {p["a"], p["b"]} == {str(a), str(b)})
    assert same["cka"] == pytest.approx(cell["cka"], rel=1e-9)
    assert any(t["key"] == "within scratch" and t["metric"] == "cka" for t in g["pair_types"])
    _assert_svg_only(doc)
    _assert_svg_only(g)


def test_sharpness_cli_matches_the_library(zoo, tmp_path):
    paths = [zoo / "scratch-0.pt", zoo / "kd-0.pt"]
    res = _run("sharpness", *paths, "--samples", 64, "--batch-size", 32, "--iterations", 4, "--tol", 0,
               "--trace-samples", 6, "--vectors-per-pass", 4, "--reference", "none", "--device", "cpu", "--seed", 2,
               "--density", "--lanczos-steps", 5, "--json", tmp_path / "s.json", "--csv", tmp_path / "s.csv",
               "--html", tmp_path / "s.html")
    assert res.exit_code == 0, res.output
    doc = _probe_doc(tmp_path / "s.json")
    rows = {r["checkpoint"]: r for r in _flat_records(doc, "checkpoints")}
    data = load_dataset("digits")
    x, y = normalize(data.train_x[:64], data.mean, data.std), data.train_y[:64]
    ref = sharpness(load_checkpoint(paths[1]).model, x, y, iterations=4, tol=0, trace_samples=6, batch_size=32,
                    vectors_per_pass=4, seed=2)
    r = rows[str(paths[1])]
    assert r["top_eigenvalue"] == pytest.approx(ref.top_eigenvalue, rel=1e-6)
    assert r["trace"] == pytest.approx(ref.trace, rel=1e-6) and r["trace_se"] == pytest.approx(ref.trace_se, rel=1e-6)
    assert r["top_iterations"] == 4 and len([t for t in doc["trace_samples"] if t["checkpoint"] == str(paths[1])]) == 6
    assert doc["density_curve"] and doc["settings"]["bn"] == "eval"
    assert len(list(csv.DictReader(open(tmp_path / "s.csv")))) == 2
    _assert_svg_only(doc)


def test_probe_commands_fail_with_one_line(zoo, tmp_path):
    res = _run("agreement", zoo / "scratch-0.pt", "--device", "cpu")
    assert res.exit_code == 1 and "at least 2 checkpoints" in res.output
    res = _run("calibration", zoo / "*.pt", "--reference", "cutmix", "--device", "cpu")
    assert res.exit_code == 1 and "reference group 'cutmix'" in res.output
    res = _run("sharpness", zoo / "kd-0.pt", "--bn", "batch", "--device", "cpu")
    assert res.exit_code == 1 and "expected --bn one of eval, train" in res.output
    res = _run("cka", tmp_path / "none*.pt")
    assert res.exit_code == 1 and "no file matches" in res.output
    torch.manual_seed(0)
    other = save_checkpoint(tmp_path / "c10.pt", create_model("resnet8b", num_classes=10, in_channels=1, width=0.25),
                            {"method": "scratch", "dataset": "cifar10"})
    res = _run("agreement", zoo / "kd-0.pt", other, "--device", "cpu")
    assert res.exit_code == 1 and "one dataset" in res.output
    for r in (res,):
        assert "Traceback" not in r.output
