"""RepDistiller's model_dict, as `repdistiller:NAME`: every network equals a reference-structured
model written here from RepDistiller's module layout (keys, buffers, forward; not kdprobe's
classes), in eval and train mode, also through a checkpoint in RepDistiller's own format, loaded by
name and auto-detected."""
from __future__ import annotations

import argparse
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from typer.testing import CliRunner

from kdprobe.checkpoints.format import load_checkpoint
from kdprobe.errors import KdprobeError
from kdprobe.models import canonical_name, create_model, list_models
from kdprobe.models.registry import infer_kwargs

# ------------------------------------------------ reference-structured models (RepDistiller layout)


def conv3(i, o, s=1):
    return nn.Conv2d(i, o, kernel_size=3, stride=s, padding=1, bias=False)


class RBasic(nn.Module):  # models/resnet.py BasicBlock
    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1, self.bn1 = conv3(inplanes, planes, stride), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = conv3(planes, planes), nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        residual = x if self.downsample is None else self.downsample(x)
        return torch.relu(out + residual)


class RResNet(nn.Module):  # models/resnet.py ResNet (basic blocks)
    def __init__(self, depth, num_filters, num_classes):
        super().__init__()
        n = (depth - 2) // 6
        self.inplanes = num_filters[0]
        self.conv1 = nn.Conv2d(3, num_filters[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(num_filters[0])
        self.layer1 = self._make_layer(num_filters[1], n)
        self.layer2 = self._make_layer(num_filters[2], n, 2)
        self.layer3 = self._make_layer(num_filters[3], n, 2)
        self.avgpool = nn.AvgPool2d(8)
        self.fc = nn.Linear(num_filters[3], num_classes)

    def _make_layer(self, planes, blocks, stride=1):
        down = None
        if stride != 1 or self.inplanes != planes:
            down = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
        layers = [RBasic(self.inplanes, planes, stride, down)]
        self.inplanes = planes
        layers += [RBasic(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.avgpool(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(x.view(x.size(0), -1))


class RBottleneck(nn.Module):  # models/resnetv2.py Bottleneck
    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(in_planes, planes, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = conv3(planes, planes, stride), nn.BatchNorm2d(planes)
        self.conv3, self.bn3 = nn.Conv2d(planes, 4 * planes, 1, bias=False), nn.BatchNorm2d(4 * planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != 4 * planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, 4 * planes, 1, stride, bias=False), nn.BatchNorm2d(4 * planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        return F.relu(self.bn3(self.conv3(out)) + self.shortcut(x))


class RResNetV2(nn.Module):  # models/resnetv2.py ResNet (ResNet50: [3, 4, 6, 3])
    def __init__(self, num_blocks, num_classes):
        super().__init__()
        self.in_planes = 64
        self.conv1, self.bn1 = conv3(3, 64), nn.BatchNorm2d(64)
        self.layer1 = self._make_layer(64, num_blocks[0], 1)
        self.layer2 = self._make_layer(128, num_blocks[1], 2)
        self.layer3 = self._make_layer(256, num_blocks[2], 2)
        self.layer4 = self._make_layer(512, num_blocks[3], 2)
        self.linear = nn.Linear(2048, num_classes)

    def _make_layer(self, planes, n, stride):
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(RBottleneck(self.in_planes, planes, s))
            self.in_planes = 4 * planes
        return nn.Sequential(*layers)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(F.adaptive_avg_pool2d(out, (1, 1)).view(out.size(0), -1))


class RWideBlock(nn.Module):  # models/wrn.py BasicBlock
    def __init__(self, i, o, stride):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(i), conv3(i, o, stride)
        self.bn2, self.conv2 = nn.BatchNorm2d(o), conv3(o, o)
        self.equalInOut = i == o
        self.convShortcut = None if self.equalInOut else nn.Conv2d(i, o, 1, stride, 0, bias=False)

    def forward(self, x):
        if not self.equalInOut:
            x = F.relu(self.bn1(x))
            out = x
        else:
            out = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        return torch.add(x if self.equalInOut else self.convShortcut(x), out)


class RNetworkBlock(nn.Module):
    def __init__(self, n, i, o, stride):
        super().__init__()
        self.layer = nn.Sequential(*[RWideBlock(i if k == 0 else o, o, stride if k == 0 else 1) for k in range(n)])

    def forward(self, x):
        return self.layer(x)


class RWRN(nn.Module):  # models/wrn.py WideResNet
    def __init__(self, depth, widen, num_classes):
        super().__init__()
        c = [16, 16 * widen, 32 * widen, 64 * widen]
        n = (depth - 4) // 6
        self.conv1 = conv3(3, 16)
        self.block1, self.block2, self.block3 = RNetworkBlock(n, c[0], c[1], 1), RNetworkBlock(n, c[1], c[2], 2), RNetworkBlock(n, c[2], c[3], 2)
        self.bn1, self.fc, self.nChannels = nn.BatchNorm2d(c[3]), nn.Linear(c[3], num_classes), c[3]

    def forward(self, x):
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.avg_pool2d(F.relu(self.bn1(out)), 8)
        return self.fc(out.view(-1, self.nChannels))


class RVGG(nn.Module):  # models/vgg.py VGG with batch_norm=True
    def __init__(self, cfg, num_classes):
        super().__init__()
        ins = [3] + [c[-1] for c in cfg[:-1]]
        for b in range(5):
            layers, i = [], ins[b]
            for v in cfg[b]:
                layers += [nn.Conv2d(i, v, kernel_size=3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                i = v
            setattr(self, f"block{b}", nn.Sequential(*layers[:-1]))
        self.classifier = nn.Linear(512, num_classes)

    def forward(self, x):
        h = x.shape[2]
        x = F.max_pool2d(F.relu(self.block0(x)), 2, 2)
        x = F.max_pool2d(F.relu(self.block1(x)), 2, 2)
        x = F.max_pool2d(F.relu(self.block2(x)), 2, 2)
        x = F.relu(self.block3(x))
        if h == 64:
            x = F.max_pool2d(x, 2, 2)
        x = F.adaptive_avg_pool2d(F.relu(self.block4(x)), (1, 1))
        return self.classifier(x.view(x.size(0), -1))


class RInvRes(nn.Module):  # models/mobilenetv2.py InvertedResidual
    def __init__(self, inp, oup, stride, t):
        super().__init__()
        self.use_res_connect = stride == 1 and inp == oup
        h = inp * t
        self.conv = nn.Sequential(nn.Conv2d(inp, h, 1, 1, 0, bias=False), nn.BatchNorm2d(h), nn.ReLU(inplace=True),
                                  nn.Conv2d(h, h, 3, stride, 1, groups=h, bias=False), nn.BatchNorm2d(h), nn.ReLU(inplace=True),
                                  nn.Conv2d(h, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup))

    def forward(self, x):
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class RMobile(nn.Module):  # models/mobilenetv2.py MobileNetV2(T=6, width_mult=0.5) = mobile_half
    def __init__(self, num_classes, T=6, w=0.5):
        super().__init__()
        setting = [[1, 16, 1, 1], [T, 24, 2, 1], [T, 32, 3, 2], [T, 64, 4, 2], [T, 96, 3, 1], [T, 160, 3, 2], [T, 320, 1, 1]]
        c = int(32 * w)
        self.conv1 = nn.Sequential(nn.Conv2d(3, c, 3, 2, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True))
        self.blocks = nn.ModuleList([])
        for t, ch, n, s in setting:
            layers = []
            for stride in [s] + [1] * (n - 1):
                layers.append(RInvRes(c, int(ch * w), stride, t))
                c = int(ch * w)
            self.blocks.append(nn.Sequential(*layers))
        self.conv2 = nn.Sequential(nn.Conv2d(c, 1280, 1, 1, 0, bias=False), nn.BatchNorm2d(1280), nn.ReLU(inplace=True))
        self.classifier = nn.Sequential(nn.Linear(1280, num_classes))
        self.avgpool = nn.AvgPool2d(32 // 16, ceil_mode=True)

    def forward(self, x):
        out = self.conv1(x)
        for b in self.blocks:
            out = b(out)
        out = self.avgpool(self.conv2(out))
        return self.classifier(out.view(out.size(0), -1))


def shuffle(x, g):  # ShuffleBlock: [N,C,H,W] -> [N,g,C/g,H,W] -> [N,C/g,g,H,W] -> [N,C,H,W]
    n, c, h, w = x.size()
    return x.view(n, g, c // g, h, w).permute(0, 2, 1, 3, 4).reshape(n, c, h, w)


class RShuffleUnit(nn.Module):  # models/ShuffleNetv1.py Bottleneck
    def __init__(self, in_planes, out_planes, stride, groups):
        super().__init__()
        mid = int(out_planes / 4)
        self.g = 1 if in_planes == 24 else groups
        self.stride = stride
        self.conv1, self.bn1 = nn.Conv2d(in_planes, mid, 1, groups=self.g, bias=False), nn.BatchNorm2d(mid)
        self.conv2, self.bn2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False), nn.BatchNorm2d(mid)
        self.conv3, self.bn3 = nn.Conv2d(mid, out_planes, 1, groups=groups, bias=False), nn.BatchNorm2d(out_planes)

    def forward(self, x):
        out = shuffle(F.relu(self.bn1(self.conv1(x))), self.g)
        out = self.bn3(self.conv3(F.relu(self.bn2(self.conv2(out)))))
        if self.stride == 2:
            return F.relu(torch.cat([out, F.avg_pool2d(x, 3, stride=2, padding=1)], 1))
        return F.relu(out + x)


class RShuffleV1(nn.Module):
    def __init__(self, num_classes, out_planes=(240, 480, 960), num_blocks=(4, 8, 4), groups=3):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 24, 1, bias=False), nn.BatchNorm2d(24)
        self.in_planes = 24
        for k in range(3):
            layers = []
            for i in range(num_blocks[k]):
                cat = self.in_planes if i == 0 else 0
                layers.append(RShuffleUnit(self.in_planes, out_planes[k] - cat, 2 if i == 0 else 1, groups))
                self.in_planes = out_planes[k]
            setattr(self, f"layer{k + 1}", nn.Sequential(*layers))
        self.linear = nn.Linear(out_planes[2], num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.avg_pool2d(self.layer3(self.layer2(self.layer1(out))), 4)
        return self.linear(out.view(out.size(0), -1))


def cbn(i, o, k=1, s=1, g=1):
    return nn.Conv2d(i, o, k, s, k // 2, groups=g, bias=False), nn.BatchNorm2d(o)


class RBasicV2(nn.Module):  # models/ShuffleNetv2.py BasicBlock
    def __init__(self, c):
        super().__init__()
        h = int(c * 0.5)
        (self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3) = cbn(h, h), cbn(h, h, 3, 1, h), cbn(h, h)

    def forward(self, x):
        c = int(x.size(1) * 0.5)
        x1, x2 = x[:, :c, :, :], x[:, c:, :, :]
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x2)))))
        return shuffle(torch.cat([x1, F.relu(self.bn3(self.conv3(out)))], 1), 2)


class RDownV2(nn.Module):  # models/ShuffleNetv2.py DownBlock
    def __init__(self, i, o):
        super().__init__()
        m = o // 2
        (self.conv1, self.bn1), (self.conv2, self.bn2) = cbn(i, i, 3, 2, i), cbn(i, m)
        (self.conv3, self.bn3), (self.conv4, self.bn4), (self.conv5, self.bn5) = cbn(i, m), cbn(m, m, 3, 2, m), cbn(m, m)

    def forward(self, x):
        out1 = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        out2 = self.bn4(self.conv4(F.relu(self.bn3(self.conv3(x)))))
        return shuffle(torch.cat([out1, F.relu(self.bn5(self.conv5(out2)))], 1), 2)


class RShuffleV2(nn.Module):  # net_size 1
    def __init__(self, num_classes, out_channels=(116, 232, 464, 1024), num_blocks=(3, 7, 3)):
        super().__init__()
        self.conv1, self.bn1 = cbn(3, 24)
        i = 24
        for k in range(3):
            setattr(self, f"layer{k + 1}", nn.Sequential(RDownV2(i, out_channels[k]), *[RBasicV2(out_channels[k]) for _ in range(num_blocks[k])]))
            i = out_channels[k]
        self.conv2, self.bn2 = cbn(i, out_channels[3])
        self.linear = nn.Linear(out_channels[3], num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(self.layer3(self.layer2(self.layer1(out))))))
        out = F.avg_pool2d(out, 4)
        return self.linear(out.view(out.size(0), -1))


VGG_CFG = {"vgg8": [[64], [128], [256], [512], [512]], "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
           "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
           "vgg16": [[64, 64], [128, 128], [256] * 3, [512] * 3, [512] * 3],
           "vgg19": [[64, 64], [128, 128], [256] * 4, [512] * 4, [512] * 4]}

# model_dict of RepDistiller/models/__init__.py, with its spelling
REFERENCE = {
    **{f"resnet{d}": (lambda k, d=d: RResNet(d, [16, 16, 32, 64], k)) for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": lambda k: RResNet(8, [32, 64, 128, 256], k),
    "resnet32x4": lambda k: RResNet(32, [32, 64, 128, 256], k),
    "ResNet50": lambda k: RResNetV2([3, 4, 6, 3], k),
    **{f"wrn_{d}_{w}": (lambda k, d=d, w=w: RWRN(d, w, k)) for d in (16, 40) for w in (1, 2)},
    **{n: (lambda k, c=c: RVGG(c, k)) for n, c in VGG_CFG.items()},
    "MobileNetV2": RMobile,
    "ShuffleV1": RShuffleV1,
    "ShuffleV2": RShuffleV2,
}
OWN = [n for n in REFERENCE if not (n.startswith("resnet") and n[6:].isdigit())]  # not aliases of resnetXb
K = 5


def randomize_bn(model, g):
    """Non-trivial BN everywhere (scale below 1 keeps deep nets finite), and a buffer count."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) * 0.5 + 0.25)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.num_batches_tracked.fill_(int(torch.randint(1, 1000, (1,), generator=g)))


def hooked(model, layer, x):
    """The output of module `layer` during model(x)."""
    seen = []
    handle = model.get_submodule(layer).register_forward_hook(lambda m, i, o: seen.append(o))
    try:
        model(x)
    finally:
        handle.remove()
    assert len(seen) == 1, f"{layer} ran {len(seen)} times"
    return seen[0]


@pytest.mark.parametrize("name", list(REFERENCE))
def test_model_is_the_reference_network(name, tmp_path):
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    ref = REFERENCE[name](K)
    randomize_bn(ref, g)
    sd = {k: v.clone() for k, v in ref.state_dict().items()}  # a snapshot: train mode moves the live buffers
    ours = create_model(f"repdistiller:{name}", num_classes=K)
    own = ours.state_dict()
    assert list(own) == list(sd)  # same keys (buffers included) in the same order
    assert all(own[k].shape == v.shape for k, v in sd.items())
    ours.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 32, 32, generator=g)
    with torch.no_grad():
        expect = ref.eval()(x)
        torch.testing.assert_close(ours.eval()(x), expect)
        f = ours.forward_features(x)
        assert f.ndim == 4 and f.shape[1] == ours.feature_channels
        assert torch.equal(ours.forward_head(f), ours(x))
        assert torch.equal(hooked(ours, ours.feature_layer, x), f)  # feature KD's hook sees the same map
        # train mode: batch statistics, and the running stats move identically
        torch.testing.assert_close(ours.train()(x), ref.train()(x))
        torch.testing.assert_close(ours.state_dict(), ref.state_dict())
    # RepDistiller's own checkpoint layout (train_student.py / train_teacher.py save this dict)
    path = tmp_path / f"{name}_best.pth"
    opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    torch.save({"epoch": 240, "model": sd, "best_acc": torch.tensor(73.5), "optimizer": opt.state_dict()}, path)
    ck = load_checkpoint(path, arch=f"repdistiller:{name}")
    assert ck.model.arch["kwargs"]["num_classes"] == K
    with torch.no_grad():
        torch.testing.assert_close(ck.model(x), expect)
    # auto-detected: the same network (its own name, or kdprobe's resnetXb of which it is an alias), the
    # best-epoch file and the *_last.pth file that carries an argparse.Namespace of options
    last = tmp_path / f"{name}_last.pth"
    torch.save({"opt": argparse.Namespace(model=name, learning_rate=0.05, epochs=240), "model": sd,
                "optimizer": opt.state_dict()}, last)
    for f in (path, last):
        det = load_checkpoint(f)
        assert det.detection.how == "detected" and det.model.arch == canonical_arch(name, K), f
        with torch.no_grad():
            torch.testing.assert_close(det.model(x), expect)
    assert det.meta["foreign_options"]["model"] == name
    again = json.loads(json.dumps(ck.model.arch))  # what a kdprobe checkpoint would store
    assert create_model(again["name"], **again["kwargs"]).state_dict().keys() == own.keys()


def canonical_arch(name, k):
    """The arch record detection must give: repdistiller:NAME, or resnetXb for the resnet8 ... resnet110 aliases."""
    return create_model(f"repdistiller:{name}", num_classes=k).arch


def meta_state_dict(name, **kw):
    with torch.device("meta"):  # shapes only
        return create_model(name, **kw).state_dict()


def test_detection_keys_tell_every_network_apart():
    names = [f"repdistiller:{n}" for n in OWN]
    others = [n for n in list_models() if ":" not in n]  # kdprobe's own (resnetXb = RepDistiller's resnetX)
    files = {n: meta_state_dict(n, num_classes=7, in_channels=1) for n in names + others}
    for fam in names:
        for src, sd in files.items():
            got = infer_kwargs(fam, sd)
            if src == fam:
                assert got == {"num_classes": 7, "in_channels": 1}, fam
            else:
                assert got is None, f"{fam} claims a {src} file"
    # a file from before torch 0.4.1 has no num_batches_tracked; a file with one width off is not this network
    sd = {k: v for k, v in files["repdistiller:wrn_16_2"].items() if not k.endswith("num_batches_tracked")}
    assert infer_kwargs("repdistiller:wrn_16_2", sd) == {"num_classes": 7, "in_channels": 1}
    sd["block3.layer.0.conv2.weight"] = torch.empty(128, 128, 3, 1, device="meta")
    assert infer_kwargs("repdistiller:wrn_16_2", sd) is None


# too small: the reference crashes; too large: it crashes too, except WRN's view(-1, C), which
# would silently return 4 rows per image at 64x64
@pytest.mark.parametrize("name, size", [("wrn_16_1", 16), ("wrn_16_1", 64), ("resnet8x4", 8), ("ShuffleV1", 16),
                                        ("MobileNetV2", 64)])
def test_fixed_pool_heads_refuse_other_input_sizes(name, size):
    model = create_model(f"repdistiller:{name}", num_classes=K).eval()
    with pytest.raises(KdprobeError, match=r"expects 32x32 input.*resize the images to 32x32") as err:
        model(torch.zeros(2, 3, size, size))
    assert "\n" not in str(err.value) and f"repdistiller:{name.lower()}" in str(err.value)


@pytest.mark.parametrize("name, size", [("vgg8", 8), ("vgg13", 64), ("ResNet50", 8), ("MobileNetV2", 16), ("resnet8x4", 40)])
def test_sizes_the_reference_accepts_still_run(name, size):
    torch.manual_seed(0)
    model = create_model(f"repdistiller:{name}", num_classes=K).eval()
    ref = REFERENCE[name](K).eval()
    ref.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x))


@pytest.mark.parametrize("name", OWN)
def test_in_channels_changes_only_the_stem(name):
    rgb, grey = meta_state_dict(f"repdistiller:{name}"), meta_state_dict(f"repdistiller:{name}", in_channels=1)
    changed = [k for k in rgb if rgb[k].shape != grey[k].shape]
    assert len(changed) == 1 and rgb[changed[0]].shape[1] == 3 and grey[changed[0]].shape[1] == 1
    assert changed[0] == next(k for k, v in rgb.items() if v.dim() == 4)  # the first conv


def test_names_are_case_insensitive_and_listed():
    assert create_model("RepDistiller:ResNet50", num_classes=K).arch["name"] == "repdistiller:resnet50"
    assert canonical_name("repdistiller:MobileNetV2") == "repdistiller:mobilenetv2"
    assert canonical_name("repdistiller:resnet56") == "resnet56b"  # the same network, so one name
    for n in REFERENCE:
        canonical_name(f"repdistiller:{n}")
    from cli.main import app

    out = CliRunner().invoke(app, ["models"]).output
    assert all(f"repdistiller:{n.lower()}" in out for n in REFERENCE)
