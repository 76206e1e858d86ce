"""The training loop: accuracy on digits, determinism, resume == uninterrupted, NaN handling."""
import json

import pytest
import torch

from kdprobe.checkpoints.format import load_checkpoint, read_payload
from kdprobe.errors import KdprobeError
from trainers.config import TrainConfig, make_config
from trainers.loop import log_path, partial_path, train

TINY = dict(model="resnet8b", model_kwargs={"width": 0.25}, dataset="digits", train_subset=256, epochs=2, batch_size=64)


def _resume_matches_uninterrupted(cfg, tmp_path, stop_at):
    """Train cfg uninterrupted and, separately, killed after `stop_at` steps then resumed; returns the resumed run."""
    ref = train(cfg, tmp_path / "ref.pt").path
    out = tmp_path / "run.pt"
    with pytest.raises(KeyboardInterrupt):
        train(cfg, out, stop_after_steps=stop_at)
    assert partial_path(out).exists() and not out.exists()
    res = train(cfg, out)
    # every tensor bit for bit and all metadata equal (the zip's bytes differ only by the
    # random serialization id torch.save writes into every file)
    assert _payload_equal(ref, out)
    return res


def _payload_equal(a, b):
    pa, pb = read_payload(a), read_payload(b)
    sa, sb = pa["state_dict"], pb["state_dict"]
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa) and pa["meta"] == pb["meta"]


def test_digits_scratch_reaches_90_percent(tmp_path):
    cfg = make_config("fast", model="resnet8b", model_kwargs={"width": 0.5}, epochs=6)
    res = train(cfg, tmp_path / "d.pt")
    assert 0.90 <= res.test_acc <= 1.0  # a fraction (docs/units.md)
    ck = load_checkpoint(tmp_path / "d.pt")
    assert ck.meta["test_acc"] == res.test_acc and ck.meta["reported"] == "last-epoch"
    assert ck.meta["best_acc"] >= ck.meta["test_acc"] and ck.meta["method"] == "scratch"
    assert TrainConfig.from_dict(ck.meta["config"]) == cfg
    lines = log_path(tmp_path / "d.pt").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == list(range(1, 7))
    assert not partial_path(tmp_path / "d.pt").exists()


def test_same_seed_same_checkpoint_and_different_seed_differs(tmp_path):
    a = train(TrainConfig(**TINY), tmp_path / "a.pt").path
    b = train(TrainConfig(**TINY), tmp_path / "b.pt").path
    c = train(TrainConfig(**TINY, seed=1), tmp_path / "c.pt").path
    assert _payload_equal(a, b)
    assert not _payload_equal(a, c)


@pytest.mark.parametrize("stop_at", [5, 4 + 4])  # mid-epoch, and exactly at an epoch boundary (4 steps/epoch)
def test_resume_after_interruption_equals_uninterrupted(tmp_path, stop_at):
    res = _resume_matches_uninterrupted(TrainConfig(**TINY, augment="cutmix"), tmp_path, stop_at)
    assert res.resumed_from_epoch == pytest.approx(stop_at / 4)


def test_partial_state_of_another_config_is_not_mixed_in(tmp_path):
    out = tmp_path / "run.pt"
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(**TINY), out, stop_after_steps=2)
    with pytest.raises(KdprobeError, match="different configuration"):
        train(TrainConfig(**TINY, lr=0.1), out)


def test_partial_state_of_an_older_checkpoint_format_is_not_resumed(tmp_path, monkeypatch):
    """Format 2 changed what `resnetXXa` computes: a run killed before must not resume as the new network."""
    import trainers.loop as loop

    out = tmp_path / "run.pt"
    monkeypatch.setattr(loop, "FORMAT_VERSION", 1)
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(**TINY), out, stop_after_steps=2)
    monkeypatch.undo()
    with pytest.raises(KdprobeError, match="different configuration"):
        train(TrainConfig(**TINY), out)


def test_nan_loss_stops_with_clear_error_and_keeps_last_good_state(tmp_path):
    out = tmp_path / "nan.pt"
    with pytest.raises(KdprobeError, match=r"(loss|weights) became .*last good state"):
        train(TrainConfig(**dict(TINY, epochs=3), lr=1e12, schedule="constant"), out, save_interval_s=0)
    assert not out.exists()
    if partial_path(out).exists():  # whatever was saved is finite
        sd = read_payload(partial_path(out))["student"]
        assert all(torch.isfinite(v.float()).all() for v in sd.values())


def test_config_validation_messages():
    with pytest.raises(KdprobeError, match="--augment"):
        TrainConfig(augment="mixup")
    with pytest.raises(KdprobeError, match="--teacher"):
        TrainConfig(distill="label")
    with pytest.raises(KdprobeError, match="unknown preset"):
        make_config("imagenet")
    cfg = make_config("rnp")
    assert cfg.milestone_epochs() == [80, 120] and cfg.lr == 0.1 and cfg.weight_decay == 1e-4


