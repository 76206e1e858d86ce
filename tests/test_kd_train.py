"""The KD families, ensemble teachers and born-again generations in training (issue #22, phase 2).

Every method trains on digits from the CLI and the API; the loss the loop logs at its first step is recomputed
here from scratch (own hooks on hand-named layers, the batch drawn again from the run's seed, the phase-1 loss
terms that tests/test_kd_families.py checks against the reference codebases), so a wrong layer, a missing CE,
DKD's warm-up epoch or CutMix's mixing in the wiring shows as a different number."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

import kdprobe
from cli.main import app
from kdprobe.checkpoints.format import load_checkpoint, read_payload
from kdprobe.data.datasets import load_dataset, normalize
from kdprobe.errors import KdprobeError
from kdprobe.files.io import sha256_file
from kdprobe.models import create_model
from tests.conftest import StepLog
from trainers import kd_families as kf
from trainers.augment import auto_augment, cutmix, random_crop_flip
from trainers.config import KD_FAMILIES, make_config
from trainers.loop import partial_path, train
from trainers.losses import ensemble_logits

MODEL = dict(model="resnet8b", width=0.25)
RUN = dict(**MODEL, train_subset=192, batch_size=32, epochs=1, device="cpu")
# hand-named layers of a CIFAR ResNet (stem conv1/bn1, layer1..3, fc), RepDistiller's feat[] indices
LAYERS = {"at": ["layer1", "layer2", "layer3"], "fitnet": ["layer2"], "sp": ["layer3"], "rkd": ["fc:in"],
          "pkt": ["fc:in"], "crd": ["fc:in"], "dkd": [], "label": []}
# each method with an augmentation, so every family also runs under CutMix or AutoAugment
AUGMENT = {"label": "standard", "at": "cutmix", "fitnet": "autoaugment", "sp": "cutmix", "rkd": "standard",
           "pkt": "autoaugment", "crd": "cutmix", "dkd": "cutmix"}


def _argv(opts: dict) -> list[str]:
    out = []
    for k, v in opts.items():
        for one in (v if isinstance(v, list) else [v]):
            out += [f"--{k.replace('_', '-')}", str(one)]
    return out


def _state(path):
    return load_checkpoint(path).model.state_dict()


def _equal(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kd_teachers")
    for seed in (0, 1):
        kdprobe.train(out=tmp / f"t{seed}.pt", **{**RUN, "epochs": 2}, seed=seed, quiet=True)
    return tmp / "t0.pt", tmp / "t1.pt"


# ------------------------------------------------------------------ the first step's loss, recomputed by hand
def _hooks(model, names):
    got, handles = {}, []
    mods = dict(model.named_modules())
    for n in names:
        name, _, where = n.partition(":")
        if where == "in":
            handles.append(mods[name].register_forward_pre_hook(lambda m, a, n=n: got.__setitem__(n, a[0])))
        else:
            handles.append(mods[name].register_forward_hook(lambda m, a, o, n=n: got.__setitem__(n, o)))
    return got, handles


def first_step_loss(method: str, teacher_paths, seed: int, augment: str, cutmix_prob: float) -> float:
    """The loss of the loop's first step, recomputed: init and heads in the loop's RNG order, the batch from the
    run's generator, the teacher target (an ensemble's averaged probabilities), the method's total."""
    data = load_dataset("digits").subset(n_train=RUN["train_subset"], seed=seed)
    torch.manual_seed(seed)
    student = create_model(MODEL["model"], num_classes=10, in_channels=1, width=MODEL["width"])
    tmodels = [load_checkpoint(p).model.eval() for p in teacher_paths]
    s_got, hs = _hooks(student, LAYERS[method])
    t_got, ht = _hooks(tmodels[0], LAYERS[method])
    probe = torch.zeros(2, 1, 8, 8)
    student.eval()
    with torch.no_grad():
        student(probe)
        tmodels[0](probe)
    s_shape = [list(s_got[n].shape[1:]) for n in LAYERS[method]]
    t_shape = [list(t_got[n].shape[1:]) for n in LAYERS[method]]
    n = len(data.train_y)
    k = n - int(torch.bincount(data.train_y).max())  # CRD's K at this size: every negative once
    head = None
    if method == "fitnet":
        head = kf.HintRegressor(s_shape[0], t_shape[0])
    elif method == "crd":
        head = kf.CRDLoss(s_shape[0][0], t_shape[0][0], n, 128, k, 0.07, 0.5)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(n, generator=gen)[:RUN["batch_size"]]
    x8, y = data.train_x[idx], data.train_y[idx]
    if augment == "autoaugment":
        x8 = auto_augment(x8, gen)
    x8 = random_crop_flip(x8, gen, padding=data.crop_padding, flip=data.hflip)
    x = normalize(x8, data.mean, data.std)
    y_b, lam = y, 1.0
    if augment == "cutmix":
        mb = cutmix(x, y, gen, prob=cutmix_prob, beta=1.0)
        x, y_b, lam = mb.x, mb.y_b, mb.lam
    with torch.no_grad():
        t_logits = [t(x) for t in tmodels]
    contrast = kf.ContrastSampler(data.train_y, k).draw(idx, gen) if method == "crd" else None
    student.train()
    logits = student(x)
    for h in hs + ht:
        h.remove()
    ce = lam * F.cross_entropy(logits, y) + (1 - lam) * F.cross_entropy(logits, y_b)
    fs = [s_got[n] for n in LAYERS[method]]
    ft = [t_got[n] for n in LAYERS[method]]
    if method == "label":  # (1 - a) CE + a T^2 KL(p_teachers || p_student), p_teachers the average at T = 4
        p_t = torch.stack([F.softmax(z / 4.0, dim=1) for z in t_logits]).mean(0)
        kl = (p_t * (p_t.log() - F.log_softmax(logits / 4.0, dim=1))).sum(1).mean() * 16.0
        return float((0.1 * ce + 0.9 * kl).detach())
    if method == "dkd":  # warm-up at epoch 1 of 20; mixed targets as the mixed CE
        zt = ensemble_logits(t_logits, 4.0) if len(t_logits) > 1 else t_logits[0]
        a = kf.dkd_loss(logits, zt, y)["loss"]
        b = kf.dkd_loss(logits, zt, y_b)["loss"]
        return float((ce + (lam * a + (1 - lam) * b) / 20.0).detach())
    term = {"at": lambda: 1000.0 * kf.at_loss(fs, ft),
            "fitnet": lambda: 100.0 * kf.hint_loss(head(fs[0]), ft[0]),
            "sp": lambda: 3000.0 * kf.sp_loss(fs, ft),
            "rkd": lambda: kf.rkd_loss(fs[0], ft[0])["loss"],
            "pkt": lambda: 30000.0 * kf.pkt_loss(fs[0], ft[0]),
            "crd": lambda: 0.8 * head(fs[0], ft[0], idx, contrast)["loss"]}[method]()
    return float((ce + term).detach())


