"""Inputs that fit the model (kdprobe.data.preprocess): image size rules, the evaluation resize and
the training RandomResizedCrop against torchvision's own functions, and the input hook."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

from kdprobe.checkpoints.format import load_checkpoint, save_checkpoint
from kdprobe.data.datasets import TensorData, normalize
from kdprobe.errors import KdprobeError
from kdprobe.checkpoints.inputs import check_model_data
from kdprobe.models import create_model
from kdprobe.data.preprocess import (_crop_boxes, eval_resize, fit_input, image_size_for, input_size_of, parse_image_size,
                                random_resized_crop_flip, remove_input_adapter, resized_crop)


def _data(side=8, n=6, c=3, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, c, side, side), generator=g, dtype=torch.uint8)
    y = torch.arange(n) % classes
    return TensorData("toy", x, y, x.clone(), y.clone(), tuple(map(str, range(classes))),
                      (0.5,) * c, (0.25,) * c)


def test_parse_image_size():
    assert parse_image_size(None) is None and parse_image_size("native") == 0 and parse_image_size("224") == 224
    for bad in ("0", "-3", "abc", "2.5"):
        with pytest.raises(KdprobeError, match="--image-size"):
            parse_image_size(bad)


def test_image_size_rules():
    with torch.device("meta"):
        tv = create_model("torchvision:resnet18", num_classes=3)
        inc = create_model("torchvision:inception_v3", num_classes=3, aux_logits=False)
        vit = create_model("torchvision:vit_b_32", num_classes=3, image_size=64)
        own = create_model("resnet8b", num_classes=3)
    assert image_size_for(tv, {}) == (224, "the family default")  # a foreign file / a new model
    assert image_size_for(inc, {})[0] == 299 and image_size_for(vit, {})[0] == 64
    assert image_size_for(own, {})[0] is None  # CIFAR families: the data's own size
    assert image_size_for(tv, {}, 32) == (32, "--image-size") and image_size_for(tv, {}, 0)[0] is None
    assert image_size_for(own, {"image_size": 64})[0] == 64  # what a checkpoint records wins
    assert image_size_for(tv, {"image_size": None})[0] is None
    assert image_size_for(tv, {"input_shape": [3, 32, 32]})[0] is None  # an older kdprobe checkpoint: native


def test_eval_resize_is_torchvisions_resize_then_center_crop():
    g = torch.Generator().manual_seed(1)
    for shape in ((2, 3, 32, 32), (1, 3, 20, 40), (1, 3, 300, 260)):
        x = torch.rand(shape, generator=g)
        want = TF.center_crop(TF.resize(x, [256], antialias=True), [224])  # torchvision's ImageNet eval recipe
        torch.testing.assert_close(eval_resize(x, 224), want)
    x = torch.rand(2, 3, 224, 224, generator=g)
    assert eval_resize(x, 224) is x  # already the model's size: not zoomed


def test_resized_crop_equals_interpolating_each_crop():
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, 256, (3, 3, 32, 32), generator=g, dtype=torch.uint8)
    boxes = torch.tensor([[0, 0, 32, 32], [5, 3, 10, 20], [20, 1, 12, 31]], dtype=torch.float64)  # top left h w
    out, exact = resized_crop(x, boxes, 24), resized_crop(x.float(), boxes, 24)
    assert out.dtype == torch.uint8 and out.shape == (3, 3, 24, 24) and exact.dtype == torch.float32
    for i, (t, l, h, w) in enumerate(boxes.long().tolist()):
        crop = x[i:i + 1, :, t:t + h, l:l + w].float()
        want = F.interpolate(crop, size=(24, 24), mode="bilinear", align_corners=False)
        torch.testing.assert_close(exact[i], want[0], rtol=0, atol=1e-3)  # the same samples, float rounding aside
        # uint8: rounded; values landing on .5 may round either way
        assert (out[i].float() - want[0].round()).abs().max() <= 1


def test_random_resized_crop_follows_torchvisions_rule_and_the_seed():
    n, h, w = 4000, 32, 32
    boxes = _crop_boxes(n, h, w, torch.Generator().manual_seed(3), "cpu")
    top, left, bh, bw = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (top + bh <= h).all() and (left + bw <= w).all()
    area, ratio = bh * bw / (h * w), bw / bh
    # rounding to whole pixels widens the ranges a little (torchvision's get_params rounds the same way)
    assert area.min() > 0.08 * 0.6 and area.max() <= 1.0 and ratio.min() > 0.75 * 0.8 and ratio.max() < 4 / 3 * 1.25
    assert 0.4 < area.mean() < 0.7  # uniform area in [0.08, 1] (truncated by fit): mean near 0.54
    x = torch.randint(0, 256, (8, 3, h, w), generator=torch.Generator().manual_seed(4), dtype=torch.uint8)
    a = random_resized_crop_flip(x, 64, torch.Generator().manual_seed(5))
    b = random_resized_crop_flip(x, 64, torch.Generator().manual_seed(5))
    assert a.shape == (8, 3, 64, 64) and a.dtype == torch.uint8 and torch.equal(a, b)
    assert not torch.equal(a, random_resized_crop_flip(x, 64, torch.Generator().manual_seed(6)))


def test_input_hook_resizes_renormalizes_and_comes_off():
    torch.manual_seed(0)
    model = create_model("resnet8b", num_classes=3, width=0.25).eval()
    data = _data(side=8)
    x = normalize(data.test_x, data.mean, data.std)
    with torch.no_grad():
        plain = model(eval_resize(x, 16))
        fit = fit_input(model, {}, data, 16)
        assert fit.shape == (3, 16, 16) and input_size_of(model) == 16 and not fit.renormalized
        torch.testing.assert_close(model(x), plain)  # the hook did the resize
        sixteen = torch.randn(2, 3, 16, 16)
        remove_input_adapter(model)
        ref = model(sixteen)
        fit_input(model, {}, data, 16)
        torch.testing.assert_close(model(sixteen), ref)  # S x S batches pass unchanged
        # a checkpoint trained with other statistics gets its own normalization back, by hand:
        meta = {"image_size": None, "normalization": {"mean": [0.4] * 3, "std": [0.2] * 3}}
        fit = fit_input(model, meta, data)
        assert fit.renormalized and fit.size is None
        remove_input_adapter(model)
        want = model((data.test_x.float() / 255 - 0.4) / 0.2)
        fit_input(model, meta, data)
        torch.testing.assert_close(model(x), want)
    remove_input_adapter(model)
    assert input_size_of(model) is None and not model._forward_pre_hooks
    assert "input_adapter" not in dict(model.named_modules()) and "input_adapter" not in str(model.state_dict().keys())


def test_torchvision_checkpoint_is_served_at_224_and_a_recorded_size_is_enforced(tmp_path):
    torch.manual_seed(0)
    tv = create_model("torchvision:squeezenet1_1", num_classes=3)
    torch.save(tv.state_dict(), tmp_path / "sq.pth")  # a foreign file: no record, family default
    ck = load_checkpoint(tmp_path / "sq.pth", arch="torchvision:squeezenet1_1")
    seen = []
    ck.model.features[0].register_forward_pre_hook(lambda m, a: seen.append(tuple(a[0].shape)))
    assert check_model_data(ck, _data(side=8), explicit=True) is None
    assert seen[-1] == (1, 3, 224, 224)
    meta = {"method": "scratch", "dataset": "toy", "input_shape": [3, 224, 224], "image_size": 224}
    ck2 = load_checkpoint(save_checkpoint(tmp_path / "k.pt", tv, meta))
    check_model_data(ck2, _data(side=8), explicit=True)  # its record: 224
    with pytest.raises(KdprobeError, match=r"takes 3-channel 224x224 inputs .*served at 3-channel 32x32 .*"
                                           r"--image-size\); pass --image-size 224"):
        check_model_data(ck2, _data(side=8), explicit=True, image_size=32)


def test_a_fixed_head_model_names_the_size_it_needs(tmp_path):
    torch.manual_seed(0)
    m = create_model("repdistiller:resnet8x4", num_classes=3)
    torch.save({"model": m.state_dict()}, tmp_path / "r.pth")
    ck = load_checkpoint(tmp_path / "r.pth")
    with pytest.raises(KdprobeError, match=r"as 3-channel 8x8 inputs.*expects 32x32.*--image-size") as e:
        check_model_data(ck, _data(side=8), explicit=True)
    assert "\n" not in str(e.value)
    assert check_model_data(ck, _data(side=8), explicit=True, image_size=32) is None  # resized: it runs
    with torch.no_grad():
        assert math.isfinite(float(ck.model(normalize(_data(side=8).test_x, (0.5,) * 3, (0.25,) * 3)).sum()))
