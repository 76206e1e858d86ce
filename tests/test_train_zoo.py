"""Training any architecture: feature KD through forward hooks between different architectures (channels
and spatial size adapted), label KD across families, torchvision models at 224 px, foreign teachers and
--init files. Tiny 32x32 image folders, a few steps on CPU."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import StepLog
from kdprobe.checkpoints.format import load_checkpoint
from kdprobe.data.datasets import load_dataset
from kdprobe.errors import KdprobeError
from kdprobe.probes.evaluate import evaluate
from kdprobe.models import create_model
from kdprobe.data.preprocess import fit_input
from kdprobe.probes.features import FeatureTap, feature_layer, traced_feature_layer
from trainers.config import TrainConfig
from trainers.loop import train
from trainers.recipes import Recipe

K = 3


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("zoo-train") / "folder"
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 6), ("test", 2)):
        for c in range(K):
            d = root / split / f"c{c}"
            d.mkdir(parents=True)
            for i in range(n):
                img = torch.randint(0, 256, (32, 32, 3), generator=g, dtype=torch.uint8).numpy()
                Image.fromarray(img).save(d / f"{i}.png")
    return f"imagefolder:{root}"


def _foreign(tmp_path, name, seed=0, **kw):
    """A checkpoint as the other codebase saves it ({'model': state_dict}), random weights."""
    torch.manual_seed(seed)
    m = create_model(name, num_classes=K, **kw)
    path = tmp_path / f"{name.replace(':', '_')}.pth"
    torch.save({"model": m.state_dict(), "epoch": 1}, path)
    return path, m


def test_the_traced_rule_finds_the_last_map_before_the_classifier():
    torch.manual_seed(0)
    with torch.no_grad():
        tv = create_model("torchvision:resnet18", num_classes=K).eval()
        assert traced_feature_layer(tv, torch.zeros(1, 3, 32, 32)) == "layer4" == tv.feature_layer

        class Functional(nn.Module):  # functional pooling and a functional ReLU after the last module
            def __init__(self):
                super().__init__()
                self.stem, self.block = nn.Conv2d(3, 4, 3, padding=1), nn.Sequential(nn.Conv2d(4, 6, 3), nn.ReLU())
                self.fc = nn.Linear(6, K)

            def forward(self, x):
                return self.fc(F.adaptive_avg_pool2d(F.relu(self.block(self.stem(x))), 1).flatten(1))

        m = Functional()
        assert traced_feature_layer(m, torch.zeros(1, 3, 8, 8)) == "block"  # outermost module ending with the map
        assert feature_layer(m, torch.zeros(1, 3, 8, 8), "fc:in") == "fc:in"
        with pytest.raises(KdprobeError, match="expected a module name"):
            feature_layer(m, torch.zeros(1, 3, 8, 8), "nope")
        flat = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, K))
        with pytest.raises(KdprobeError, match="pass --feature-layer"):
            traced_feature_layer(flat, torch.zeros(1, 3, 8, 8))


def test_feature_kd_across_architectures_pools_the_larger_map(folder, tmp_path):
    """resnet32x4-style teacher (8x8 map) -> ShuffleV1 student (4x4 map): the loss of one step by hand."""
    t_path, teacher = _foreign(tmp_path, "repdistiller:resnet8x4")
    data = load_dataset(folder)
    torch.manual_seed(1)
    student = create_model("repdistiller:shufflev1", num_classes=K)
    fit_input(student, {}, data)
    teacher.eval()
    cfg = TrainConfig(model="repdistiller:shufflev1", dataset=folder, distill="feature", teacher=str(t_path))
    recipe = Recipe(cfg, student, teacher, data)
    assert recipe.beta == 500.0  # the teacher's family (a ResNet): the paper's value
    assert recipe.feature["student_map"] == [960, 4, 4] and recipe.feature["teacher_map"] == [256, 8, 8]
    assert recipe.feature["compared_at"] == [4, 4] and recipe.regressor.conv.weight.shape == (256, 960, 1, 1)
    x = data.train_x[:4]
    mb = recipe.batch(x, data.train_y[:4], torch.Generator().manual_seed(0))
    student.train()
    out = recipe.loss(recipe.student(student), mb)
    with torch.no_grad():  # by hand: forward_features, 2x2 block means, the regressor, per-sample L2, mean |diff|
        s_map = student.forward_features(mb.x)
        t_map = teacher.forward_features(mb.x).reshape(4, 256, 4, 2, 4, 2).mean(dim=(3, 5))
        r = F.conv2d(s_map, recipe.regressor.conv.weight).flatten(1)
        want = (F.normalize(t_map.flatten(1), dim=1) - F.normalize(r, dim=1)).abs().mean()
    assert out["feat_raw"].item() == pytest.approx(want.item(), rel=1e-4)
    assert out["feat"].item() == pytest.approx(500.0 * want.item(), rel=1e-4)
    recipe.close()
    assert not any(m._forward_hooks for m in student.modules())  # the taps are gone


@pytest.mark.parametrize("distill", ["label", "feature"])
def test_kd_between_families_trains_and_records_the_recipe(folder, tmp_path, distill):
    t_path, _ = _foreign(tmp_path, "repdistiller:wrn_16_1")  # a foreign teacher, detected
    cfg = TrainConfig(model="repdistiller:shufflev2", dataset=folder, distill=distill, teacher=str(t_path),
                      epochs=1, batch_size=9, lr=0.01)
    res = train(cfg, tmp_path / "s.pt")
    ck = load_checkpoint(res.path)
    assert ck.meta["teacher"]["arch"]["name"] == "repdistiller:wrn_16_1"
    assert ck.meta["image_size"] is None and ck.meta["input_shape"] == [3, 32, 32]
    assert len(ck.meta["normalization"]["mean"]) == 3
    if distill == "feature":
        fk = ck.meta["feature_kd"]
        assert fk["student_layer"] == "relu" and fk["teacher_layer"] == "relu" and fk["compared_at"] == [4, 4]
        assert fk["teacher_map"] == [64, 8, 8] and "adaptive average pooling" in fk["adapt"]
        assert "regressor" in ck.extra
    else:
        assert "feature_kd" not in ck.meta


@pytest.mark.parametrize("teacher, student", [("resnet32x4", "resnet8x4"), ("wrn_40_2", "wrn_16_2"), ("vgg13", "vgg8"),
                                              ("ResNet50", "MobileNetV2"), ("resnet32x4", "ShuffleV1"),
                                              ("resnet32x4", "ShuffleV2")])
def test_the_standard_kd_pairs_take_a_feature_kd_step(folder, tmp_path, teacher, student):
    t_path, _ = _foreign(tmp_path, f"repdistiller:{teacher}")
    cfg = TrainConfig(model=f"repdistiller:{student}", dataset=folder, distill="feature", teacher=str(t_path),
                      epochs=1, batch_size=9)
    steps = StepLog()
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "s.pt", progress=steps, stop_after_steps=1)
    (terms,) = steps.terms
    assert terms["feat"] > 0 and terms["ce"] > 0 and terms["loss"] == pytest.approx(terms["ce"] + terms["feat"], rel=1e-3)


def test_feature_layer_options_and_their_refusals(folder, tmp_path):
    t_path, _ = _foreign(tmp_path, "repdistiller:resnet8x4")
    with pytest.raises(KdprobeError, match="--feature-layer layer2 is used only by feature KD"):
        TrainConfig(model="resnet8b", dataset=folder, distill="label", teacher=str(t_path), feature_layer="layer2")
    with pytest.raises(KdprobeError, match="--teacher-arch-kwargs describes .* no --teacher"):
        TrainConfig(model="resnet8b", teacher_arch_kwargs={"cfg": [1]})
    cfg = TrainConfig(model="resnet8b", model_kwargs={"width": 0.25}, dataset=folder, distill="feature",
                      teacher=str(t_path), feature_layer="layer2", teacher_feature_layer="layer2:in", epochs=1,
                      batch_size=9)
    ck = load_checkpoint(train(cfg, tmp_path / "s.pt").path)
    fk = ck.meta["feature_kd"]  # layer2 of the student: 8 channels at 16x16; the teacher's layer1 output: 64 at 32x32
    assert fk["student_map"] == [8, 16, 16] and fk["teacher_map"] == [64, 32, 32] and fk["compared_at"] == [16, 16]
    vit = TrainConfig(model="resnet8b", dataset=folder, distill="feature", teacher=str(t_path),
                      teacher_feature_layer="fc", epochs=1)
    with pytest.raises(KdprobeError, match=r"teacher's layer fc gives \(2, 3\)"):
        train(vit, tmp_path / "v.pt")


def test_torchvision_model_trains_at_224_and_evaluates_the_same_way(folder, tmp_path):
    cfg = TrainConfig(model="torchvision:squeezenet1_1", dataset=folder, epochs=1, batch_size=9, lr=0.01)
    res = train(cfg, tmp_path / "tv.pt")
    ck = load_checkpoint(res.path)
    assert ck.meta["image_size"] == 224 and ck.meta["input_shape"] == [3, 224, 224]
    assert "RandomResizedCrop" in ck.meta["input_rule"]["train"]
    data = load_dataset(folder)
    seen = []
    ck.model.features[0].register_forward_pre_hook(lambda m, a: seen.append(tuple(a[0].shape[1:])))
    from kdprobe.checkpoints.inputs import check_model_data

    check_model_data(ck, data, explicit=False)
    ev = evaluate(ck.model, data.test_x, data.test_y, data.mean, data.std)
    assert seen[-1] == (3, 224, 224) and ev.acc == pytest.approx(ck.meta["test_acc"])
    # the training batches are 224 px RandomResizedCrops of the 32 px images
    model = create_model("torchvision:squeezenet1_1", num_classes=K)
    fit_input(model, {}, data)
    mb = Recipe(cfg, model, None, data).batch(data.train_x[:5], data.train_y[:5], torch.Generator().manual_seed(0))
    assert mb.x.shape == (5, 3, 224, 224)
    native = TrainConfig(model="torchvision:squeezenet1_1", dataset=folder, image_size=0)
    model = create_model("torchvision:squeezenet1_1", num_classes=K)
    fit_input(model, {}, data, native.image_size)
    assert Recipe(native, model, None, data).batch(data.train_x[:5], data.train_y[:5],
                                                    torch.Generator().manual_seed(0)).x.shape == (5, 3, 32, 32)


def test_a_foreign_teacher_at_224_teaches_a_cifar_student(folder, tmp_path):
    torch.manual_seed(0)
    tv = create_model("torchvision:squeezenet1_1", num_classes=K)
    torch.save(tv.state_dict(), tmp_path / "tv.pth")
    cfg = TrainConfig(model="resnet8b", model_kwargs={"width": 0.25}, dataset=folder, distill="label",
                      teacher=str(tmp_path / "tv.pth"), epochs=1, batch_size=9)
    ck = load_checkpoint(train(cfg, tmp_path / "s.pt").path)
    assert ck.meta["teacher"]["arch"]["name"] == "torchvision:squeezenet1_1" and ck.meta["input_shape"] == [3, 32, 32]


def test_a_student_at_224_gets_a_native_teacher_its_own_size(folder, tmp_path, monkeypatch):
    import trainers.loop as loop

    t_path, _ = _foreign(tmp_path, "repdistiller:resnet8x4")  # fixed 8x8 pool head: must see 32x32 images
    seen = []
    real = loop._teacher_info

    def spy(*args):
        model, info = real(*args)
        model.conv1.register_forward_pre_hook(lambda m, a: seen.append(tuple(a[0].shape[-2:])))
        return model, info
    monkeypatch.setattr(loop, "_teacher_info", spy)
    cfg = TrainConfig(model="torchvision:squeezenet1_1", dataset=folder, distill="label", teacher=str(t_path),
                      epochs=1, batch_size=9)
    ck = load_checkpoint(train(cfg, tmp_path / "s.pt").path)
    assert ck.meta["input_shape"] == [3, 224, 224] and set(seen) == {(32, 32)}


def test_finetune_from_a_foreign_file(folder, tmp_path):
    path, ref = _foreign(tmp_path, "repdistiller:vgg8")
    cfg = TrainConfig(model="repdistiller:vgg8", dataset=folder, init=str(path), epochs=1, batch_size=9, lr=1e-9,
                      weight_decay=0.0, augment="none")
    ck = load_checkpoint(train(cfg, tmp_path / "ft.pt").path)
    assert ck.meta["init"]["sha256"] and ck.model.arch["name"] == "repdistiller:vgg8"
    moved = max(float((ck.model.state_dict()[k] - v).abs().max()) for k, v in ref.state_dict().items()
                if v.is_floating_point() and "running" not in k)
    assert moved < 1e-5  # it started from the file's weights (lr 1e-9: barely moved)
    with pytest.raises(KdprobeError, match="does not fit architecture repdistiller:vgg13: missing key"):
        train(TrainConfig(model="repdistiller:vgg13", dataset=folder, init=str(path), init_arch="repdistiller:vgg13",
                          epochs=1), tmp_path / "x.pt")


def test_feature_tap_keeps_the_gradient():
    torch.manual_seed(0)
    m = create_model("resnet8b", num_classes=K, width=0.25)
    tap = FeatureTap(m, "layer3")
    x = torch.randn(2, 3, 8, 8)
    m(x)
    f = tap.take()
    assert f.requires_grad and f.shape == (2, 16, 2, 2)
    with pytest.raises(KdprobeError, match="layer layer3"):
        tap.take()  # taken once per forward
    tap.close()