@pytest.mark.parametrize("method", ["label", *KD_FAMILIES])
def test_each_method_trains_and_logs_its_loss(teachers, tmp_path, method):
    log = StepLog()
    res = kdprobe.train(out=tmp_path / f"{method}.pt", **RUN, seed=2, distill=method, teacher=teachers[0],
                        augment=AUGMENT[method], cutmix_prob=1.0, progress=log)
    losses = [t["loss"] for t in log.terms]
    assert len(losses) == 6 and all(math.isfinite(v) for v in losses)
    assert min(losses[-2:]) < losses[0]  # decreasing-ish over six steps
    want = first_step_loss(method, [teachers[0]], 2, AUGMENT[method], 1.0)
    assert losses[0] == pytest.approx(want, abs=6e-5, rel=1e-6)  # the log rounds to 4 decimals
    meta = res.meta
    assert meta["method"].split("+")[0] == f"kd-{method}" and meta["teacher"]["sha256"] == sha256_file(teachers[0])
    assert [t["sha256"] for t in meta["teachers"]] == [sha256_file(teachers[0])]
    if method in KD_FAMILIES:
        kd = meta["kd"]
        assert kd["method"] == method and kd["student_layers"] == kd["teacher_layers"] == LAYERS[method]
        assert kd["settings"] == {**kf.METHODS[method].defaults, **({"k": kd["settings"]["k"]} if method == "crd" else {})}
        if method in ("fitnet", "crd"):  # the trained heads are kept; CRD's bank only in the partial
            assert read_payload(res.path)["extra"]["kd_method"] and not any(
                "memory_" in k for k in read_payload(res.path)["extra"]["kd_method"])