def test_method_labels_are_derived_from_options():
    assert TrainConfig().method == "scratch"
    assert TrainConfig(augment="cutmix").method == "cutmix"
    assert TrainConfig(distill="label", teacher="t.pt").method == "kd-label"
    assert TrainConfig(distill="feature", teacher="t.pt", augment="cutmix").method == "kd-feature+cutmix"
    assert TrainConfig(distill="label", teacher="t.pt", augment="autoaugment").method == "kd-label+autoaugment"


def test_snapshot_epochs_write_intermediate_checkpoints(tmp_path):
    from trainers.loop import snapshot_path
    cfg = TrainConfig(**dict(TINY, epochs=3))
    out = tmp_path / "s.pt"
    train(cfg, out, snapshot_epochs=(1, 2))
    for e in (1, 2):
        ck = load_checkpoint(snapshot_path(out, e))
        assert ck.meta["epoch"] == e and len(ck.meta["history"]) == e
    # the epoch-1 snapshot holds the epoch-1 weights: its accuracy is the one logged then
    ck1 = load_checkpoint(snapshot_path(out, 1))
    from kdprobe.data.datasets import load_dataset
    from kdprobe.probes.evaluate import evaluate
    d = load_dataset("digits")
    assert evaluate(ck1.model, d.test_x, d.test_y, d.mean, d.std).acc == pytest.approx(ck1.meta["history"][0]["test_acc"])


def _teacher(tmp_path):
    t = tmp_path / "teacher.pt"
    train(TrainConfig(**TINY), t)
    return t


@pytest.mark.parametrize("distill", ["label", "feature"])
def test_kd_resume_reproduces_uninterrupted_and_teacher_is_untouched(tmp_path, distill):
    t = _teacher(tmp_path)
    before = {k: v.clone() for k, v in load_checkpoint(t).model.state_dict().items()}
    teacher_bytes = t.read_bytes()
    _resume_matches_uninterrupted(TrainConfig(**TINY, distill=distill, teacher=str(t), augment="cutmix"), tmp_path, 3)
    assert t.read_bytes() == teacher_bytes  # the teacher file is never rewritten
    after = load_checkpoint(t).model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BN buffers


def test_teacher_module_is_not_modified_by_a_student_epoch(tmp_path, monkeypatch):
    """The in-memory teacher (weights and BN running stats) is the same after training."""
    import trainers.loop as loop
    t = _teacher(tmp_path)
    seen = {}
    real = loop._teacher_info

    def spy(*args):
        model, info = real(*args)
        seen["model"], seen["before"] = model, {k: v.clone() for k, v in model.state_dict().items()}
        return model, info
    monkeypatch.setattr(loop, "_teacher_info", spy)
    train(TrainConfig(**TINY, distill="label", teacher=str(t)), tmp_path / "s.pt")
    after = seen["model"].state_dict()
    assert all(torch.equal(seen["before"][k], after[k]) for k in after)
    assert not seen["model"].training


def test_weight_masks_survive_finetuning_and_resume(tmp_path):
    from kdprobe.pruning import prune_checkpoint
    src = _teacher(tmp_path)
    pruned = tmp_path / "w.pt"
    prune_checkpoint(src, "weight", "0.4", pruned)
    masks = load_checkpoint(pruned).extra["masks"]
    cfg = TrainConfig(**dict(TINY, epochs=2), init=str(pruned), lr=0.01, schedule="constant")
    ck = load_checkpoint(_resume_matches_uninterrupted(cfg, tmp_path, 3).path)
    sd = ck.model.state_dict()
    for name, m in masks.items():
        assert torch.equal(ck.extra["masks"][name], m)
        assert (sd[name][~m.bool()] == 0).all()          # pruned weights stayed exactly zero
    kept = sum(int(m.sum()) for m in masks.values())
    assert kept / sum(m.numel() for m in masks.values()) == pytest.approx(0.4, abs=0.01)
    assert ck.meta["init"]["pruning"]["method"] == "weight"


def test_partial_kd_run_resumes_after_the_folder_moves_but_not_with_another_teacher(tmp_path):
    import shutil
    a = tmp_path / "a"
    a.mkdir()
    t = a / "teacher.pt"
    train(TrainConfig(**TINY), t)
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(**TINY, distill="label", teacher=str(t)), a / "s.pt", stop_after_steps=3)
    b = tmp_path / "b"
    shutil.move(a, b)
    res = train(TrainConfig(**TINY, distill="label", teacher=str(b / "teacher.pt")), b / "s.pt")
    assert res.resumed_from_epoch == pytest.approx(3 / 4)
    # a different teacher file under the same name is a different run
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(**TINY, distill="label", teacher=str(b / "teacher.pt")), b / "s2.pt", stop_after_steps=2)
    train(TrainConfig(**TINY, seed=5), b / "teacher.pt.new")
    shutil.move(b / "teacher.pt.new", b / "teacher.pt")
    with pytest.raises(KdprobeError, match="different configuration"):
        train(TrainConfig(**TINY, distill="label", teacher=str(b / "teacher.pt")), b / "s2.pt")
