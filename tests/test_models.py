"""Registry-wide model tests: every registered model builds tiny, runs on 8x8 and 32x32,
splits into features + head, and round-trips through `model.arch`; full-size parameter
counts are checked against hand-written formulas and published numbers."""
from __future__ import annotations

import json

import pytest
import torch

from kdprobe.errors import KdprobeError
from kdprobe.models import canonical_name, create_model, list_models, model_aliases
from kdprobe.probes.features import FeatureTap




# Smallest kwargs that keep each family's structure (depth, shortcut, pools) intact.
TINY = {
    "vgg19_bn": {"width": 1 / 16},
    "densenet40": {"growth": 2, "depth": 10},
    "pyramidnet": {"depth": 8, "alpha": 8},
    "pyramidnet110": {"alpha": 4, "base_channels": 4},
    "pyramidnet200": {"alpha": 4, "base_channels": 4},
    "rnp-slimming:vgg19": {"cfg": [4, "M", 4, "M", 8, "M", 8, "M", 8]},
    "rnp-slimming:preresnet164": {"depth": 11},
    "rnp-slimming:densenet40": {"depth": 10, "growth": 2},
    "rnp-weight:resnet56": {"width": 0.25},
    "rnp-weight:resnet110": {"width": 0.25},
}


# kdprobe's own families; networks named by source (repdistiller:...) keep their reference's
# forward (some need 32x32 input) and are tested against the reference in tests/test_zoo_*.py.
OWN_MODELS = [n for n in list_models() if ":" not in n]


def tiny_kwargs(name: str) -> dict:
    if name.startswith("resnet"):
        return {"width": 0.25}
    assert name in TINY, f"add tiny kwargs for the new model {name!r} to TINY in tests/test_models.py"
    return TINY[name]


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def full_size_params(name: str, num_classes: int, **kw) -> int:
    return n_params(create_model(name, num_classes=num_classes, **kw))


@pytest.mark.parametrize("name", OWN_MODELS)
def test_tiny_model_forward_and_split(name):
    torch.manual_seed(0)
    for c in (1, 3):
        model = create_model(name, num_classes=5, in_channels=c, **tiny_kwargs(name)).eval()
        for size in (8, 32, 7):  # digits, CIFAR, and an odd size through every stride-2 step
            x = torch.randn(2, c, size, size)
            with torch.no_grad():
                out = model(x)
                f = model.forward_features(x)
                split = model.forward_head(f)
            assert out.shape == (2, 5)
            assert torch.isfinite(out).all()
            assert f.ndim == 4 and f.shape[0] == 2 and f.shape[1] == model.feature_channels
            assert torch.equal(out, split)
            tap = FeatureTap(model, model.feature_layer)  # what feature KD hooks is that very map
            with torch.no_grad():
                model(x)
            assert torch.equal(tap.take(), f)
            tap.close()


# Rebuilt (pruned) networks round-trip too: VGG's "M" markers, DenseNet's channel selection.
SLIM_CASES = [
    ("vgg19_bn", {"cfg": [3, "M", 5, 2, "M", 7]}),
    ("densenet40", {"depth": 10, "growth": 2, "selection": [[0, 3]] + [None] * 7 + [[2, 5, 9]]}),
    ("resnet20b", {"width": 0.25, "block_cfg": [1, 2, 3, 4, 5, 6, 7, 8, 9]}),
]


@pytest.mark.parametrize("name, kwargs", [(n, tiny_kwargs(n)) for n in OWN_MODELS] + SLIM_CASES)
def test_arch_round_trips_through_json(name, kwargs):
    torch.manual_seed(0)
    model = create_model(name, num_classes=5, in_channels=1, **kwargs).eval()
    arch = json.loads(json.dumps(model.arch))  # what a checkpoint stores
    assert arch["name"] == name
    again = create_model(arch["name"], **arch["kwargs"]).eval()
    a, b = model.state_dict(), again.state_dict()
    assert list(a) == list(b)
    assert all(a[k].shape == b[k].shape for k in a)
    again.load_state_dict(a)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x), again(x))


def test_unknown_name_lists_known_models():
    with pytest.raises(KdprobeError) as err:
        create_model("resnet57")
    msg = str(err.value)
    assert "resnet57" in msg and "\n" not in msg
    assert all(n in msg for n in list_models())


def test_aliases_resolve_to_canonical_names():
    assert canonical_name("vgg19") == "vgg19_bn"
    assert canonical_name("resnet56") == "resnet56b"
    assert create_model("VGG19", width=1 / 16).arch["name"] == "vgg19_bn"
    assert all(a not in list_models() for a in model_aliases())


