"""rethinking-network-pruning architectures: each equals the reference network.

The reference side is written here from the reference code's structure (Eric-mingjie/
rethinking-network-pruning, cifar/{l1-norm-pruning,network-slimming,weight-level}/models):
same module names, the reference's fixed pools, its `x.data` option-A shortcut and its
numpy channel selection; nothing from kdprobe. Files are saved in that code's formats and
loaded with kdprobe.checkpoints.format.load_checkpoint; logits are compared in eval mode with
non-trivial BatchNorm statistics, and in train mode with gradients.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import settle_bn
from kdprobe.checkpoints.format import FORMAT, load_checkpoint, save_checkpoint
from kdprobe.errors import KdprobeError
from kdprobe.models import create_model
from kdprobe.models.registry import canonical_name, detectable_models, infer_kwargs

# ------------------------------------------------------------------ reference structures


def conv3x3(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 3, stride, 1, bias=False)


def ref_option_a(x, planes):
    """l1-norm-pruning's downsample_basic_block: AvgPool2d(2, 2), cat([x.data, zeros])."""
    x = nn.AvgPool2d(2, 2)(x)
    zeros = torch.zeros(x.size(0), planes - x.size(1), x.size(2), x.size(3))
    return torch.cat([x.data, zeros], dim=1)


def old_kdprobe_option_a(x, planes):
    """kdprobe format 1's option A: stride-2 subsample, zero channels appended, gradient flows."""
    x = x[:, :, ::2, ::2]
    return torch.cat([x, x.new_zeros(x.size(0), planes - x.size(1), x.size(2), x.size(3))], dim=1)


