"""The pruning pipeline: every cell, results equal the checkpoints, surplus by hand, resume, provenance, CLI."""
from __future__ import annotations

import csv
import json
import shutil

import pytest
import torch

from kdprobe.checkpoints.format import load_checkpoint, read_payload, save_checkpoint
from kdprobe.errors import KdprobeError
from kdprobe.files.documents import is_envelope
from kdprobe.files.io import sha256_file
from trainers import loop
from trainers.pipeline import PipelineSpec, plan_cells, run_pruning_pipeline

SPEC = dict(model="resnet8a", model_kwargs={"width": 0.25}, dataset="digits", train_subset=256, method="l1",
            remaining="0.5,0.5,0.5", distill=("label",), seeds=(0,), train_overrides={"epochs": 2},
            finetune_overrides={"epochs": 1})
CELLS = ["scratch", "scratch_pruned", "scratch_finetuned", "kd-label", "kd-label_pruned", "pre_distill-label",
         "post_distill-label", "pre_post-label", "self_distill-label"]
OUTPUTS = ("results.csv", "surplus.csv", "surplus.json", "pipeline.json")


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    """One finished tiny pipeline; tests that change files work on copies."""
    import importlib.util

    from trainers.trackers import TrackerSpec

    out = tmp_path_factory.mktemp("pipe") / "run"
    # TensorBoard (an optional extra) gets every training cell's run, when installed (test_trainings_log_...)
    trackers = TrackerSpec(("tensorboard",), str(out.parent / "logs"), "p", "run") \
        if importlib.util.find_spec("tensorboard") else None
    res = run_pruning_pipeline(PipelineSpec(**SPEC), out, device="cpu", trackers=trackers, run_prefix="run/")
    return out, res