def test_unknown_kwarg_is_a_kdprobe_error():
    with pytest.raises(KdprobeError, match="densenet40"):
        create_model("densenet40", widht=2)


# ---------------------------------------------------------------- hand-written counts

def resnet_formula(depth: int, k: int, option: str, c_in: int = 3) -> int:
    """CIFAR ResNet 6n+2: conv/BN per basic block, 1x1 conv+BN projection for option B."""
    n = (depth - 2) // 6
    total = 9 * c_in * 16 + 2 * 16
    prev = 16
    for c in (16, 32, 64):
        for b in range(n):
            total += 9 * prev * c + 2 * c + 9 * c * c + 2 * c
            if option == "B" and prev != c:
                total += prev * c + 2 * c
            prev = c
    return total + 64 * k + k


def vgg_formula(cfg, k: int, c_in: int = 3) -> int:
    total, prev = 0, c_in
    for v in cfg:
        if v != "M":
            total += 9 * prev * v + 2 * v
            prev = v
    return total + prev * k + k


def densenet_formula(depth: int, growth: int, k: int, c_in: int = 3) -> int:
    n = (depth - 4) // 3
    c = 2 * growth
    total = 9 * c_in * c
    for b in range(3):
        for _ in range(n):
            total += 2 * c + 9 * c * growth  # BN(c) + conv3x3 c -> growth
            c += growth
        if b < 2:
            total += 2 * c + c * c  # BN(c) + conv1x1 c -> c
    return total + 2 * c + c * k + k


def pyramidnet_formula(depth: int, alpha: float, bottleneck: bool, k: int) -> int:
    n = (depth - 2) // (9 if bottleneck else 6)
    total, prev = 27 * 16 + 32, 16
    for i in range(1, 3 * n + 1):
        p = round(16 + alpha * i / (3 * n))
        if bottleneck:  # BN(in) 1x1 BN 3x3 BN 1x1(4p) BN(4p)
            total += 2 * prev + prev * p + 2 * p + 9 * p * p + 2 * p + 4 * p * p + 8 * p
            prev = 4 * p
        else:  # BN(in) 3x3 BN 3x3 BN
            total += 2 * prev + 9 * prev * p + 2 * p + 9 * p * p + 2 * p
            prev = p
    return total + 2 * prev + prev * k + k


VGG19 = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512]


@pytest.mark.parametrize("depth", [8, 20, 56, 110])
@pytest.mark.parametrize("option", ["A", "B"])
def test_resnet_param_formula(depth, option):
    name = f"resnet{depth}{option.lower()}"
    assert full_size_params(name, 100) == resnet_formula(depth, 100, option)
    assert full_size_params(name, 10, in_channels=1) == resnet_formula(depth, 10, option, c_in=1)


@pytest.mark.parametrize("name, k, published", [
    ("resnet56b", 100, 0.862e6),   # RepDistiller resnet56 (CRD paper table: 0.86M)
    ("resnet110b", 100, 1.737e6),  # RepDistiller resnet110 (1.74M)
    ("resnet56a", 10, 0.853e6),    # He et al. / Li et al. ResNet-56 (0.85M)
    ("vgg19_bn", 10, 20.04e6),     # Network Slimming, Table 1
    ("pyramidnet200", 100, 26.8e6),  # CutMix, PyramidNet-200 (alpha 240)
])
def test_published_param_counts(name, k, published):
    assert abs(full_size_params(name, k) - published) / published < 0.005


def test_vgg_densenet_pyramidnet_param_formulas():
    assert full_size_params("vgg19_bn", 10) == vgg_formula(VGG19, 10) == 20_035_018
    assert full_size_params("densenet40", 10) == densenet_formula(40, 12, 10) == 1_059_298
    assert full_size_params("densenet40", 100) == densenet_formula(40, 12, 100)
    assert full_size_params("pyramidnet110", 100) == pyramidnet_formula(110, 64, False, 100)
    assert full_size_params("pyramidnet", 100, alpha=48) == pyramidnet_formula(110, 48, False, 100)
    assert full_size_params("pyramidnet200", 100) == pyramidnet_formula(200, 240, True, 100)


# ---------------------------------------------------------------- family specifics

