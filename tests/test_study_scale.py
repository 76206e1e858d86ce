"""The cifar10-cpu scale (issue 13): class-balanced fixed-seed subsets, per-epoch evaluation on a test subset,
`auto:cifar10` found at run time, every built-in spec resolving and one real cell training a few steps."""
import hashlib
import json
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

from conftest import SHARED_CIFAR, shared_cifar_available
from kdprobe.checkpoints.format import load_checkpoint, read_payload
from kdprobe.data.datasets import load_dataset
from kdprobe.errors import KdprobeError
from kdprobe.studies.data_lookup import AUTO_CIFAR10, find_cifar10, locate_data
from kdprobe.studies.spec import builtin_specs, load_spec
from trainers import study
from trainers.config import TrainConfig, make_config

SCALE = "cifar10-cpu"


def test_balanced_subset_by_hand():
    d = load_dataset("digits")
    a = d.subset(n_train=105, balanced=True, seed=3)
    assert torch.bincount(a.train_y, minlength=10).tolist() == [11] * 5 + [10] * 5  # 105 = 10 x 10 + 5
    assert not torch.equal(a.train_y, torch.sort(a.train_y).values)  # dataset order kept, not class order
    # every picked image is an image of the full split with its own label, no image twice
    rows = {bytes(x.numpy().tobytes()) + bytes([int(y)]) for x, y in zip(d.train_x, d.train_y)}
    picked = [bytes(x.numpy().tobytes()) + bytes([int(y)]) for x, y in zip(a.train_x, a.train_y)]
    assert set(picked) <= rows and len(set(picked)) == len(picked) == 105
    b = d.subset(n_train=105, balanced=True, seed=3)
    c = d.subset(n_train=105, balanced=True, seed=4)
    assert torch.equal(a.train_x, b.train_x) and not torch.equal(a.train_x, c.train_x)
    assert d.subset(n_test=20, balanced=True).test_y.bincount(minlength=10).tolist() == [2] * 10
    r = d.subset(n_train=105, seed=3)  # the random rule is unchanged: the old draw
    idx = torch.randperm(len(d.train_y), generator=torch.Generator().manual_seed(3))[:105].sort().values
    assert torch.equal(r.train_y, d.train_y[idx])
    with pytest.raises(KdprobeError, match="expected at least 140 train images of class 6 .*, got 137"):
        d.subset(n_train=1400, balanced=True)  # digits' training split has 137 images of class 6


def test_new_config_fields_keep_old_fingerprints_and_are_checked():
    cfg = TrainConfig(train_subset=64)
    later = ("subset_rule", "subset_seed", "eval_subset",  # this change
             "teacher_arch_kwargs", "init_arch", "init_arch_kwargs", "feature_layer", "teacher_feature_layer", "image_size",
             "kd_settings", "extra_teachers")  # the KD families and ensemble teachers
    old = {k: v for k, v in asdict(cfg).items() if k not in later}
    old["milestones"] = list(old["milestones"])
    assert cfg.fingerprint() == hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()[:12]
    bal = replace(cfg, subset_rule="balanced", subset_seed=0, eval_subset=100)
    assert bal.fingerprint() != cfg.fingerprint() and TrainConfig.from_dict(bal.to_dict()) == bal
    with pytest.raises(KdprobeError, match="--subset-rule"):
        TrainConfig(subset_rule="stratified", train_subset=64)
    with pytest.raises(KdprobeError, match="no --train-subset"):
        TrainConfig(subset_rule="balanced")
    with pytest.raises(KdprobeError, match="--eval-subset"):
        TrainConfig(eval_subset=0)


def test_training_records_the_subset_rule_and_evaluates_the_last_epoch_on_everything(tmp_path):
    from kdprobe.probes.evaluate import evaluate
    from trainers.loop import train

    cfg = make_config("fast", model="resnet8b", model_kwargs={"width": 0.25}, dataset="digits", epochs=3,
                      train_subset=200, subset_rule="balanced", subset_seed=0, eval_subset=50, seed=5)
    res = train(cfg, tmp_path / "a.pt", device="cpu")
    ck = load_checkpoint(res.path)
    d = load_dataset("digits")
    assert [h["test_images"] for h in ck.meta["history"]] == [50, 50, len(d.test_y)]
    assert ck.meta["train_images"] == 200 and "class-balanced subset of 200" in ck.meta["train_subset_rule"]
    assert "seed 0" in ck.meta["train_subset_rule"] and "1000" not in ck.meta["test_eval"]
    assert ck.meta["test_acc"] == pytest.approx(evaluate(ck.model, d.test_x, d.test_y, d.mean, d.std).acc)
    assert ck.meta["history"][-1]["test_acc"] == pytest.approx(ck.meta["test_acc"])
    # epochs 1-2: the balanced 50-image subset (seed 0) is what they were measured on
    sub = d.subset(n_test=50, balanced=True, seed=0)
    assert sub.test_y.bincount(minlength=10).tolist() == [5] * 10
    snap = tmp_path / "b.pt"
    train(replace(cfg, epochs=1, eval_subset=None), snap, device="cpu")  # one epoch on everything: other count
    assert load_checkpoint(snap).meta["history"][0]["test_images"] == len(d.test_y)