@pytest.mark.parametrize("method, settings", [("crd", '{"k": 40, "feat_dim": 16}'), ("dkd", '{"beta": 6}')])
def test_cli_and_api_give_identical_weights(teachers, tmp_path, method, settings):
    opts = dict(RUN, seed=1, distill=method, teacher=str(teachers[0]), kd_settings=settings)
    r = CliRunner().invoke(app, ["train", "--out", str(tmp_path / "cli.pt"), "--quiet", *_argv(opts)])
    assert r.exit_code == 0, r.output
    assert f"kd-{method} resnet8b seed 1: test accuracy" in r.output
    res = kdprobe.train(out=tmp_path / "api.pt", quiet=True, **{**opts, "kd_settings": {**eval(settings)}})
    assert _equal(_state(tmp_path / "cli.pt"), _state(res.path))
    kd = res.meta["kd"]
    assert kd["given"] == eval(settings) and all(kd["settings"][k] == v for k, v in eval(settings).items())
    info = CliRunner().invoke(app, ["info", str(res.path)]).output
    assert f"KD method   {method}:" in info and "(* = set by --kd-settings)" in info


def test_dkd_settings_change_the_run_and_bad_settings_are_refused(teachers, tmp_path):
    with pytest.raises(KdprobeError, match="dkd has no setting 'gamma'; its settings are"):
        kdprobe.train(out=tmp_path / "x.pt", **RUN, distill="dkd", teacher=teachers[0], kd_settings={"gamma": 1})
    with pytest.raises(KdprobeError, match="expected crd's k as a whole number"):
        kdprobe.train(out=tmp_path / "x.pt", **RUN, distill="crd", teacher=teachers[0], kd_settings={"k": 2.5})
    with pytest.raises(KdprobeError, match="--kd-settings sets a KD family's settings"):
        kdprobe.train(out=tmp_path / "x.pt", **RUN, distill="label", teacher=teachers[0], kd_settings='{"beta": 1}')
    r = CliRunner().invoke(app, ["train", "--out", str(tmp_path / "x.pt"), *_argv(RUN), "--distill", "dkd",
                                 "--teacher", str(teachers[0]), "--kd-settings", "{beta: 1}"])
    assert r.exit_code == 1 and "--kd-settings" in r.output and "JSON" in r.output
    assert not (tmp_path / "x.pt").exists()


def test_crd_resume_is_bit_exact(teachers, tmp_path):
    """Killed mid-epoch (the memory bank half updated), resumed: the same checkpoint as an uninterrupted run."""
    cfg = make_config(None, model="resnet8b", model_kwargs={"width": 0.25}, train_subset=128, batch_size=32,
                      epochs=2, distill="crd", teacher=str(teachers[0]), augment="cutmix", kd_settings={"k": 50})
    ref = train(cfg, tmp_path / "ref.pt").path
    out = tmp_path / "run.pt"
    with pytest.raises(KeyboardInterrupt):
        train(cfg, out, stop_after_steps=5)
    bank = read_payload(partial_path(out))["student"]
    assert bank["method.crd.memory.memory_s"].shape == (128, 128) and float(bank["method.crd.memory.z_s"]) > 0
    res = train(cfg, out)
    assert res.resumed_from_epoch == pytest.approx(5 / 4)
    a, b = read_payload(ref), read_payload(out)
    assert _equal(a["state_dict"], b["state_dict"]) and a["meta"] == b["meta"]
    assert _equal(a["extra"]["kd_method"], b["extra"]["kd_method"])


