"""Studies with the ensemble-perspective probes: summary.json holds what the library functions give when run
directly on the cell checkpoints, a switched-off probe leaves no trace, and the verdicts follow the numbers."""
import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats as sps

from kdprobe.checkpoints.format import load_checkpoint
from kdprobe.data.datasets import load_dataset, normalize
from kdprobe.studies.ensemble_reading import DOES_NOT, INCONCLUSIVE, SUPPORTS, decide, headline, verdicts
from kdprobe.errors import KdprobeError
from kdprobe.studies.result import flat_summary, from_dict, to_dict
from kdprobe.studies.spec import load_spec
from trainers import study

SPEC = """
title = "tiny study with the ensemble probes"
seeds = [0, 1, 2]
[train]
dataset = "digits"
model = "resnet8b"
model_kwargs = { width = 0.25 }
preset = "fast"
overrides = { epochs = 3, train_subset = 256 }
[[methods]]
name = "scratch"
[[methods]]
name = "kd-label"
distill = "label"
teacher = "scratch"
[agreement]
samples = 120
[ensembles]
samples = 120
max_subsets = 4
[calibration]
samples = 120
[cka]
samples = 120
[sharpness]
samples = 64
iterations = 6
trace_samples = 5
"""
N, NS = 120, 64


def _load(tmp, text=SPEC, sets=()):
    p = tmp / "probes.toml"
    p.write_text(text)
    return load_spec(str(p), None, sets)


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("probes")
    spec, text = _load(tmp)
    out = tmp / "out"
    res = study.run_study(spec, out, device="cpu", spec_text=text)
    doc = json.loads((out / "summary.json").read_text())
    assert doc["kind"] == "study" and doc["format_version"] == 2 and set(doc) >= {"kdprobe_version", "units"}
    return tmp, out, res, flat_summary(doc)  # settings and data side by side


def _cells(summary, out):
    """method -> [(relative path, eval-mode model)] in seed order."""
    got = {}
    for c in summary["cells"]:
        got.setdefault(c["method"], []).append((c["path"], load_checkpoint(out / c["path"]).model))
    return got


def _test_data(n):
    d = load_dataset("digits")
    return normalize(d.test_x[:n], d.mean, d.std), d.test_y[:n]


def test_agreement_and_ensembles_match_the_library_on_the_cells(done):
    from kdprobe.probes.agreement import agreement
    from kdprobe.probes.calibration import metrics
    from kdprobe.probes.ensemble import ensemble_log_probs

    _, out, _, summary = done
    x, y = _test_data(N)
    cells = _cells(summary, out)
    with torch.no_grad():
        lp = {p: torch.log_softmax(m(x).double(), 1) for ms in cells.values() for p, m in ms}
    ag = summary["probes"]["agreement"]
    assert ag["settings"]["forward_passes"] == 6 == len(lp)  # one logit cache, one pass per checkpoint
    assert summary["probes"]["ensembles"]["settings"]["forward_passes"] == 6
    assert summary["probes"]["calibration"]["settings"]["forward_passes"] == 6
    pairs = {(r["a"], r["b"]): r for r in ag["tables"]["pairs"]}
    assert len(pairs) == 15
    for (a, b), r in pairs.items():
        ref = agreement(lp[a], lp[b], y)
        assert r["disagreement"] == pytest.approx(ref.disagreement) and r["js"] == pytest.approx(ref.js)
        # top-1 disagreement by hand
        assert r["disagreement"] == pytest.approx(float((lp[a].argmax(1) != lp[b].argmax(1)).double().mean()))
    st = [r for r in pairs.values() if r["pair_type"] == "student-teacher"]
    assert sorted((r["a"].split("/")[1], r["b"].split("/")[1]) for r in st) == [("kd-label", "scratch")] * 3
    for method in ("scratch", "kd-label"):
        paths = [p for p, _ in cells[method]]
        within = [float((lp[a].argmax(1) != lp[b].argmax(1)).double().mean())
                  for i, a in enumerate(paths) for b in paths[i + 1:]]
        row = next(r for r in ag["tables"]["pair_types"] if r["key"] == f"within {method}"
                   and r["metric"] == "disagreement")
        assert row["mean"] == pytest.approx(np.mean(within)) and row["n_pairs"] == 3
        # the ensemble: softmax average, accuracy by hand, gain over the mean member
        probs = torch.stack([lp[p].exp() for p in paths]).mean(0)
        acc = float((probs.argmax(1) == y).double().mean())
        member = np.mean([float((lp[p].argmax(1) == y).double().mean()) for p in paths])
        gain = next(r for r in summary["probes"]["ensembles"]["tables"]["ensemble_gains"]
                    if r["group"] == method and r["metric"] == "acc")
        assert gain["ensemble"] == pytest.approx(acc) and gain["gain"] == pytest.approx(acc - member)
        assert gain["ensemble"] == pytest.approx(metrics(ensemble_log_probs([lp[p] for p in paths]), y).acc)