def test_auto_cifar10_is_found_or_refused_in_one_line(tmp_path, monkeypatch, tiny_imagefolder):
    monkeypatch.setenv("KDPROBE_CIFAR10", str(tiny_imagefolder))
    assert find_cifar10() == (f"imagefolder:{tiny_imagefolder.resolve()}", None)
    tv = tmp_path / "tv"
    (tv / "cifar-10-batches-py").mkdir(parents=True)
    monkeypatch.setenv("KDPROBE_CIFAR10", str(tv))  # torchvision's folder: dataset cifar10 with that data_dir
    assert find_cifar10() == ("cifar10", str(tv.resolve()))
    monkeypatch.setenv("KDPROBE_CIFAR10", str(tmp_path / "nope"))
    with pytest.raises(KdprobeError, match=r"\$KDPROBE_CIFAR10 is .*nope.*does not exist"):
        find_cifar10()
    monkeypatch.delenv("KDPROBE_CIFAR10")
    monkeypatch.setattr("kdprobe.studies.data_lookup.SHARED", Path("..") / "no-such" / "cifar10.tar.gz")
    spec, _ = load_spec("table6", SCALE)
    with pytest.raises(KdprobeError) as e:
        study.run_study(spec, tmp_path / "out", device="cpu")
    assert "auto:cifar10" in str(e.value) and "--dataset imagefolder:PATH" in str(e.value)
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()  # refused before DIR is made
    # --dataset replaces every dataset of the spec (train and pruning blocks): nothing left to find
    spec, _ = load_spec("pruning-l1", SCALE, dataset=f"imagefolder:{tiny_imagefolder}")
    assert locate_data(spec) is spec and spec.pruning[0]["dataset"] == f"imagefolder:{tiny_imagefolder}"


def test_cifar10_cpu_resolves_for_every_builtin_spec(tmp_path, monkeypatch, tiny_imagefolder):
    from trainers.study_probes import _pipeline_spec

    monkeypatch.setenv("KDPROBE_CIFAR10", str(tiny_imagefolder))
    want = f"imagefolder:{tiny_imagefolder.resolve()}"
    assert {"table6", "table7", "pruning-l1", "demo"} <= set(builtin_specs())
    for name in builtin_specs():
        spec, _ = load_spec(name, SCALE)
        assert spec.scale == SCALE and spec.seeds == (0, 1, 2)
        located = locate_data(spec)
        configs = [c.config for c in study.plan_cells(spec, tmp_path)]
        configs += [replace(TrainConfig(), **{k: v for k, v in asdict(_pipeline_spec(located, i)).items()
                                              if k in ("dataset", "train_subset")}, subset_rule="balanced")
                    for i in range(len(located.pruning))]
        assert configs and all(c.dataset == want and c.train_subset == 8000 for c in configs), name
        for i in range(len(located.pruning)):
            ps = _pipeline_spec(located, i)
            for over in (ps.train_overrides, ps.finetune_overrides):  # initial training and fine-tuning alike
                assert (over["subset_rule"], over["subset_seed"], over["eval_subset"]) == ("balanced", 0, 1000)
        for c in configs[:len(configs) - len(located.pruning)]:
            assert (c.subset_rule, c.subset_seed, c.eval_subset, c.epochs) == ("balanced", 0, 1000, 8)
            assert c.model == "resnet14b" and c.model_kwargs == {"width": 0.5}
        if located.diversity is not None:
            assert located.diversity.batch_size == 128  # the paper's N
        if located.landscape is not None:
            ls = located.landscape
            assert (ls.x, ls.y, ls.samples, ls.split) == ("-1:1:21", "-1:1:21", 512, "test")
        if name in ("table6", "table7"):
            assert set(located.probes) == {"agreement", "ensembles", "calibration", "cka", "sharpness"}
        assert located.settings.get("train", {}).get("dataset", want) == want  # the report shows the real path
    t6 = load_spec("table6", SCALE)[0]
    assert [m.name for m in t6.methods] == ["scratch", "cutmix", "kd-label", "kd-feature", "kd-feature+cutmix"]
    t7 = study.plan_cells(load_spec("table7", SCALE)[0], tmp_path)
    assert [c.snapshots for c in t7 if c.seed == 0] == [(4, 6)] * 3  # the lr stages end at epochs 4, 6 and 8
    assert load_spec("pruning-l1", SCALE)[0].pruning[0]["remaining"] == "0.4,0.7,0.9"
    assert AUTO_CIFAR10 in load_spec("table6", SCALE)[1]  # the built-in spec names no machine's path


@pytest.mark.skipif(not shared_cifar_available(), reason="needs ../shared/data/cifar10-jpeg.tar.gz")
def test_one_cifar10_cpu_cell_trains_a_few_steps(tmp_path, monkeypatch):
    from kdprobe.errors import Interrupted
    from trainers.loop import partial_path, train

    monkeypatch.delenv("KDPROBE_CIFAR10", raising=False)
    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # the repository: ../shared/data holds the archive
    assert find_cifar10() == (f"imagefolder:{SHARED_CIFAR.resolve()}", None)  # ../shared/data, found by itself
    cell = study.plan_cells(load_spec("table6", SCALE)[0], tmp_path)[0]
    assert cell.method == "scratch" and cell.config.dataset == f"imagefolder:{SHARED_CIFAR.resolve()}"
    out = tmp_path / "cell.pt"
    with pytest.raises(Interrupted):
        train(cell.config, out, device="cpu", stop_after_steps=3)  # three real steps of batch 64, then "Ctrl-C"
    state = read_payload(partial_path(out))
    assert (state["epoch"], state["step"]) == (0, 3) and len(state["perm"]) == 8000
    data = load_dataset(cell.config.dataset).subset(n_train=8000, balanced=True, seed=0)
    assert data.train_y.bincount(minlength=10).tolist() == [800] * 10
