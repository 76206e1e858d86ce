"""kdprobe.agreement|ensembles|cka|calibration|sharpness against the CLI: the same inputs give the same
tables bit for bit; Checkpoint objects and plain modules give the numbers paths give; a ProbeResult's
frame, files and figure. Tiny digits checkpoints (untrained, 3 scratch + 3 KD students) keep it fast."""
import json
import math

import numpy as np
import pytest
import torch

typer = pytest.importorskip("typer")
pd = pytest.importorskip("pandas")
from typer.testing import CliRunner  # noqa: E402

import kdprobe  # noqa: E402
from kdprobe.checkpoints.format import load_checkpoint, save_checkpoint  # noqa: E402
from kdprobe.data.datasets import load_dataset, normalize  # noqa: E402
from kdprobe.models import create_model  # noqa: E402

SAMPLES = 60
QUIET = dict(note=lambda text: None)


def _app():
    from cli.main import app

    return app


def _model(seed):
    torch.manual_seed(seed)
    m = create_model("resnet8b", num_classes=10, in_channels=1, width=0.25)
    g = torch.Generator().manual_seed(100 + seed)
    for bn in (b for b in m.modules() if isinstance(b, torch.nn.BatchNorm2d)):  # BN away from identity
        bn.running_mean.normal_(0.0, 0.1, generator=g)
        bn.running_var.uniform_(0.5, 1.5, generator=g)
    return m.eval()


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """scratch-{0,1,2} and kd-{0,1,2}, student s recording scratch s as its teacher (untrained weights)."""
    d = tmp_path_factory.mktemp("apizoo")
    for s in range(3):
        teacher = save_checkpoint(d / f"scratch-{s}.pt", _model(s), {"method": "scratch", "dataset": "digits",
                                                                     "seed": s})
        save_checkpoint(d / f"kd-{s}.pt", _model(10 + s),
                        {"method": "kd-label", "dataset": "digits", "seed": 10 + s,
                         "teacher": {"sha256": load_checkpoint(teacher).sha256}})
    return d