def test_calibration_cka_and_sharpness_match_the_library_on_the_cells(done):
    from kdprobe.probes.calibration import calibration
    from kdprobe.probes.cka import linear_cka
    from kdprobe.probes.sharpness import sharpness

    _, out, _, summary = done
    x, y = _test_data(N)
    cells = _cells(summary, out)
    flat = [(method, p, m) for method, ms in cells.items() for p, m in ms]
    cal = {r["checkpoint"]: r for r in summary["probes"]["calibration"]["tables"]["checkpoints"]}
    with torch.no_grad():
        for _, p, m in flat:
            ref = calibration(m(x), y).metrics
            assert cal[p]["ece"] == pytest.approx(ref.ece) and cal[p]["brier"] == pytest.approx(ref.brier)
        # the penultimate representation without hooks: the pooled last feature map (the fc input)
        feats = {p: torch.flatten(F.adaptive_avg_pool2d(m.forward_features(x), 1), 1).double() for _, p, m in flat}
    for r in summary["probes"]["cka"]["tables"]["pairs"]:
        assert r["cka"] == pytest.approx(linear_cka(feats[r["a"]], feats[r["b"]], estimator="exact"), rel=1e-6)
    d = load_dataset("digits")
    xs, ys = normalize(d.train_x[:NS], d.mean, d.std), d.train_y[:NS]
    sh = {r["checkpoint"]: r for r in summary["probes"]["sharpness"]["tables"]["checkpoints"]}
    tops = {}
    for method, p, m in flat:
        ref = sharpness(m, xs, ys, iterations=6, trace_samples=5, batch_size=128, seed=0)
        # fp32 Hessian-vector products summed over 128-sample batches and ~1e4 parameters: the study's cell runs
        # under its own thread count, this call under the suite's, so sums split differently (~1e-7 each step)
        assert sh[p]["top_eigenvalue"] == pytest.approx(ref.top_eigenvalue, rel=1e-6)
        assert sh[p]["trace"] == pytest.approx(ref.trace, rel=1e-6) and sh[p]["n_samples"] == NS
        tops.setdefault(method, []).append(ref.top_eigenvalue)
    # the sharpness verdict's p is Welch's test on the per-checkpoint top eigenvalues (scipy), one KD method: no Holm
    v = next(v for v in summary["verdicts"] if v["probe"] == "sharpness")
    welch = sps.ttest_ind(tops["kd-label"], tops["scratch"], equal_var=False).pvalue
    assert v["p_value"] == pytest.approx(welch) and v["p_holm"] == pytest.approx(welch)
    assert v["diff"] == pytest.approx(np.mean(tops["kd-label"]) - np.mean(tops["scratch"]))
    assert v["verdict"] == decide(v["diff"], v["p_holm"], v["alpha"], -1)[0]