class RefBasicBlock(nn.Module):
    def __init__(self, inplanes, planes, cfg, stride=1, downsample=None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, cfg, stride)
        self.bn1 = nn.BatchNorm2d(cfg)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(cfg, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        residual = x if self.downsample is None else self.downsample(x)
        return self.relu(out + residual)


class RefL1ResNet(nn.Module):
    """l1-norm-pruning's ResNet(depth, cfg) with a num_classes argument instead of `dataset`."""

    def __init__(self, depth, num_classes=10, cfg=None, shortcut=ref_option_a):
        super().__init__()
        n = (depth - 2) // 6
        cfg = cfg or [16] * n + [32] * n + [64] * n
        self.inplanes = 16
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(16, n, cfg[:n], 1, shortcut)
        self.layer2 = self._make_layer(32, n, cfg[n:2 * n], 2, shortcut)
        self.layer3 = self._make_layer(64, n, cfg[2 * n:], 2, shortcut)
        self.avgpool = nn.AvgPool2d(8)
        self.fc = nn.Linear(64, num_classes)

    def _make_layer(self, planes, blocks, cfg, stride, shortcut):
        down = None
        if stride != 1 or self.inplanes != planes:
            down = lambda x, p=planes: shortcut(x, p)  # noqa: E731 - a function, as the reference's partial
        layers = [RefBasicBlock(self.inplanes, planes, cfg[0], stride, down)]
        self.inplanes = planes
        layers += [RefBasicBlock(planes, planes, cfg[i]) for i in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.avgpool(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(x.view(x.size(0), -1))


class RefChannelSelection(nn.Module):
    """network-slimming's channel_selection: an nn.Parameter of ones, nonzero entries selected."""

    def __init__(self, num_channels):
        super().__init__()
        self.indexes = nn.Parameter(torch.ones(num_channels))

    def forward(self, x):
        idx = np.squeeze(np.argwhere(self.indexes.data.cpu().numpy()))
        if idx.size == 1:
            idx = np.resize(idx, (1,))
        return x[:, idx, :, :]


class RefVGG(nn.Module):
    """network-slimming's vgg (depth 19): `feature` Sequential, AvgPool2d(2), `classifier`."""

    CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512]

    def __init__(self, num_classes=10, cfg=None):
        super().__init__()
        cfg = cfg or self.CFG
        layers, c = [], 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1, bias=False), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                c = v
        self.feature = nn.Sequential(*layers)
        self.classifier = nn.Linear(cfg[-1], num_classes)

    def forward(self, x):
        x = nn.AvgPool2d(2)(self.feature(x))
        return self.classifier(x.view(x.size(0), -1))


class RefPreBottleneck(nn.Module):
    def __init__(self, inplanes, planes, cfg, stride=1, downsample=None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.select = RefChannelSelection(inplanes)
        self.conv1 = nn.Conv2d(cfg[0], cfg[1], 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cfg[1])
        self.conv2 = nn.Conv2d(cfg[1], cfg[2], 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cfg[2])
        self.conv3 = nn.Conv2d(cfg[2], planes * 4, 1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        out = self.conv1(self.relu(self.select(self.bn1(x))))
        out = self.conv2(self.relu(self.bn2(out)))
        out = self.conv3(self.relu(self.bn3(out)))
        return out + (x if self.downsample is None else self.downsample(x))


class RefPreResNet(nn.Module):
    """network-slimming's preresnet `resnet(depth, cfg)`."""

    def __init__(self, depth=164, num_classes=10, cfg=None):
        super().__init__()
        n = (depth - 2) // 9
        if cfg is None:
            cfg = [[16, 16, 16], [64, 16, 16] * (n - 1), [64, 32, 32], [128, 32, 32] * (n - 1),
                   [128, 64, 64], [256, 64, 64] * (n - 1), [256]]
            cfg = [c for sub in cfg for c in sub]
        self.inplanes = 16
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.layer1 = self._make_layer(16, n, cfg[0:3 * n])
        self.layer2 = self._make_layer(32, n, cfg[3 * n:6 * n], 2)
        self.layer3 = self._make_layer(64, n, cfg[6 * n:9 * n], 2)
        self.bn = nn.BatchNorm2d(256)
        self.select = RefChannelSelection(256)
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(8)
        self.fc = nn.Linear(cfg[-1], num_classes)

    def _make_layer(self, planes, blocks, cfg, stride=1):
        down = None
        if stride != 1 or self.inplanes != planes * 4:
            down = nn.Sequential(nn.Conv2d(self.inplanes, planes * 4, 1, stride, bias=False))
        layers = [RefPreBottleneck(self.inplanes, planes, cfg[0:3], stride, down)]
        self.inplanes = planes * 4
        layers += [RefPreBottleneck(self.inplanes, planes, cfg[3 * i:3 * (i + 1)]) for i in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        x = self.avgpool(self.relu(self.select(self.bn(x))))
        return self.fc(x.view(x.size(0), -1))


class RefDenseBlock(nn.Module):
    def __init__(self, inplanes, cfg, growth):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.select = RefChannelSelection(inplanes)
        self.conv1 = nn.Conv2d(cfg, growth, 3, padding=1, bias=False)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return torch.cat((x, self.conv1(self.relu(self.select(self.bn1(x))))), 1)


class RefTransition(nn.Module):
    def __init__(self, inplanes, outplanes, cfg):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.select = RefChannelSelection(inplanes)
        self.conv1 = nn.Conv2d(cfg, outplanes, 1, bias=False)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return F.avg_pool2d(self.conv1(self.relu(self.select(self.bn1(x)))), 2)


class RefDenseNet(nn.Module):
    """network-slimming's densenet (compression 1); cfg: the conv input widths (3n+3)."""

    def __init__(self, depth=40, num_classes=10, growth=12, cfg=None):
        super().__init__()
        n = (depth - 4) // 3
        if cfg is None:  # the reference's formula (right for depth 40, growth 12)
            cfg, start = [], growth * 2
            for _ in range(3):
                cfg += [start + 12 * i for i in range(n + 1)]
                start += growth * 12
        self.inplanes = growth * 2
        self.conv1 = nn.Conv2d(3, self.inplanes, 3, padding=1, bias=False)
        self.dense1 = self._dense(n, cfg[0:n], growth)
        self.trans1 = self._trans(cfg[n])
        self.dense2 = self._dense(n, cfg[n + 1:2 * n + 1], growth)
        self.trans2 = self._trans(cfg[2 * n + 1])
        self.dense3 = self._dense(n, cfg[2 * n + 2:3 * n + 2], growth)
        self.bn = nn.BatchNorm2d(self.inplanes)
        self.select = RefChannelSelection(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(8)
        self.fc = nn.Linear(cfg[-1], num_classes)

    def _dense(self, n, cfg, growth):
        layers = []
        for i in range(n):
            layers.append(RefDenseBlock(self.inplanes, cfg[i], growth))
            self.inplanes += growth
        return nn.Sequential(*layers)

    def _trans(self, cfg):
        return RefTransition(self.inplanes, self.inplanes, cfg)

    def forward(self, x):
        x = self.trans1(self.dense1(self.conv1(x)))
        x = self.dense3(self.trans2(self.dense2(x)))
        x = self.avgpool(self.relu(self.select(self.bn(x))))
        return self.fc(x.view(x.size(0), -1))


class RefWLBottleneck(nn.Module):
    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class RefWLBasic(nn.Module):
    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1, self.bn1 = conv3x3(inplanes, planes, stride), nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2, self.bn2 = conv3x3(planes, planes), nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class RefWLResNet(nn.Module):
    """weight-level's ResNet(depth, num_classes): Bottleneck if depth >= 54 else BasicBlock."""

    def __init__(self, depth, num_classes=10):
        super().__init__()
        n = (depth - 2) // 6
        block, self.expansion = (RefWLBottleneck, 4) if depth >= 54 else (RefWLBasic, 1)
        self.inplanes = 16
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block, 16, n)
        self.layer2 = self._make_layer(block, 32, n, 2)
        self.layer3 = self._make_layer(block, 64, n, 2)
        self.avgpool = nn.AvgPool2d(8)
        self.fc = nn.Linear(64 * self.expansion, num_classes)

    def _make_layer(self, block, planes, blocks, stride=1):
        e, down = self.expansion, None
        if stride != 1 or self.inplanes != planes * e:
            down = nn.Sequential(nn.Conv2d(self.inplanes, planes * e, 1, stride, bias=False), nn.BatchNorm2d(planes * e))
        layers = [block(self.inplanes, planes, stride, down)]
        self.inplanes = planes * e
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.avgpool(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(x.view(x.size(0), -1))


# ------------------------------------------------------------------ helpers


def random_selection(model, cfg_of_select, seed=1):
    """Set every reference channel_selection to `k` random channels (as a pruned file holds)."""
    g = torch.Generator().manual_seed(seed)
    sels = [m for m in model.modules() if isinstance(m, RefChannelSelection)]
    assert len(sels) == len(cfg_of_select)
    for m, k in zip(sels, cfg_of_select):
        keep = torch.randperm(m.indexes.numel(), generator=g)[:k]
        m.indexes.data.zero_()[keep] = 1.0


def logits(model, x):
    with torch.no_grad():
        return model.eval()(x)


def x32(n=2, seed=3):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def assert_same_keys(ours, ref):
    a, b = ours.state_dict(), ref.state_dict()
    assert list(a) == list(b)
    assert all(a[k].shape == b[k].shape for k in a)


def assert_logits_close(a, b):
    """Equal up to float rounding: the difference is tiny next to the logits' own size."""
    assert a.abs().max() > 0.1  # a non-degenerate network
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(a.abs().max()))


def assert_computes_reference(model, ref):
    """Same keys and shapes; with the reference's weights, the same logits."""
    assert_same_keys(model, ref)
    model.load_state_dict(ref.state_dict())
    assert_logits_close(logits(model, x32()), logits(ref, x32()))


# ------------------------------------------------------------------ option A, l1-norm-pruning


def test_option_a_is_avgpool_then_zero_channels_without_gradient():
    torch.manual_seed(0)
    m = create_model("resnet8a", num_classes=3, width=0.5).eval()  # trunk 8/16/32
    assert m.arch["kwargs"]["shortcut_a"] == "avgpool"
    block = m.layer2[0]
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    short = block._shortcut(x)
    pooled = (x[:, :, 0::2, 0::2] + x[:, :, 0::2, 1::2] + x[:, :, 1::2, 0::2] + x[:, :, 1::2, 1::2]) / 4
    torch.testing.assert_close(short[:, :8], pooled.detach())
    assert short.shape == (2, 16, 3, 3) and not short[:, 8:].any()  # zero channels go after
    assert not short.requires_grad  # the reference's x.data: no gradient through it
    ident = m.layer1[0]._shortcut(x)
    assert ident is x  # stride-1 identity: gradient flows


@pytest.mark.parametrize("name, flows", [("resnet8a", False), ("resnet8a-subsample", True)])
def test_gradient_through_the_downsampling_shortcut(name, flows):
    """With the residual branch silenced (bn2 = 0), a block outputs relu(shortcut(x)): its input
    gradient is the shortcut's. Reference: none through the downsampling one, full through identity."""
    torch.manual_seed(0)
    m = create_model(name, num_classes=3, width=0.5).train()
    for block in (m.layer1[0], m.layer2[0]):
        nn.init.zeros_(block.bn2.weight), nn.init.zeros_(block.bn2.bias)
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    m.layer2[0](x).sum().backward()
    assert bool(x.grad.abs().sum() > 0) == flows
    x.grad = None
    m.layer1[0](x).sum().backward()
    assert (x.grad > 0).any()  # identity shortcut: relu'(x) where x > 0


def _l1_cfg(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [int(torch.randint(1, c + 1, (1,), generator=g)) for c in [16] * n + [32] * n + [64] * n]


@pytest.mark.parametrize("depth", [56, 110])
def test_rnp_l1_pruned_file_equals_reference_forward_and_backward(tmp_path, depth):
    torch.manual_seed(0)
    n = (depth - 2) // 6
    cfg = _l1_cfg(n, seed=depth)
    ref = settle_bn(RefL1ResNet(depth, num_classes=100, cfg=cfg))
    # res56prune.py writes {'cfg', 'state_dict'}; main_finetune.py adds epoch/best_prec1/optimizer
    torch.save({"cfg": cfg, "state_dict": ref.state_dict()}, tmp_path / "pruned.pth.tar")
    torch.save({"epoch": 40, "state_dict": ref.state_dict(), "best_prec1": 70.1, "optimizer": {}, "cfg": cfg},
               tmp_path / "finetuned.pth.tar")
    x = x32()
    for f in ("pruned.pth.tar", "finetuned.pth.tar"):
        ck = load_checkpoint(tmp_path / f, arch=f"rnp-l1:resnet{depth}")
        assert ck.model.arch["name"] == f"resnet{depth}a" and ck.model.arch["kwargs"]["block_cfg"] == cfg
        assert_same_keys(ck.model, ref)
        assert_logits_close(logits(ck.model, x), logits(ref, x))
        assert_detected(tmp_path / f, ck.model.arch, logits(ref, x), also=f"rnp-l1:resnet{depth}")
    # train mode: same logits, same input and weight gradients (none through the shortcut)
    model = ck.model.train()
    ref.train()
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = model(xa), ref(xb)
    torch.testing.assert_close(ya, yb, rtol=1e-4, atol=1e-4 * float(yb.detach().abs().max()))
    ya.square().sum().backward()
    yb.square().sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-4 * float(xb.grad.abs().max()))
    gref = dict(ref.named_parameters())
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, gref[k].grad, rtol=1e-3, atol=1e-4 * float(gref[k].grad.abs().max()) + 1e-12)


def assert_detected(path, arch, expect, also=None):
    """Loaded without --arch: the same architecture and widths, the same logits."""
    det = load_checkpoint(path)
    assert det.detection.how == "detected" and det.model.arch == arch, (det.model.arch, arch)
    assert also is None or also in det.detection.same_function
    assert_logits_close(logits(det.model, x32()), expect)


def test_subsample_variant_is_not_the_reference():
    torch.manual_seed(0)
    ref = settle_bn(RefL1ResNet(20))
    assert_computes_reference(create_model("resnet20a"), ref)
    b = create_model("resnet20a-subsample")
    b.load_state_dict(ref.state_dict())
    assert (logits(b, x32()) - logits(ref, x32())).abs().max() > 1e-2
    with pytest.raises(KdprobeError, match="shortcut_a"):
        create_model("resnet20a-subsample", shortcut_a="avgpool")
    with pytest.raises(KdprobeError, match="shortcut_a"):
        create_model("resnet20a", shortcut_a="pool")


def _format1_payload(name, kwargs, sd):
    """A checkpoint dict exactly as kdprobe format 1 wrote it (arch kwargs without shortcut_a)."""
    return {"format": FORMAT, "format_version": 1, "arch": {"name": name, "kwargs": kwargs},
            "state_dict": sd, "meta": {"method": "scratch"}, "extra": {}}


def test_format1_option_a_checkpoint_loads_as_the_subsample_network_it_was_trained_as(tmp_path):
    torch.manual_seed(0)
    cfg = _l1_cfg(3)
    old = settle_bn(RefL1ResNet(20, num_classes=5, cfg=cfg, shortcut=old_kdprobe_option_a))
    kwargs = {"num_classes": 5, "in_channels": 3, "width": 1.0, "block_cfg": cfg}
    torch.save(_format1_payload("resnet20a", kwargs, old.state_dict()), tmp_path / "old.pt")
    ck = load_checkpoint(tmp_path / "old.pt")
    assert ck.model.arch["name"] == "resnet20a-subsample" and ck.model.arch["kwargs"]["shortcut_a"] == "subsample"
    x = x32()
    assert_logits_close(logits(ck.model, x), logits(old, x))
    # the same weights as today's resnet20a compute something else: the mapping matters
    new = create_model("resnet20a", **kwargs)
    new.load_state_dict(old.state_dict())
    assert (logits(new, x) - logits(old, x)).abs().max() > 1e-2
    # re-saved, it stays the subsample network; a new resnet20a records the avgpool shortcut
    again = load_checkpoint(save_checkpoint(tmp_path / "again.pt", ck.model, {}))
    assert again.model.arch["name"] == "resnet20a-subsample"
    fresh = load_checkpoint(save_checkpoint(tmp_path / "new.pt", new, {}))
    assert fresh.model.arch["kwargs"]["shortcut_a"] == "avgpool"
    assert torch.load(tmp_path / "new.pt", weights_only=True)["format_version"] == 3
    # format-1 names of other families are untouched
    b = create_model("resnet8b", num_classes=5, width=0.25)
    torch.save(_format1_payload("resnet8b", dict(b.arch["kwargs"]), b.state_dict()), tmp_path / "b.pt")
    assert load_checkpoint(tmp_path / "b.pt").model.arch == b.arch


# ------------------------------------------------------------------ network-slimming

VGG_PRUNED = [30, 50, "M", 100, 80, "M", 200, 150, 120, 100, "M", 300, 250, 260, 100, "M", 90, 80, 70, 60]


def test_rnp_slimming_vgg19_unpruned_pruned_and_finetuned_without_cfg(tmp_path):
    torch.manual_seed(0)
    x = x32()
    full = settle_bn(RefVGG(num_classes=100))
    torch.save({"epoch": 160, "state_dict": full.state_dict(), "best_prec1": 73.0, "optimizer": {}}, tmp_path / "full.pth.tar")
    ck = load_checkpoint(tmp_path / "full.pth.tar", arch="rnp-slimming:vgg19")
    assert_same_keys(ck.model, full)
    assert_logits_close(logits(ck.model, x), logits(full, x))
    pruned = settle_bn(RefVGG(num_classes=10, cfg=VGG_PRUNED))
    torch.save({"cfg": VGG_PRUNED, "state_dict": pruned.state_dict()}, tmp_path / "pruned.pth.tar")  # vggprune.py
    ck = load_checkpoint(tmp_path / "pruned.pth.tar", arch="rnp-slimming:vgg19")
    assert ck.model.arch["kwargs"]["cfg"] == VGG_PRUNED
    assert_logits_close(logits(ck.model, x), logits(pruned, x))
    # main_finetune.py's file has no cfg: the widths and pool positions come off the tensors
    sd = pruned.state_dict()
    torch.save({"epoch": 40, "state_dict": sd, "best_prec1": 72.0, "optimizer": {}}, tmp_path / "ft.pth.tar")
    assert infer_kwargs("rnp-slimming:vgg19", sd) == {"num_classes": 10, "in_channels": 3, "cfg": VGG_PRUNED}
    ck = load_checkpoint(tmp_path / "ft.pth.tar", arch="rnp-slimming:vgg19")
    assert ck.model.arch["kwargs"]["cfg"] == VGG_PRUNED
    assert_logits_close(logits(ck.model, x), logits(pruned, x))
    assert infer_kwargs("rnp-slimming:vgg19", full.state_dict()) == {"num_classes": 100, "in_channels": 3}
    for f in ("pruned.pth.tar", "ft.pth.tar"):
        assert_detected(tmp_path / f, ck.model.arch, logits(pruned, x))
    assert_detected(tmp_path / "full.pth.tar", create_model("rnp-slimming:vgg19", num_classes=100).arch, logits(full, x))


def _preresnet_cfg(n, seed):
    """A slimmed cfg: select widths <= the block input, inner widths <= planes."""
    g = torch.Generator().manual_seed(seed)
    r = lambda c: int(torch.randint(1, c + 1, (1,), generator=g))  # noqa: E731
    cfg = []
    for s, p in enumerate((16, 32, 64)):
        for b in range(n):
            cin = (16 if s == 0 else 4 * p // 2) if b == 0 else 4 * p
            cfg += [r(cin), r(p), r(p)]
    return cfg + [r(256)]


def test_rnp_slimming_preresnet164_equals_reference():
    torch.manual_seed(0)
    ref = settle_bn(RefPreResNet(164))
    assert_computes_reference(create_model("rnp-slimming:preresnet164"), ref)
    assert infer_kwargs("rnp-slimming:preresnet164", ref.state_dict()) == {"num_classes": 10, "in_channels": 3}


def test_rnp_slimming_preresnet_pruned_with_and_without_cfg(tmp_path):
    torch.manual_seed(0)
    cfg = _preresnet_cfg(2, seed=5)  # depth 20: n = 2
    ref = RefPreResNet(20, num_classes=7, cfg=cfg)
    random_selection(ref, [cfg[3 * i] for i in range(6)] + [cfg[-1]])
    settle_bn(ref)
    sd = ref.state_dict()
    torch.save({"cfg": cfg, "state_dict": sd}, tmp_path / "pruned.pth.tar")  # resprune.py
    x = x32()
    ck = load_checkpoint(tmp_path / "pruned.pth.tar", arch="rnp-slimming:preresnet164", arch_kwargs={"depth": 20})
    assert_same_keys(ck.model, ref)
    assert_logits_close(logits(ck.model, x), logits(ref, x))
    kw = infer_kwargs("rnp-slimming:preresnet164", sd)
    assert kw == {"num_classes": 7, "in_channels": 3, "depth": 20, "cfg": cfg}
    torch.save({"epoch": 40, "state_dict": sd, "best_prec1": 1.0, "optimizer": {}}, tmp_path / "ft.pth.tar")
    ck = load_checkpoint(tmp_path / "ft.pth.tar", arch="rnp-slimming:preresnet164")  # main_finetune.py: no cfg
    assert {k: ck.model.arch["kwargs"][k] for k in kw} == kw
    assert_logits_close(logits(ck.model, x), logits(ref, x))
    for f in ("pruned.pth.tar", "ft.pth.tar"):
        assert_detected(tmp_path / f, ck.model.arch, logits(ref, x))


def _densenet_cfg(depth, growth, seed):
    g = torch.Generator().manual_seed(seed)
    n, c, widths = (depth - 4) // 3, 2 * growth, []
    for _ in range(3):
        widths += [c + j * growth for j in range(n)]
        c += n * growth
        widths.append(c)
    return widths, [int(torch.randint(1, w + 1, (1,), generator=g)) for w in widths]


def test_rnp_slimming_densenet40_equals_reference():
    torch.manual_seed(0)
    ref = settle_bn(RefDenseNet(40))
    model = create_model("rnp-slimming:densenet40")
    assert sum("select.indexes" in k for k in model.state_dict()) == 39  # 36 layers + 2 transitions + final
    assert_computes_reference(model, ref)
    assert infer_kwargs("rnp-slimming:densenet40", ref.state_dict()) == {"num_classes": 10, "in_channels": 3}


def test_rnp_slimming_densenet_pruned_with_and_without_cfg(tmp_path):
    torch.manual_seed(0)
    widths, cfg = _densenet_cfg(13, 4, seed=2)  # depth 13: n = 3, growth 4
    ref = RefDenseNet(13, num_classes=5, growth=4, cfg=cfg)
    random_selection(ref, cfg)
    settle_bn(ref)
    sd = ref.state_dict()
    torch.save({"cfg": cfg, "state_dict": sd}, tmp_path / "pruned.pth.tar")  # denseprune.py
    x = x32()
    ck = load_checkpoint(tmp_path / "pruned.pth.tar", arch="rnp-slimming:densenet40", arch_kwargs={"depth": 13, "growth": 4})
    assert_same_keys(ck.model, ref)
    assert_logits_close(logits(ck.model, x), logits(ref, x))
    kw = infer_kwargs("rnp-slimming:densenet40", sd)
    assert kw == {"num_classes": 5, "in_channels": 3, "depth": 13, "growth": 4, "cfg": cfg}
    torch.save({"epoch": 40, "state_dict": sd, "best_prec1": 1.0, "optimizer": {}}, tmp_path / "ft.pth.tar")
    ck = load_checkpoint(tmp_path / "ft.pth.tar", arch="rnp-slimming:densenet40")  # main_finetune.py: no cfg
    assert {k: ck.model.arch["kwargs"][k] for k in kw} == kw
    assert_logits_close(logits(ck.model, x), logits(ref, x))
    for f in ("pruned.pth.tar", "ft.pth.tar"):
        assert_detected(tmp_path / f, ck.model.arch, logits(ref, x))
    # train mode and gradients through the selections
    model, ref = ck.model.train(), ref.train()
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = model(xa), ref(xb)
    torch.testing.assert_close(ya, yb, rtol=1e-4, atol=1e-4 * float(yb.detach().abs().max()))
    ya.sum().backward(), yb.sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-4 * float(xb.grad.abs().max()))


def test_channel_selection_must_agree_with_the_widths(tmp_path):
    _, cfg = _densenet_cfg(10, 2, seed=4)
    ref = RefDenseNet(10, growth=2, cfg=cfg)
    random_selection(ref, cfg)
    sd = dict(ref.state_dict())
    sd["dense1.0.select.indexes"] = torch.ones_like(sd["dense1.0.select.indexes"])  # selects all 4, conv takes fewer
    model = create_model("rnp-slimming:densenet40", depth=10, growth=2, cfg=cfg)
    assert cfg[0] < 4  # the seed prunes the first layer, so "all 4" disagrees with its conv
    with pytest.raises(KdprobeError, match="dense1.0.select.indexes selects 4 channels"):
        model.load_state_dict(sd)
    with pytest.raises(KdprobeError, match="cfg"):
        create_model("rnp-slimming:densenet40", depth=10, growth=2, cfg=[1, 2])
    with pytest.raises(KdprobeError, match="1..4"):
        create_model("rnp-slimming:densenet40", depth=10, growth=2, cfg=[5] + cfg[1:])


# ------------------------------------------------------------------ weight-level


@pytest.mark.parametrize("depth", [56, 110])
def test_rnp_weight_resnet_is_the_bottleneck_network(tmp_path, depth):
    torch.manual_seed(0)
    ref = settle_bn(RefWLResNet(depth, num_classes=100))
    assert isinstance(ref.layer1[0], RefWLBottleneck)  # depth >= 54: that code's choice
    # cifar.py trains under DataParallel and saves {'epoch', 'state_dict', 'acc', 'best_acc', 'optimizer'}
    sd = {f"module.{k}": v for k, v in ref.state_dict().items()}
    torch.save({"epoch": 160, "state_dict": sd, "acc": 70.0, "best_acc": 71.0, "optimizer": {}}, tmp_path / "ck.pth.tar")
    ck = load_checkpoint(tmp_path / "ck.pth.tar", arch=f"rnp-weight:resnet{depth}")
    assert_same_keys(ck.model, ref)
    assert_logits_close(logits(ck.model, x32()), logits(ref, x32()))
    assert_detected(tmp_path / "ck.pth.tar", ck.model.arch, logits(ref, x32()))
    assert infer_kwargs(f"rnp-weight:resnet{depth}", ref.state_dict()) == {"num_classes": 100, "in_channels": 3}


def test_weight_level_below_depth_54_is_kdprobes_option_b():
    torch.manual_seed(0)
    assert_computes_reference(create_model("resnet20b"), settle_bn(RefWLResNet(20)))


# ------------------------------------------------------------------ registry facts


def test_names_aliases_and_detection_flags():
    assert canonical_name("rnp-l1:resnet56") == "resnet56a" and canonical_name("RNP-L1:ResNet110") == "resnet110a"
    names = set(detectable_models())
    assert {"rnp-slimming:vgg19", "rnp-slimming:preresnet164", "rnp-slimming:densenet40",
            "rnp-weight:resnet56", "rnp-weight:resnet110", "resnet56a"} <= names
    assert not any(n.endswith("-subsample") for n in names)  # legacy only: no foreign file holds it
    for name in ("rnp-slimming:vgg19", "rnp-slimming:preresnet164", "rnp-slimming:densenet40", "rnp-weight:resnet56"):
        assert isinstance(create_model(name, num_classes=3, **TINY_RNP[name]).feature_layer, str)


TINY_RNP = {"rnp-slimming:vgg19": {"cfg": [4, "M", 4, "M", 8]}, "rnp-slimming:preresnet164": {"depth": 11},
            "rnp-slimming:densenet40": {"depth": 7, "growth": 2}, "rnp-weight:resnet56": {"width": 0.25}}


def test_each_family_rejects_the_others_state_dicts():
    sds = {"rnp-slimming:vgg19": RefVGG(cfg=[4, "M", 4, "M", 8]).state_dict(),
           "rnp-slimming:preresnet164": RefPreResNet(20).state_dict(),
           "rnp-slimming:densenet40": RefDenseNet(10, growth=2, cfg=_densenet_cfg(10, 2, 0)[0]).state_dict(),
           "rnp-weight:resnet56": RefWLResNet(56).state_dict(),
           "rnp-weight:resnet110": RefWLResNet(110).state_dict(),
           "l1": RefL1ResNet(56).state_dict()}
    for name in ("rnp-slimming:preresnet164", "rnp-slimming:densenet40", "rnp-weight:resnet56", "rnp-weight:resnet110"):
        for other, sd in sds.items():
            assert (infer_kwargs(name, sd) is not None) == (other == name), (name, other)
    # the VGG rule wants VGG-19's 16 convs; other layouts are not a VGG-19
    assert infer_kwargs("rnp-slimming:vgg19", sds["rnp-slimming:vgg19"]) is None
    assert all(infer_kwargs("rnp-slimming:vgg19", sd) is None for k, sd in sds.items() if k != "rnp-slimming:vgg19")


def test_feature_maps_and_heads_split_the_forward():
    torch.manual_seed(0)
    for name, kw in TINY_RNP.items():
        m = create_model(name, num_classes=4, **kw).eval()
        x = torch.randn(2, 3, 32, 32)
        seen = {}
        layer = dict(m.named_modules())[m.feature_layer]
        h = layer.register_forward_hook(lambda mod, i, o: seen.setdefault("f", o))
        with torch.no_grad():
            out, f = m(x), m.forward_features(x)
        h.remove()
        assert f.shape[1] == m.feature_channels and torch.equal(seen["f"], f)
        assert torch.equal(out, m.forward_head(f))


def test_full_size_parameter_counts_match_the_papers():
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    # Network Slimming (Liu et al. 2017) Table 1, CIFAR-10: VGG-19 20.04M, PreResNet-164 1.70M, DenseNet-40 1.02M*
    assert count(create_model("rnp-slimming:vgg19")) == 20_035_018
    assert count(create_model("rnp-slimming:preresnet164")) == 1_703_258  # + 8,080 selection entries the reference counts
    assert count(create_model("rnp-slimming:densenet40")) == 1_059_298    # + 9,360 (see kdprobe/models/densenet.py on 1.02M)
    assert count(create_model("rnp-weight:resnet110")) == 1_704_154
    assert math.isclose(count(create_model("rnp-l1:resnet56")), 0.85e6, rel_tol=0.005)  # Li et al.: 8.5e5