def _cli(*args):
    res = CliRunner().invoke(_app(), [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return res


def _flat(doc):
    """A probe document's envelope (kind, kdprobe_version, machine, units, settings, data: the tables) as
    {command, settings, <table>: records}, less machine and version."""
    assert set(doc) == {"kind", "kdprobe_version", "machine", "units", "settings", "data"}
    return {"command": doc["kind"], "settings": doc["settings"], **doc["data"]}


def _doc(path):
    return _flat(json.loads(path.read_text()))


def _api_doc(result):
    """The result's to_dict() as its JSON file holds it (tuples as lists), less machine and version."""
    d = result.to_dict()
    assert result.main in d["data"]
    return json.loads(json.dumps(_flat(d), allow_nan=False))


def _metric_columns(rows, columns):
    return [[r[c] for c in columns] for r in rows]


def test_agreement_and_ensembles_equal_the_cli(zoo, tmp_path):
    res = _cli("agreement", zoo / "*.pt", "--samples", SAMPLES, "--device", "cpu", "--max-subsets", 3,
               "--json", tmp_path / "a.json", "--csv", tmp_path / "a.csv")
    cli_doc = _doc(tmp_path / "a.json")
    r = kdprobe.agreement([str(zoo / "*.pt")], samples=SAMPLES, device="cpu", max_subsets=3, **QUIET)
    assert r.main == "pairs" and _api_doc(r) == cli_doc
    assert len(cli_doc["pairs"]) == 15 and "student-teacher kd-label->scratch" in res.output
    # the CSV the command wrote is the result's main frame
    pd.testing.assert_frame_equal(r.to_frame(), pd.read_csv(tmp_path / "a.csv"), check_dtype=False)
    # independently: the first pair's disagreement from the two models' own predictions
    data = load_dataset("digits")
    x = normalize(data.test_x[:SAMPLES], data.mean, data.std)
    p = r.table()[0]
    with torch.no_grad():
        pa = load_checkpoint(p["a"]).model(x).argmax(1)
        pb = load_checkpoint(p["b"]).model(x).argmax(1)
    assert p["disagreement"] == pytest.approx(float((pa != pb).double().mean()), abs=1e-12)

    ens = kdprobe.ensembles(str(zoo / "*.pt"), samples=SAMPLES, device="cpu", max_subsets=3, **QUIET)
    doc = _api_doc(ens)
    assert ens.main == "ensemble_gains" and doc["command"] == "ensembles" and doc["settings"] == cli_doc["settings"]
    shared = {"ensembles", "ensemble_gains", "ensemble_subsets", "gain_tests"}
    assert set(doc) - {"command", "settings"} == shared
    for name in shared:
        assert doc[name] == cli_doc[name], name
    assert set(ens.details) == {"scratch", "kd-label"}


def test_agreement_of_checkpoint_objects_equals_paths(zoo):
    paths = [str(zoo / f"{m}-{s}.pt") for m in ("scratch", "kd") for s in range(3)]
    by_path = kdprobe.agreement(paths, samples=SAMPLES, device="cpu", max_subsets=3, **QUIET)
    by_object = kdprobe.agreement([kdprobe.load(p) for p in paths], samples=SAMPLES, device="cpu", max_subsets=3,
                                  **QUIET)
    assert _api_doc(by_object) == _api_doc(by_path)  # same paths, metadata and sha256: the same document


def test_cka_group_and_pair_equal_the_cli(zoo, tmp_path):
    _cli("cka", zoo / "*.pt", "--samples", SAMPLES, "--device", "cpu", "--json", tmp_path / "g.json")
    g = kdprobe.cka(str(zoo / "*.pt"), samples=SAMPLES, device="cpu", **QUIET)
    assert g.main == "pairs" and g.details is None and _api_doc(g) == _doc(tmp_path / "g.json")
    assert len(g.table("pairs")) == 15

    a, b = zoo / "scratch-0.pt", zoo / "kd-0.pt"
    res = _cli("cka", a, b, "--samples", SAMPLES, "--device", "cpu", "--json", tmp_path / "p.json",
               "--layers-a", "layer1.0,fc:in", "--layers-b", "layer1.0,layer2.0,fc:in")
    pair = kdprobe.cka([str(a), str(b)], samples=SAMPLES, device="cpu", layers_a=["layer1.0", "fc:in"],
                       layers_b="layer1.0, layer2.0,fc:in", **QUIET)
    assert pair.main == "layers" and _api_doc(pair) == _doc(tmp_path / "p.json")
    assert "(student-teacher pair)" in res.output
    assert [(r["layer_a"], r["layer_b"]) for r in pair.table()] == [
        (la, lb) for la in ("layer1.0", "fc:in") for lb in ("layer1.0", "layer2.0", "fc:in")]
    m = pair.details  # the CkaMatrix behind the table
    assert m.layers_a == ("layer1.0", "fc:in") and m.n == SAMPLES
    assert [r["cka"] for r in pair.table()] == [v for row in m.values for v in row]
    # two checkpoints with summary=True are a group of one pair, as --summary
    s = kdprobe.cka([str(a), str(b)], samples=SAMPLES, device="cpu", summary=True, **QUIET)
    assert s.main == "pairs" and len(s.table()) == 1
    with pytest.raises(kdprobe.KdprobeError, match="estimator one of"):
        kdprobe.cka([str(a), str(b)], estimator="kernel", **QUIET)


def test_cka_pair_of_modules_equals_paths(zoo):
    paths = [str(zoo / "scratch-1.pt"), str(zoo / "scratch-2.pt")]
    by_path = kdprobe.cka(paths, samples=SAMPLES, device="cpu", **QUIET)
    modules = [load_checkpoint(p).model for p in paths]
    by_module = kdprobe.cka(modules, samples=SAMPLES, device="cpu", dataset="digits", **QUIET)
    assert by_module.main == "layers"  # two modules: pair mode, as two paths
    cols = ["layer_a", "layer_b", "cka"]
    assert _metric_columns(by_module.table(), cols) == _metric_columns(by_path.table(), cols)
    assert {r["a"] for r in by_module.table()} == {"module0"}
    with pytest.raises(kdprobe.KdprobeError, match="dataset="):
        kdprobe.cka(modules, samples=SAMPLES, device="cpu", **QUIET)


def test_calibration_equals_the_cli_and_objects_equal_paths(zoo, tmp_path):
    args = ["--samples", SAMPLES, "--device", "cpu", "--temperature", "--adaptive", "--classwise", "--seed", 3]
    res = _cli("calibration", zoo / "*.pt", *args, "--json", tmp_path / "c.json", "--csv", tmp_path / "c.csv")
    opts = dict(samples=SAMPLES, device="cpu", temperature=True, adaptive=True, classwise=True, seed=3, **QUIET)
    r = kdprobe.calibration([str(zoo / "*.pt")], **opts)
    assert r.main == "checkpoints" and _api_doc(r) == _doc(tmp_path / "c.json")
    assert "adaptive_ece" in res.output and "temperature: fitted by NLL" in res.output
    pd.testing.assert_frame_equal(r.to_frame(), pd.read_csv(tmp_path / "c.csv"), check_dtype=False)
    # independently: the first checkpoint's ECE from its own logits
    row = r.table()[0]
    data = load_dataset("digits")
    with torch.no_grad():
        p = torch.softmax(load_checkpoint(row["checkpoint"]).model(
            normalize(data.test_x[:SAMPLES], data.mean, data.std)).double(), 1)
    conf, pred = p.max(1)
    hit = (pred == data.test_y[:SAMPLES]).double()
    ece = 0.0
    for i in range(15):
        inside = (conf > i / 15) & (conf <= (i + 1) / 15)
        if inside.any():
            ece += float(inside.double().mean()) * abs(float(hit[inside].mean() - conf[inside].mean()))
    assert row["ece"] == pytest.approx(ece, abs=1e-6)

    paths = [str(zoo / f"{m}-{s}.pt") for m in ("scratch", "kd") for s in range(3)]
    by_path = kdprobe.calibration(paths, **opts)
    cols = ["acc", "nll", "ece", "brier", "adaptive_ece", "classwise_ece", "temperature", "nll_after"]
    by_object = kdprobe.calibration([kdprobe.load(p) for p in paths], **opts)
    assert _api_doc(by_object) == _api_doc(by_path)
    by_module = kdprobe.calibration([load_checkpoint(p).model for p in paths], dataset="digits", **opts)
    assert _metric_columns(by_module.table(), cols) == _metric_columns(by_path.table(), cols)
    assert {row["group"] for row in by_module.table()} == {"module"}  # no metadata: one group of modules


def test_sharpness_equals_the_cli_and_the_library(zoo, tmp_path):
    paths = [zoo / "scratch-0.pt", zoo / "kd-1.pt"]
    res = _cli("sharpness", *paths, "--samples", 32, "--batch-size", 16, "--top-k", 1, "--iterations", 3,
               "--trace-samples", 4, "--trace-sketch", 2, "--vectors-per-pass", 4, "--seed", 5, "--device", "cpu",
               "--json", tmp_path / "s.json")
    r = kdprobe.sharpness([str(p) for p in paths], samples=32, batch_size=16, top_k=1, iterations=3,
                          trace_samples=4, trace_sketch=2, vectors_per_pass=4, seed=5, device="cpu", **QUIET)
    assert r.main == "checkpoints" and _api_doc(r) == _doc(tmp_path / "s.json")
    assert isinstance(r.details, tuple) and len(r.details) == 2
    rows = r.table()
    # 4 vectors are too few for a stable interval: the CLI's warning comes from the result's data
    for row, d in zip(rows, r.details):
        assert not d.trace_stable and not row["trace_stable"] and "only 4 vectors" in row["trace_note"]
        assert f"warning: {row['checkpoint']}: trace {d.trace:.4g}" in res.output
    # the checkpoints table holds the per-checkpoint fields of SharpnessResult (issue 21), checked against
    # the library run on the model directly
    data = load_dataset("digits")
    x, y = normalize(data.train_x[:32], data.mean, data.std), data.train_y[:32]
    ref = kdprobe_sharpness(load_checkpoint(paths[1]).model, x, y)
    row = rows[1]
    assert row["checkpoint"] == str(paths[1])
    for k in ("trace", "trace_low", "trace_high", "trace_exact"):
        assert row[k] == pytest.approx(getattr(ref, k), rel=1e-6), k
    assert row["trace_low"] <= row["trace"] <= row["trace_high"]
    assert (row["method"], row["trace_method"], row["trace_vectors"], row["trace_confidence"]) == \
        ("lanczos", "hutch++", 4, 0.95)
    assert row["trace_sketch"] == ref.trace_sketch and row["eig_products"] == ref.eig_products
    assert row["products"] == row["eig_products"] + 4 and row["density_sigma2"] is None


def kdprobe_sharpness(model, x, y):
    from kdprobe.probes.sharpness import sharpness

    return sharpness(model, x, y, top_k=1, iterations=3, trace_samples=4, trace_sketch=2, batch_size=16,
                     vectors_per_pass=4, seed=5)


def test_sharpness_refuses_options_beyond_the_model(zoo):
    tiny = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    with pytest.raises(kdprobe.KdprobeError, match="--top-k <= the 650 trainable parameters"):
        kdprobe.sharpness([tiny], dataset="digits", top_k=651, samples=8, device="cpu", **QUIET)
    with pytest.raises(kdprobe.KdprobeError, match="expected trace_samples to be an integer >= 1"):
        kdprobe.sharpness([str(zoo / "kd-0.pt")], trace_samples=0, **QUIET)


def test_result_frame_save_and_figure(zoo, tmp_path):
    r = kdprobe.calibration(str(zoo / "scratch-*.pt"), samples=SAMPLES, device="cpu", **QUIET)
    frame = r.to_frame()
    assert list(frame["checkpoint"]) == [str(zoo / f"scratch-{s}.pt") for s in range(3)]
    groups = r.to_frame("groups")
    ece = groups[(groups["group"] == "scratch") & (groups["metric"] == "ece")]["mean"].item()
    assert ece == pytest.approx(float(np.mean(frame["ece"])), rel=1e-12)
    for suffix in (".json", ".csv", ".html"):
        out = r.save(tmp_path / f"r{suffix}")
        assert out.stat().st_size > 0
    assert json.loads((tmp_path / "r.json").read_text())["data"]["checkpoints"] == r.table()
    pd.testing.assert_frame_equal(frame, pd.read_csv(tmp_path / "r.csv"), check_dtype=False)
    r.save(tmp_path / "rel.csv", table="reliability")
    assert len(pd.read_csv(tmp_path / "rel.csv")) == 3 * 15
    assert "Plotly.newPlot" in (tmp_path / "r.html").read_text()
    with pytest.raises(kdprobe.KdprobeError, match="expected a path ending in"):
        r.save(tmp_path / "r.txt")
    assert not (tmp_path / "r.txt").exists()
    with pytest.raises(kdprobe.KdprobeError, match="no table"):
        r.to_frame("pairs")
    import plotly.graph_objects as go

    fig = r.figure()
    assert isinstance(fig, go.Figure) and fig.data
    assert not math.isnan(r.settings["confidence"]) and r.settings["samples_used"] == SAMPLES