def test_report_files_and_round_trip(done):
    import re

    _, out, res, summary = done
    page = (out / "report.html").read_text()
    for name in ("agreement", "ensembles", "calibration", "cka", "sharpness"):
        assert f"id='{name}'" in page and (out / f"{name}.json").exists() and (out / f"{name}.html").exists()
        assert json.loads((out / f"{name}.json").read_text())["kind"] == name
    assert "id='reading'" in page and page.count("* plotly.js v") == 1
    # every probe figure is SVG only: no WebGL trace type anywhere in the page (no landscape in this spec)
    assert not re.search(r'"type":\s*"(scattergl|surface|heatmapgl|scatter3d)"', page)
    for v in summary["verdicts"]:  # the verdict sentence of each probe is on the page
        assert f"{v['method']} " in page and v["verdict"] in ("supports", "does not support", "inconclusive")
        assert headline([from_dict(summary).verdicts[summary["verdicts"].index(v)]]).split(" (")[0] in page
    doc = json.loads((out / "summary.json").read_text())
    assert to_dict(from_dict(doc)) == doc == to_dict(res) and flat_summary(to_dict(res)) == summary


def test_a_switched_off_probe_has_no_section(done, tmp_path, monkeypatch):
    _, out0, _, _ = done
    out = tmp_path / "out"
    shutil.copytree(out0, out)
    for f in out.glob("*.json"):
        f.unlink()
    monkeypatch.setattr(study, "train", lambda *a, **k: (_ for _ in ()).throw(AssertionError("trained")))
    spec, _ = _load(tmp_path, SPEC.replace("[cka]\nsamples = 120\n", ""), ["sharpness.enabled=false"])
    assert set(spec.probes) == {"agreement", "ensembles", "calibration"}
    res = study.run_study(spec, out, device="cpu")
    summary = json.loads((out / "summary.json").read_text())["data"]
    assert set(summary["probes"]) == {"agreement", "ensembles", "calibration"}
    assert {v["probe"] for v in summary["verdicts"]} == {"agreement", "ensembles", "calibration"}
    page = (out / "report.html").read_text()
    assert "id='cka'" not in page and "id='sharpness'" not in page and "id='agreement'" in page
    assert not (out / "cka.json").exists() and not (out / "sharpness.json").exists()
    assert all(c.action == "existing" for c in res.cells)


def _pair_tables(within_kd, within_ref, diff, p):
    return {"pair_types": [
        {"key": "within scratch", "metric": "disagreement", "mean": within_ref, "diff": None, "p_value": None,
         "reference": "within scratch"},
        {"key": "within kd", "metric": "disagreement", "mean": within_kd, "diff": diff, "p_value": p,
         "reference": "within scratch"}]}