def test_ensemble_teacher_is_the_average_of_probabilities(teachers, tmp_path):
    # on one batch: softmax(ensemble / T) is the mean of the teachers' softmax at T, computed in float64 here
    data = load_dataset("digits")
    x = normalize(data.test_x[:20], data.mean, data.std)
    with torch.no_grad():
        zs = [load_checkpoint(p).model.eval()(x) for p in teachers]
    for t in (1.0, 4.0):
        by_hand = (F.softmax(zs[0].double() / t, 1) + F.softmax(zs[1].double() / t, 1)) / 2
        got = F.softmax(ensemble_logits(zs, t).double() / t, 1)
        assert torch.allclose(got, by_hand, atol=1e-6, rtol=0)
    assert ensemble_logits([zs[0]], 4.0) is zs[0]  # one teacher: its logits, untouched
    # trained: label KD from two teachers logs the hand-computed loss at its first step and records both hashes
    log = StepLog()
    res = kdprobe.train(out=tmp_path / "ens.pt", **RUN, seed=2, distill="label", teacher=list(teachers), progress=log)
    assert log.terms[0]["loss"] == pytest.approx(first_step_loss("label", teachers, 2, "standard", 0.5), abs=6e-5)
    meta = res.meta
    assert [t["sha256"] for t in meta["teachers"]] == [sha256_file(p) for p in teachers]
    assert meta["teacher"]["sha256"] == sha256_file(teachers[0]) and meta["method"] == "kd-label+ens2"
    assert meta["teacher_ensemble"]["teachers"] == 2
    # DKD from the same two teachers: its TCKD/NCKD split of the averaged probabilities
    log = StepLog()
    kdprobe.train(out=tmp_path / "ens_dkd.pt", **RUN, seed=2, distill="dkd", teacher=list(teachers), progress=log,
                  augment="cutmix", cutmix_prob=1.0)
    assert log.terms[0]["loss"] == pytest.approx(first_step_loss("dkd", teachers, 2, "cutmix", 1.0), abs=6e-5)
    r = CliRunner().invoke(app, ["train", "--out", str(tmp_path / "at.pt"), *_argv(RUN), "--distill", "at",
                                 "--teacher", str(teachers[0]), "--teacher", str(teachers[1])])
    assert r.exit_code == 1 and "only label and dkd use" in r.output and len(r.output.strip().splitlines()) == 1


def test_generations_chain_their_teachers(teachers, tmp_path):
    res = kdprobe.train(out=tmp_path / "ba.pt", **RUN, distill="label", teacher=teachers[0], generations=3,
                        quiet=True)
    files = [tmp_path / f"ba-gen{g}.pt" for g in (1, 2, 3)]
    assert [g.path for g in res.generations] == files and res.path == files[-1] and not (tmp_path / "ba.pt").exists()
    chain = [teachers[0], *files]
    for g, (teacher, student) in enumerate(zip(chain, files), 1):
        meta = read_payload(student)["meta"]
        assert meta["teacher"]["sha256"] == sha256_file(teacher) and meta["generation"]["generation"] == g
    # rerun: every generation kept; a lost last generation is trained again, bit for bit
    again = kdprobe.train(out=tmp_path / "ba.pt", **RUN, distill="label", teacher=teachers[0], generations=3)
    assert [g.action for g in again.generations] == ["existing"] * 3
    before = _state(files[2])
    files[2].unlink()
    again = kdprobe.train(out=tmp_path / "ba.pt", **RUN, distill="label", teacher=teachers[0], generations=3)
    assert [g.action for g in again.generations] == ["existing", "existing", "trained"]
    assert _equal(before, _state(files[2]))