def _copy(done, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(done[0], dst)
    return dst


def _acc(out, name):
    return read_payload(out / "seed0" / f"{name}.pt")["meta"]["test_acc"]


def _outputs(out):
    return {n: (out / n).read_bytes() for n in OUTPUTS}


def _no_work(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the pipeline trained or pruned a cell whose checkpoint exists")

    monkeypatch.setattr(loop, "train", boom)
    monkeypatch.setattr("kdprobe.pruning.ops.prune_checkpoint", boom)


def test_all_cells_and_results_equal_the_checkpoints(done):
    out, res = done
    assert [c.cell.name for c in res.cells] == CELLS and all(c.action in ("trained", "pruned") for c in res.cells)
    for name in CELLS:
        assert (out / "seed0" / f"{name}.pt").is_file()
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["model", "setting", "train_type", "seed", "unpruned", "finetuned", "post_distill",
                             "pre_post", "self_distill"]
    scratch, label = rows
    assert (scratch["model"], scratch["setting"], scratch["train_type"], scratch["seed"]) == \
           ("resnet8a-width0.25", "50/50/50", "scratch", "0")
    assert float(scratch["unpruned"]) == _acc(out, "scratch")
    assert float(scratch["finetuned"]) == _acc(out, "scratch_finetuned")
    assert scratch["post_distill"] == scratch["pre_post"] == scratch["self_distill"] == ""
    expect = {"unpruned": "kd-label", "finetuned": "pre_distill-label", "post_distill": "post_distill-label",
              "pre_post": "pre_post-label", "self_distill": "self_distill-label"}
    for col, name in expect.items():
        assert float(label[col]) == _acc(out, name), col
    pruned = read_payload(out / "seed0" / "kd-label_pruned.pt")["meta"]["pruning"]
    assert pruned["block_cfg"] == [2, 4, 8] and pruned["source_sha256"] == sha256_file(out / "seed0" / "kd-label.pt")


def test_surplus_equals_the_formula_by_hand(done):
    out, res = done
    us, fs = _acc(out, "scratch"), _acc(out, "scratch_finetuned")
    uk, sd = _acc(out, "kd-label"), _acc(out, "self_distill-label")
    (row,) = res.surplus
    assert row.surplus == pytest.approx((sd - fs) - (uk - us), abs=1e-9)
    doc = json.loads((out / "surplus.json").read_text())
    assert doc["data"][0]["surplus"] == pytest.approx((sd - fs) - (uk - us), abs=1e-9)
    pj = json.loads((out / "pipeline.json").read_text())
    assert is_envelope(pj) and pj["kind"] == "pipeline"  # the envelope every kdprobe JSON document has
    cells = pj["data"]["cells"]
    assert [c["path"] for c in cells] == [f"seed0/{n}.pt" for n in CELLS]
    assert all(c["sha256"] == sha256_file(out / c["path"]) for c in cells)
    assert all(c["test_acc"] == read_payload(out / c["path"])["meta"]["test_acc"] for c in cells if c["test_acc"])
    assert pj["settings"]["bn_sparsity"] == 0.0 and "same architecture" in pj["settings"]["teacher"]


def test_trainings_log_one_tracker_run_per_training_cell(done):
    pytest.importorskip("tensorboard")
    from tracker_readers import tensorboard_scalars

    out, res = done
    trained = [c.cell for c in res.cells if c.cell.kind == "train"]
    assert trained and len(trained) < len(CELLS)  # the pruned cells are not trainings
    for cell in trained:
        records = [json.loads(x) for x in loop.log_path(out / cell.file).read_text().splitlines()]
        scalars = tensorboard_scalars(out.parent / "logs" / "tensorboard" / "run" / f"seed{cell.seed}" / cell.name)
        assert [s for s, _ in scalars["loss/train"]] == [r["epoch"] for r in records], cell.name


def test_teachers_and_inits_are_the_right_files(done):
    out, _ = done
    sha = {n: sha256_file(out / "seed0" / f"{n}.pt") for n in CELLS}
    meta = {n: read_payload(out / "seed0" / f"{n}.pt")["meta"] for n in CELLS}
    assert meta["self_distill-label"]["teacher"]["sha256"] == sha["kd-label"]
    assert meta["post_distill-label"]["teacher"]["sha256"] == sha["scratch"]
    assert meta["pre_post-label"]["teacher"]["sha256"] == sha["scratch"]
    assert meta["kd-label"]["teacher"]["sha256"] == sha["scratch"]
    assert meta["pre_distill-label"]["teacher"] is None and meta["scratch_finetuned"]["teacher"] is None
    assert meta["post_distill-label"]["init"]["sha256"] == sha["scratch_pruned"]
    for n in ("pre_distill-label", "pre_post-label", "self_distill-label"):
        assert meta[n]["init"]["sha256"] == sha["kd-label_pruned"], n
    ft = meta["self_distill-label"]["config"]
    assert (ft["epochs"], ft["lr"], ft["schedule"], ft["batch_size"]) == (1, 0.001, "constant", 64)
    assert meta["scratch"]["config"]["preset"] == "rnp" and meta["scratch"]["config"]["epochs"] == 2


def test_second_run_skips_everything_and_writes_identical_files(done, tmp_path, monkeypatch):
    out = _copy(done, tmp_path)
    before = _outputs(out)
    _no_work(monkeypatch)
    res = run_pruning_pipeline(PipelineSpec(**SPEC), out, device="cpu")
    assert all(c.action == "skipped" for c in res.cells)
    assert _outputs(out) == before


def test_deleting_one_cell_retrains_only_that_cell(done, tmp_path, monkeypatch):
    out = _copy(done, tmp_path)
    before = _outputs(out)
    (out / "seed0" / "pre_post-label.pt").unlink()
    calls = []
    real = loop.train
    monkeypatch.setattr(loop, "train", lambda cfg, path, **kw: calls.append(path.name) or real(cfg, path, **kw))
    res = run_pruning_pipeline(PipelineSpec(**SPEC), out, device="cpu")
    assert calls == ["pre_post-label.pt"]
    assert [c.cell.name for c in res.cells if c.action != "skipped"] == ["pre_post-label"]
    # CPU training is deterministic: the same accuracies (the checkpoint's bytes differ here only because the
    # copied folder's absolute teacher/init paths went into the new checkpoint's config)
    after = _outputs(out)
    assert all(after[n] == before[n] for n in ("results.csv", "surplus.csv", "surplus.json"))


def test_changed_settings_or_upstream_are_refused(done, tmp_path, monkeypatch):
    out = _copy(done, tmp_path)
    _no_work(monkeypatch)
    with pytest.raises(KdprobeError, match=r"scratch_finetuned.pt exists but was trained with epochs=1, expected "
                                           r"epochs=2.*new --out"):
        run_pruning_pipeline(PipelineSpec(**dict(SPEC, finetune_overrides={"epochs": 2})), out, device="cpu")
    with pytest.raises(KdprobeError, match=r"scratch_pruned.pt exists but was pruned with remaining"):
        run_pruning_pipeline(PipelineSpec(**dict(SPEC, remaining="0.25")), out, device="cpu")
    ck = load_checkpoint(out / "seed0" / "kd-label.pt")  # the upstream is replaced: same config, other weights
    with torch.no_grad():
        ck.model.fc.bias.add_(0.01)
    save_checkpoint(ck.path, ck.model, ck.meta, ck.extra)
    with pytest.raises(KdprobeError, match=r"kd-label_pruned.pt was made from .*kd-label.pt with sha256"):
        run_pruning_pipeline(PipelineSpec(**SPEC), out, device="cpu")


def test_bad_specs_fail_before_any_training(tmp_path, monkeypatch):
    _no_work(monkeypatch)
    with pytest.raises(KdprobeError, match="l1 pruning supports CIFAR ResNets"):
        run_pruning_pipeline(PipelineSpec(**dict(SPEC, model="vgg19_bn", model_kwargs={})), tmp_path, device="cpu")
    for bad in [dict(distill=("mixup",)), dict(seeds="0,x"), dict(method="slimming", remaining="0.5,0.6,0.7"),
                dict(train_overrides={"teacher": "t.pt"}), dict(finetune_overrides={"epochz": 1}),
                dict(model="resnet9000")]:
        with pytest.raises(KdprobeError):
            PipelineSpec(**dict(SPEC, **bad))
    spec = PipelineSpec(**dict(SPEC, method="slimming", remaining="0.5", distill="label,feature", seeds="1,2"))
    assert (spec.resolved_bn_sparsity, spec.setting, spec.distill, spec.seeds) == (1e-5, "50", ("label", "feature"), (1, 2))
    assert len(plan_cells(spec)) == 2 * (3 + 2 * 6)
    assert PipelineSpec(**dict(SPEC, model="vgg19_bn", method="slimming", remaining="0.5")).resolved_bn_sparsity == 1e-4


def test_cli_runs_the_pipeline_and_prints_both_tables(tmp_path):
    import typer
    from typer.testing import CliRunner

    from cli.pipeline import pipeline_app

    app = typer.Typer()
    app.add_typer(pipeline_app, name="pipeline")
    args = ["pipeline", "pruning", "--model", "resnet8a", "--width", "0.25", "--train-subset", "128",
            "--remaining", "0.5", "--epochs", "1", "--finetune-epochs", "1", "--out", str(tmp_path / "r"),
            "--device", "cpu", "--quiet"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "[7/9] seed 0 post_distill-label: training (from scratch_pruned, label KD from scratch)" in r.output
    assert "surplus ± se" in r.output and "self_distill" in r.output
    rows = list(csv.DictReader(open(tmp_path / "r" / "results.csv")))
    assert rows[0]["setting"] == "50" and f"{float(rows[1]['self_distill']):.4f}" in r.output
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and again.output.count("skip (exists") == 9
    bad = CliRunner().invoke(app, args[:-3] + ["--finetune-epochs", "2", "--quiet"])
    assert bad.exit_code == 1 and "use a new --out" in bad.output


def test_a_cell_interrupted_mid_training_resumes(done, tmp_path):
    from trainers.pipeline import cell_config
    out = _copy(done, tmp_path)
    cell = next(c for c in plan_cells(PipelineSpec(**SPEC)) if c.name == "pre_post-label")
    path = out / cell.file
    path.unlink()
    with pytest.raises(KeyboardInterrupt):  # killed mid-cell: only the partial state is left
        loop.train(cell_config(PipelineSpec(**SPEC), cell, out.resolve()), path, stop_after_steps=2)
    assert loop.partial_path(path).exists()
    run_pruning_pipeline(PipelineSpec(**SPEC), out, device="cpu")
    assert not loop.partial_path(path).exists()
    after, before = _outputs(out), _outputs(done[0])  # the resumed cell ends where the first run did
    assert all(after[n] == before[n] for n in ("results.csv", "surplus.csv", "surplus.json"))