def test_verdicts_on_made_up_numbers():
    assert decide(-0.05, 0.001, 0.05, -1)[0] == SUPPORTS
    assert decide(+0.05, 0.001, 0.05, -1)[0] == DOES_NOT
    assert decide(-0.05, 0.2, 0.05, -1)[0] == INCONCLUSIVE
    assert decide(-0.05, math.nan, 0.05, -1)[0] == INCONCLUSIVE  # one seed: no spread, no test
    assert decide(+0.1, 0.049, 0.05, +1)[0] == SUPPORTS and decide(+0.1, 0.05, 0.05, +1)[0] == INCONCLUSIVE
    # agreement: KD students disagree less (0.10 vs 0.15), p = 0.004 -> supports
    v, = verdicts("agreement", _pair_tables(0.10, 0.15, -0.05, 0.004), ["kd"], "scratch", 0.05)
    assert (v.verdict, v.value, v.reference_value, v.diff) == (SUPPORTS, 0.10, 0.15, -0.05)
    # ... they disagree MORE, significantly -> does not support; not significantly -> inconclusive
    assert verdicts("agreement", _pair_tables(0.2, 0.15, 0.05, 0.004), ["kd"], "scratch", 0.05)[0].verdict == DOES_NOT
    assert verdicts("agreement", _pair_tables(0.1, 0.15, -0.05, 0.3), ["kd"], "scratch", 0.05)[0].verdict \
        == INCONCLUSIVE
    # calibration (group records): Holm over two KD methods, p 0.02 and 0.03 -> 0.04 and 0.04 (< 0.05)
    groups = [{"group": "scratch", "metric": "ece", "mean": 0.08, "p_value": None, "reference": "scratch"},
              {"group": "a", "metric": "ece", "mean": 0.05, "p_value": 0.02, "reference": "scratch"},
              {"group": "b", "metric": "ece", "mean": 0.06, "p_value": 0.03, "reference": "scratch"}]
    va, vb = verdicts("calibration", {"groups": groups}, ["a", "b"], "scratch", 0.05)
    assert (va.p_holm, vb.p_holm) == (pytest.approx(0.04), pytest.approx(0.04)) and va.verdict == vb.verdict == SUPPORTS
    assert verdicts("calibration", {"groups": groups}, ["a", "b"], "scratch", 0.035)[0].verdict == INCONCLUSIVE
    # ensembles: KD's gain is larger than scratch's -> does not support; a missing test -> inconclusive
    ens = {"ensemble_gains": [{"group": "scratch", "metric": "acc", "gain": 0.02},
                              {"group": "kd", "metric": "acc", "gain": 0.05}],
           "gain_tests": [{"group": "kd", "reference": "scratch", "metric": "acc", "diff": 0.03, "p_value": 0.001}]}
    assert verdicts("ensembles", ens, ["kd"], "scratch", 0.05)[0].verdict == DOES_NOT
    assert verdicts("ensembles", {**ens, "gain_tests": []}, ["kd"], "scratch", 0.05)[0].verdict == INCONCLUSIVE
    # cka predicts HIGHER similarity; no reference: no verdict at all
    cka = {"pair_types": [dict(r, metric="cka") for r in _pair_tables(0.9, 0.8, 0.1, 0.01)["pair_types"]]}
    assert verdicts("cka", cka, ["kd"], "scratch", 0.05)[0].verdict == SUPPORTS
    assert verdicts("cka", cka, ["kd"], None, 0.05) == []


@pytest.mark.parametrize("edit, key", [
    (("max_subsets = 4", "max_subsets = 0"), "ensembles.max_subsets"),
    (("iterations = 6", "iterations = 6\ntop_k = 0"), "sharpness.top_k"),
    (("iterations = 6", "iterations = 6\nhvp = \"fast\""), "sharpness.hvp"),
    (("[cka]\nsamples = 120", "[cka]\nsamples = 120\nestimator = \"rbf\""), "cka.estimator"),
    (("[cka]\nsamples = 120", "[cka]\nsamples = 120\nlayer = \"layer9\""), "cka.layer"),
    (("[calibration]\nsamples = 120", "[calibration]\nsamples = 120\nbogus = 1"), "calibration.bogus"),
    (("[agreement]\nsamples = 120", "[agreement]\nsamples = -1"), "agreement.samples"),
    (("[agreement]\nsamples = 120", "[agreement]\nreference = \"kd\""), "agreement.reference"),
    (("[agreement]\nsamples = 120", "[agreement]\nmethods = [\"scratch\", \"cutmix\"]"), "agreement.methods"),
    (("[agreement]\nsamples = 120", "[agreement]\nalpha = 1.5"), "agreement.alpha"),
    (("[agreement]\nsamples = 120", "[agreement]\nenabled = \"no\""), "agreement.enabled"),
])
def test_probe_spec_errors_name_the_toml_key(tmp_path, edit, key):
    assert edit[0] in SPEC
    with pytest.raises(KdprobeError) as e:
        spec, _ = _load(tmp_path, SPEC.replace(*edit))
        study.run_study(spec, tmp_path / "out", device="cpu")
    assert f"{key}:" in str(e.value) and "\n" not in str(e.value)
    assert not list((tmp_path / "out").rglob("*.pt"))  # refused before any training