def test_generations_without_a_teacher_start_from_scratch_and_resume(tmp_path):
    opts = dict(RUN, epochs=2, distill="dkd")
    r = CliRunner().invoke(app, ["train", "--out", str(tmp_path / "ba.pt"), "--quiet", "--generations", "2",
                                 *_argv(opts)])
    assert r.exit_code == 0, r.output
    assert [ln.split(":")[0] for ln in r.output.splitlines() if ln.startswith("generation")] == \
        ["generation 0", "generation 1", "generation 2"]
    metas = [read_payload(tmp_path / f"ba-gen{g}.pt")["meta"] for g in (0, 1, 2)]
    assert metas[0]["method"] == "scratch" and metas[0]["teacher"] is None
    for g in (1, 2):
        assert metas[g]["teacher"]["sha256"] == sha256_file(tmp_path / f"ba-gen{g - 1}.pt")
        assert metas[g]["method"] == "kd-dkd"
    # an interrupted generation resumes from its own .partial: the same bits as the uninterrupted chain
    ref = _state(tmp_path / "ba-gen2.pt")
    (tmp_path / "ba-gen2.pt").unlink()
    cfg = make_config(None, model="resnet8b", model_kwargs={"width": 0.25}, train_subset=192, batch_size=32,
                      epochs=2, distill="dkd", teacher=str(tmp_path / "ba-gen1.pt"))
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "ba-gen2.pt", stop_after_steps=3, record={"generation": metas[2]["generation"]})
    res = kdprobe.train(out=tmp_path / "ba.pt", **opts, generations=2)
    assert [g.action for g in res.generations] == ["existing", "existing", "resumed"]
    assert _equal(ref, _state(tmp_path / "ba-gen2.pt"))
    info = CliRunner().invoke(app, ["info", str(tmp_path / "ba-gen2.pt")]).output
    assert "generation  2 of 0..2 (born-again chain; teacher: generation 1)" in info
    with pytest.raises(KdprobeError, match="pass --distill label"):
        kdprobe.train(out=tmp_path / "x.pt", **RUN, generations=2)


def test_pruning_pipeline_runs_the_families(tmp_path):
    """Post-Distill and friends with a KD family: the pruned student has fewer channels than its teacher."""
    from trainers.pipeline import PipelineSpec, run_pruning_pipeline

    spec = PipelineSpec(model="resnet8a", model_kwargs={"width": 0.25}, dataset="digits", train_subset=128,
                        method="l1", remaining="0.5,0.5,0.5", distill=("crd", "fitnet"), seeds=(0,),
                        train_overrides={"epochs": 1}, finetune_overrides={"epochs": 1},
                        kd_settings={"crd": {"k": 30}})
    res = run_pruning_pipeline(spec, tmp_path / "pipe", device="cpu")
    post = read_payload(tmp_path / "pipe" / "seed0" / "post_distill-fitnet.pt")["meta"]
    assert post["kd"]["method"] == "fitnet" and post["pruning"]["method"] == "l1"  # a pruned student, distilled
    assert post["teacher"]["sha256"] == sha256_file(tmp_path / "pipe" / "seed0" / "scratch.pt")
    assert read_payload(tmp_path / "pipe" / "seed0" / "kd-crd.pt")["meta"]["kd"]["settings"]["k"] == 30
    assert {r["train_type"] for r in res.rows} == {"scratch", "crd", "fitnet"}


def test_config_names_every_family_of_the_registry():
    assert KD_FAMILIES == tuple(kf.METHODS)


# ------------------------------------------------------------------ the kd-families study, small
SMALL_STUDY = ["seeds=[0, 1]", "methods.kd-label+ens3.ensemble=2", "methods.ban.generations=2",
               "train.overrides.epochs=1", "train.overrides.train_subset=128", "train.overrides.batch_size=32",
               "agreement.samples=100", "ensembles.samples=100", "calibration.samples=100", "cka.samples=100",
               "diversity.runs=2", "sharpness.samples=32", "sharpness.iterations=3", "sharpness.trace_samples=2",
               'sharpness.methods=["scratch", "kd-dkd", "ban-gen2"]']