def test_vgg_pools_stop_at_one_pixel_and_cfg_rebuilds():
    model = create_model("vgg19_bn", num_classes=5, width=1 / 16).eval()
    assert model.forward_features(torch.zeros(2, 3, 32, 32)).shape == (2, 32, 2, 2)  # 32/2^4
    assert model.forward_features(torch.zeros(2, 3, 8, 8)).shape == (2, 32, 1, 1)   # 8->4->2->1->1
    slim = [3, "M", 5, 2, "M", 7]
    small = create_model("vgg19_bn", num_classes=5, in_channels=1, cfg=slim)
    assert small.feature_channels == 7
    assert n_params(small) == vgg_formula(slim, 5, c_in=1)
    for bad in ([3, 0], ["M"], [3, "X"], "64,M"):
        with pytest.raises(KdprobeError):
            create_model("vgg19_bn", cfg=bad)


def test_densenet_selection_shrinks_bn_and_convs():
    full = create_model("densenet40", num_classes=5, depth=10, growth=2)
    widths = full.bn_widths  # 4,6 | 8 | 8,10 | 12 | 12,14 | 16
    assert widths == [4, 6, 8, 8, 10, 12, 12, 14, 16]
    sel = [[0, 2]] + [None] * 7 + [[1, 3, 15]]
    slim = create_model("densenet40", num_classes=5, depth=10, growth=2, selection=sel).eval()
    assert slim.feature_channels == 3
    # layer 0: BN 4 -> 2 entries and conv 4*2*9 -> 2*2*9; final BN 16 -> 3, fc 16*5 -> 3*5
    expected = n_params(full) - (2 * 2 + 2 * 2 * 9) - (13 * 2 + 13 * 5)
    assert n_params(slim) == expected
    # Known answer: the full network with the slim weights scattered into the kept channels
    # and zeros elsewhere (conv input columns, fc columns) computes the same function.
    torch.manual_seed(1)
    for mod in slim.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):  # non-trivial BN so a wrong index shows
            mod.weight.data.uniform_(0.5, 1.5), mod.bias.data.uniform_(-0.5, 0.5)
            mod.running_mean.uniform_(-0.5, 0.5), mod.running_var.uniform_(0.5, 1.5)
    src, dst = slim.state_dict(), full.state_dict()
    for key, val in src.items():
        if dst[key].shape == val.shape:
            dst[key] = val.clone()
    for key in ("weight", "bias", "running_mean", "running_var"):
        dst[f"dense1.0.bn.{key}"][[0, 2]] = src[f"dense1.0.bn.{key}"]
        dst[f"bn.{key}"][[1, 3, 15]] = src[f"bn.{key}"]
    dst["dense1.0.conv.weight"].zero_()[:, [0, 2]] = src["dense1.0.conv.weight"]
    dst["fc.weight"].zero_()[:, [1, 3, 15]] = src["fc.weight"]
    full.load_state_dict(dst)
    full.eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(slim(x), full(x))
    with pytest.raises(KdprobeError):
        create_model("densenet40", depth=10, growth=2, selection=[[]] + [None] * 8)
    with pytest.raises(KdprobeError):
        create_model("densenet40", depth=10, growth=2, selection=[None] * 8)
    with pytest.raises(KdprobeError):
        create_model("densenet40", depth=11)


def test_pyramidnet_widths_and_bad_depth():
    m = create_model("pyramidnet", depth=8, alpha=9)  # 3 basic units: 16+3, 16+6, 16+9
    assert [u.out_channels for u in (m.layer1[0], m.layer2[0], m.layer3[0])] == [19, 22, 25]
    b = create_model("pyramidnet", depth=11, alpha=9, bottleneck=True)
    assert b.feature_channels == 4 * 25
    for depth, bottleneck in ((9, False), (112, True)):
        with pytest.raises(KdprobeError):
            create_model("pyramidnet", depth=depth, bottleneck=bottleneck)


def test_pyramidnet_shortcut_is_avgpool_then_zero_channels_at_the_end():
    m = create_model("pyramidnet", depth=8, alpha=9).eval()  # units 16->19->22->25
    for unit in (m.layer1[0], m.layer2[0]):
        torch.nn.init.zeros_(unit.bn3.weight)  # residual branch outputs exactly 0
        torch.nn.init.zeros_(unit.bn3.bias)
    x = torch.randn(2, 16, 6, 6)
    with torch.no_grad():
        y1 = m.layer1(x)
        y2 = m.layer2(y1)
    assert torch.equal(y1[:, :16], x) and torch.equal(y1[:, 16:], torch.zeros(2, 3, 6, 6))
    pooled = (x[:, :, 0::2, 0::2] + x[:, :, 0::2, 1::2] + x[:, :, 1::2, 0::2] + x[:, :, 1::2, 1::2]) / 4
    torch.testing.assert_close(y2[:, :16], pooled)
    assert y2.shape == (2, 22, 3, 3) and not y2[:, 16:].any()
