"""kdprobe.diversity / surplus / evaluate: the same inputs give the same numbers as `kdprobe diversity|surplus|eval`,
bit for bit; checkpoints as paths, kdprobe.Checkpoint objects or plain nn.Modules; to_frame, save and figure."""
import json

import pytest
import torch

pd = pytest.importorskip("pandas")
from typer.testing import CliRunner  # noqa: E402

import kdprobe  # noqa: E402
from cli.main import app  # noqa: E402
from kdprobe.checkpoints.format import save_checkpoint  # noqa: E402
from kdprobe.data.datasets import load_dataset, normalize  # noqa: E402
from kdprobe.errors import KdprobeError  # noqa: E402
from kdprobe.models import create_model  # noqa: E402
from kdprobe.probes.diversity import jacobian_score, probe_indices  # noqa: E402

DIV = dict(runs=2, batch_size=8, seed=3, device="cpu")
DIV_ARGS = ["--runs", "2", "--batch-size", "8", "--seed", "3", "--device", "cpu"]


def _cli(*args):
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return res


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Two scratch seeds and one kd checkpoint of a tiny untrained resnet8b on digits (no training: fast)."""
    d = tmp_path_factory.mktemp("api_div")
    paths = []
    for method, seed in (("scratch", 0), ("scratch", 1), ("kd", 2)):
        torch.manual_seed(seed)
        m = create_model("resnet8b", num_classes=10, in_channels=1, width=0.25)
        paths.append(save_checkpoint(d / f"{method}-{seed}.pt", m, {"method": method, "seed": seed,
                                                                      "dataset": "digits"}))
    return paths


@pytest.fixture(scope="module")
def div_run(ckpts, tmp_path_factory):
    """The CLI's diversity files and the API's result for the same inputs."""
    out = tmp_path_factory.mktemp("div_out")
    res = _cli("diversity", *ckpts, *DIV_ARGS, "--json", out / "d.json", "--csv", out / "d.csv")
    return out, res, kdprobe.diversity([str(p) for p in ckpts], **DIV)


def _values(result):
    return [s.values for s in result.scores]


# ---- diversity ------------------------------------------------------------------------------------------------

def test_diversity_cli_and_api_agree_bit_for_bit(div_run, ckpts):
    out, res, r = div_run
    doc = json.loads((out / "d.json").read_text())
    assert json.loads(json.dumps(r.to_dict())) == doc  # every score, group statistic and setting, exactly
    assert doc["kind"] == "diversity" and [m["values"] for m in doc["data"]["models"]] == [list(v) for v in _values(r)]
    assert r.settings.reference == "scratch" and [g.group for g in r.groups] == ["scratch", "kd"]
    assert f"{r.groups[0].mean:.3f}" in res.output  # the printed table is the API's numbers
    # the scores themselves, recomputed directly on the same seeded probe batches
    data = load_dataset("digits")
    batches = [normalize(data.train_x[i], data.mean, data.std) for i in probe_indices(len(data.train_x), 2, 8, 3)]
    for p, vals in zip(ckpts, _values(r)):
        model = kdprobe.load(p).model
        assert list(vals) == pytest.approx([jacobian_score(model, b) for b in batches], rel=1e-12)


def test_diversity_to_frame_is_the_csv(div_run):
    out, _, r = div_run
    frame = r.to_frame()
    pd.testing.assert_frame_equal(frame, pd.read_csv(out / "d.csv"))
    assert len(frame) == 3 * 2 and list(frame["score"]) == [v for vals in _values(r) for v in vals]
    groups = r.to_frame("groups")
    assert list(groups["group"]) == ["scratch", "kd"] and list(groups["n_models"]) == [2, 1]
    with pytest.raises(KdprobeError, match="no table 'pairs'"):
        r.to_frame("pairs")


def test_diversity_takes_checkpoint_objects_and_modules(div_run, ckpts):
    _, _, by_path = div_run
    objects = kdprobe.diversity([kdprobe.load(p) for p in ckpts], **DIV)
    assert _values(objects) == _values(by_path) and objects.to_dict()["data"]["groups"] == by_path.to_dict()["data"]["groups"]
    modules = kdprobe.diversity([kdprobe.load(p).model for p in ckpts], dataset="digits", **DIV)
    assert _values(modules) == _values(by_path)
    assert [s.path for s in modules.scores] == ["module0", "module1", "module2"]
    assert [g.group for g in modules.groups] == ["module"] and modules.settings.reference is None
    with pytest.raises(KdprobeError, match="plain nn.Module.*dataset="):
        kdprobe.diversity([kdprobe.load(p).model for p in ckpts], **DIV)


def test_diversity_save_and_figure(div_run, tmp_path):
    out, _, r = div_run
    assert r.save(tmp_path / "d.json").read_bytes() == (out / "d.json").read_bytes()
    assert r.save(tmp_path / "d.csv").read_bytes() == (out / "d.csv").read_bytes()
    assert r.save(tmp_path / "d.html").stat().st_size > 1_000_000  # plotly.js inlined: works offline
    fig = r.figure()
    means = [y for t in fig.data if t.name.endswith("checkpoints") for y in t.y]
    assert sorted(means) == sorted(s.mean for s in r.scores)
    with pytest.raises(KdprobeError, match=r"expected a path ending in \.csv, \.htm, \.html, \.json"):
        r.save(tmp_path / "d.txt")
    (tmp_path / "other.json").write_bytes(b"\x89PNG\r\n\x1a\n")  # never replaces another kind of file
    with pytest.raises(KdprobeError, match="never replaces another kind of file"):
        r.save(tmp_path / "other.json")


def test_diversity_checks_options_before_work(ckpts):
    with pytest.raises(KdprobeError, match="--bn one of"):
        kdprobe.diversity(ckpts, bn="frozen", **DIV)
    with pytest.raises(KdprobeError, match="--runs"):
        kdprobe.diversity(ckpts, **{**DIV, "runs": 0})
    with pytest.raises(KdprobeError, match="reference group 'teacher'"):
        kdprobe.diversity(ckpts, reference="teacher", **DIV)


# ---- evaluate -------------------------------------------------------------------------------------------------

def test_evaluate_cli_and_api_agree_bit_for_bit(ckpts, tmp_path):
    _cli("eval", *ckpts, "--split", "both", "--device", "cpu", "--json", tmp_path / "e.json", "--csv", tmp_path / "e.csv")
    r = kdprobe.evaluate([str(p) for p in ckpts], split="both", device="cpu")
    assert r.to_dict() == json.loads((tmp_path / "e.json").read_text())
    pd.testing.assert_frame_equal(r.to_frame(), pd.read_csv(tmp_path / "e.csv"))
    assert r.save(tmp_path / "api.json").read_bytes() == (tmp_path / "e.json").read_bytes()
    assert r.save(tmp_path / "api.csv").read_bytes() == (tmp_path / "e.csv").read_bytes()
    # the accuracy, counted directly
    d = load_dataset("digits")
    model = kdprobe.load(ckpts[0]).model
    with torch.no_grad():
        hits = (model(normalize(d.test_x, d.mean, d.std)).argmax(1) == d.test_y).sum().item()
    assert r.rows[0]["test_acc"] == hits / len(d.test_y) and r.rows[0]["test_images"] == len(d.test_y)
    doc = r.to_dict()  # the envelope (docs/units.md), not a bare list
    assert (doc["kind"], doc["settings"]["split"], doc["data"]) == ("eval", "both", r.records())
    assert [row["method"] for row in r.rows] == ["scratch", "scratch", "kd"]


def test_evaluate_takes_checkpoint_objects_and_modules(ckpts, tmp_path):
    by_path = kdprobe.evaluate(ckpts[0], device="cpu")
    ck = kdprobe.load(ckpts[0])
    assert kdprobe.evaluate(ck, device="cpu").rows == by_path.rows
    (mod,) = kdprobe.evaluate(ck.model, dataset="digits", device="cpu").rows
    assert mod["checkpoint"] == "module0" and mod["method"] == "module"
    assert (mod["test_loss"], mod["test_acc"]) == (by_path.rows[0]["test_loss"], by_path.rows[0]["test_acc"])
    fig = by_path.figure()
    assert list(fig.data[0].y) == [by_path.rows[0]["test_acc"]]
    assert by_path.save(tmp_path / "e.html").stat().st_size > 1_000_000
    with pytest.raises(KdprobeError, match="expected a path ending in"):
        by_path.save(tmp_path / "e.xlsx")
    with pytest.raises(KdprobeError, match="--split test, train or both"):
        kdprobe.evaluate(ckpts[0], split="val")


# ---- surplus --------------------------------------------------------------------------------------------------

RESULTS = ("model,setting,train_type,unpruned,finetuned,post_distill,pre_post,self_distill\n"
           "resnet56,40/70/90,scratch,71.23,70.06,,,\n"
           "resnet56,40/70/90,scratch,71.01,69.80,,,\n"
           "resnet56,40/70/90,label,73.76,,,,73.30\n"
           "resnet56,40/70/90,label,73.40,,,,73.10\n")


def test_surplus_cli_and_api_agree_bit_for_bit(tmp_path):
    src = tmp_path / "results.csv"
    src.write_text(RESULTS)
    _cli("surplus", src, "--json", tmp_path / "s.json", "--csv", tmp_path / "s.csv")
    r = kdprobe.surplus(src)
    assert r.to_dict() == json.loads((tmp_path / "s.json").read_text())
    (row,) = r.rows
    us, fs, uk, sd = (71.23 + 71.01) / 2, (70.06 + 69.80) / 2, (73.76 + 73.40) / 2, (73.30 + 73.10) / 2
    # a table in percent: read as fractions (docs/units.md)
    assert row.surplus == pytest.approx(((sd - fs) - (uk - us)) / 100, abs=1e-14) and r.from_percent
    # the CSV rounds to 10 significant digits; to_frame keeps full precision
    pd.testing.assert_frame_equal(r.to_frame(), pd.read_csv(tmp_path / "s.csv"), rtol=1e-9)
    assert r.save(tmp_path / "api.json").read_bytes() == (tmp_path / "s.json").read_bytes()
    assert r.save(tmp_path / "api.csv").read_bytes() == (tmp_path / "s.csv").read_bytes()
    fig = r.figure()
    assert [t.name for t in fig.data] == ["label"] and list(fig.data[0].y) == [row.surplus]
    assert r.save(tmp_path / "s.html").stat().st_size > 1_000_000
    with pytest.raises(KdprobeError, match="expected a path ending in"):
        r.save(tmp_path / "s.parquet")
    with pytest.raises(KdprobeError, match="destroy that input"):  # never the table it was read from
        r.save(src)


def test_surplus_of_fractions_is_as_written_of_percents_says_so_and_refuses_no_kd(tmp_path):
    src = tmp_path / "fractions.csv"
    src.write_text("model,setting,train_type,unpruned,finetuned,post_distill,pre_post,self_distill\n"
                   "r56,B,scratch,0.7123,0.7006,,,\nr56,B,label,0.7376,,,,0.7330\n")
    notes = []
    r = kdprobe.surplus(src, note=notes.append)
    assert not r.from_percent and not notes
    assert r.rows[0].surplus == pytest.approx((0.7330 - 0.7006) - (0.7376 - 0.7123), abs=1e-14)
    src.write_text("model,setting,train_type,unpruned,finetuned,post_distill,pre_post,self_distill\n"
                   "r56,B,scratch,71.23,70.06,,,\nr56,B,label,73.76,,,,73.30\n")
    r = kdprobe.surplus(src, note=notes.append)
    assert r.from_percent and len(notes) == 1 and "divided by 100" in notes[0]
    assert r.rows[0].surplus == pytest.approx(((73.30 - 70.06) - (73.76 - 71.23)) / 100, abs=1e-14)
    src.write_text("model,setting,train_type,unpruned,finetuned,post_distill,pre_post,self_distill\n"
                   "r56,B,scratch,71,70,,,\n")
    with pytest.raises(KdprobeError, match="at least one KD row"):
        kdprobe.surplus(src)


def test_names_are_exported_from_kdprobe():
    from kdprobe.api import diversity as api

    assert kdprobe.diversity is api.diversity and kdprobe.surplus is api.surplus and kdprobe.evaluate is api.evaluate
    assert kdprobe.DiversityResult is api.DiversityResult and kdprobe.EvaluationResult is api.EvaluationResult
    assert kdprobe.SurplusResult is api.SurplusResult