KD_ROWS = ["kd-label", "kd-at", "kd-fitnet", "kd-sp", "kd-rkd", "kd-pkt", "kd-crd", "kd-dkd", "kd-label+ens3",
           "ban-gen1", "ban-gen2"]


def test_kd_families_study_small(tmp_path):
    import re

    res = kdprobe.study("kd-families", out=tmp_path / "kdf", set=SMALL_STUDY, device="cpu", quiet=True)
    cells = res.table("cells")
    assert sorted({c["method"] for c in cells}) == sorted(["scratch", *KD_ROWS]) and len(cells) == 24
    path = {(c["method"], c["seed"]): tmp_path / "kdf" / c["path"] for c in cells}
    # the ensemble student of seed 1 is taught by the scratch cells of seeds 1 and 0 (own first, then cyclically)
    meta = read_payload(path[("kd-label+ens3", 1)])["meta"]
    assert [t["sha256"] for t in meta["teachers"]] == [sha256_file(path[("scratch", s)]) for s in (1, 0)]
    for s in (0, 1):  # the chain: gen1 <- scratch, gen2 <- gen1 of the same seed
        assert read_payload(path[("ban-gen1", s)])["meta"]["teacher"]["sha256"] == sha256_file(path[("scratch", s)])
        assert read_payload(path[("ban-gen2", s)])["meta"]["teacher"]["sha256"] == sha256_file(path[("ban-gen1", s)])
        assert read_payload(path[("kd-crd", s)])["meta"]["kd"]["method"] == "crd"
    # the per-method answer: one row per KD method, the tally of that method's verdicts in summary.json
    summary = {"verdicts": res.table("verdicts")}  # summary.json's verdicts
    assert (tmp_path / "kdf" / "summary.json").is_file()
    answers = res.table("answers")
    assert [a["method"] for a in answers] == KD_ROWS
    for a in answers:
        mine = [v for v in summary["verdicts"] if v["method"] == a["method"]]
        sup = [v["probe"] for v in mine if v["verdict"] == "supports"]
        neg = [v["probe"] for v in mine if v["verdict"] == "does not support"]
        want = "yes" if len(sup) == len(mine) else "in part" if sup else "no" if neg else "not shown"
        assert a["answer"] == want and a["supports"] == ", ".join(sup)
    probes_of = {a["method"]: len([v for v in summary["verdicts"] if v["method"] == a["method"]]) for a in answers}
    assert probes_of["kd-dkd"] == 5 and probes_of["kd-at"] == 4  # sharpness only probed three methods
    page = (tmp_path / "kdf" / "report.md").read_text()
    section = page.split("Per method: does it behave like an ensemble in these probes?")[1]
    for m in KD_ROWS:
        assert re.search(rf"^\|\s*{re.escape(m)}\s*\|", section, re.M), m
    assert "id='answers'" in (tmp_path / "kdf" / "report.html").read_text()


def test_method_answers_tally_the_verdicts():
    from kdprobe.studies.ensemble_reading import DOES_NOT, INCONCLUSIVE, SUPPORTS, Verdict, method_answers

    def v(probe, method, verdict):
        return Verdict(probe, method, "scratch", "m", "q", "c", "t", 0.0, 0.0, 0.0, 0.01, 0.01, 0.05, verdict, "")

    vs = [v("agreement", "a", SUPPORTS), v("cka", "a", SUPPORTS), v("agreement", "b", SUPPORTS),
          v("cka", "b", DOES_NOT), v("agreement", "c", DOES_NOT), v("cka", "c", INCONCLUSIVE),
          v("agreement", "d", INCONCLUSIVE), v("cka", "d", INCONCLUSIVE)]
    got = {a.method: (a.answer, a.supports, a.does_not) for a in method_answers(vs)}
    assert got == {"a": ("yes", ("agreement", "cka"), ()), "b": ("in part", ("agreement",), ("cka",)),
                   "c": ("no", (), ("agreement",)), "d": ("not shown", (), ())}
