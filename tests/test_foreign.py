"""Foreign checkpoints: benign objects load through weights_only, the architecture is detected
from tensor names and shapes, and ambiguity or mismatch is a one-line error."""
import argparse
import collections
import os
import pickle

import numpy as np
import pytest
import torch

from kdprobe.checkpoints.format import load_checkpoint
from kdprobe.errors import KdprobeError
from kdprobe.checkpoints.foreign import ForeignPayload, detect
from kdprobe.models import create_model
from kdprobe.models import registry


def _logits_equal(a, b, shape=(2, 3, 32, 32)):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return torch.equal(a.eval()(x), b.eval()(x))


def _randomize_bn(m):
    g = torch.Generator().manual_seed(1)
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.copy_(torch.randn(mod.num_features, generator=g) * 0.1)
            mod.running_var.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
    return m


@pytest.mark.parametrize("legacy", [False, True])
def test_namespace_numpy_and_ordereddict_load_safely(tmp_path, legacy):
    """RepDistiller's *_last.pth holds an argparse.Namespace; pruning code stores numpy scalars."""
    src = _randomize_bn(create_model("resnet8b", num_classes=5, width=0.5))
    obj = {"opt": argparse.Namespace(model="resnet8", learning_rate=0.05, lr_decay_epochs=[150, 180]),
           "model": collections.OrderedDict(src.state_dict()), "epoch": np.int64(240),
           "best_acc": np.float64(71.5), "dtype": np.dtype("float32"), "curve": np.arange(3.0)}
    torch.save(obj, tmp_path / "f.pth", _use_new_zipfile_serialization=not legacy)
    ck = load_checkpoint(tmp_path / "f.pth")
    assert ck.foreign and ck.detection.name == "resnet8b" and ck.detection.how == "detected"
    assert ck.meta["epoch"] == 240 and ck.meta["best_acc"] == 71.5
    assert ck.meta["foreign_options"] == {"model": "resnet8", "learning_rate": 0.05, "lr_decay_epochs": [150, 180]}
    assert _logits_equal(ck.model, src)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_other_objects_are_still_refused_and_never_run(tmp_path):
    marker = str(tmp_path / "PWNED")
    src = create_model("resnet8b", width=0.25)
    for legacy in (False, True):
        torch.save({"opt": argparse.Namespace(a=1), "model": src.state_dict(), "x": _Payload(marker)},
                   tmp_path / "evil.pth", _use_new_zipfile_serialization=not legacy)
        with pytest.raises(KdprobeError, match="could run code"):
            load_checkpoint(tmp_path / "evil.pth")
        assert not os.path.exists(marker)
    # a Namespace whose attribute is a payload: the attribute is unpickled by the same restricted unpickler
    torch.save({"opt": argparse.Namespace(a=_Payload(marker)), "model": src.state_dict()}, tmp_path / "ns.pth")
    with pytest.raises(KdprobeError, match="could run code"):
        load_checkpoint(tmp_path / "ns.pth")
    assert not os.path.exists(marker)


@pytest.mark.parametrize("name,kwargs", [
    ("resnet8b", {"num_classes": 7, "width": 0.5}),
    ("resnet20a", {"num_classes": 100}),
    ("resnet14a", {"block_cfg": [3, 5, 7, 9, 11, 13]}),  # an L1-pruned network: widths off the tensors
    ("vgg19_bn", {"width": 0.125}),
    ("vgg19_bn", {"cfg": [8, "M", 16, "M", 16, 16, "M", 32, "M", 32], "num_classes": 4}),
    ("densenet40", {"depth": 10, "growth": 4}),
    ("pyramidnet", {"depth": 14, "alpha": 12, "base_channels": 8}),
    ("pyramidnet", {"depth": 11, "alpha": 12, "base_channels": 8, "bottleneck": True}),
])
def test_kdprobe_families_are_detected_with_their_widths(tmp_path, name, kwargs):
    src = _randomize_bn(create_model(name, **kwargs))
    sd = {f"module.{k}": v for k, v in src.state_dict().items()}  # DataParallel prefix
    torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "f.pth.tar")
    ck = load_checkpoint(tmp_path / "f.pth.tar")
    assert ck.detection.name == registry.canonical_name(name)
    rebuilt = create_model(ck.detection.name, **ck.detection.kwargs)
    assert {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in src.state_dict().items()}
    assert _logits_equal(ck.model, src)


def test_aliases_count_as_one_network_and_the_named_factory_wins():
    det = detect(ForeignPayload(create_model("pyramidnet110", alpha=8, base_channels=4).state_dict()), "f")
    assert det.name == "pyramidnet110"  # the generic `pyramidnet` builds the same network: not ambiguous
    det = detect(ForeignPayload(create_model("resnet20b").state_dict()), "f")
    assert det.name == "resnet20b" and "resnet20" in det.same_function


class _TwinA(torch.nn.Module):
    """Same tensors as _TwinB, another function: detection must call this ambiguous."""

    def __init__(self, num_classes=10, in_channels=3, scale=1.0):
        super().__init__()
        self.fc = torch.nn.Linear(in_channels, num_classes)
        self.scale = scale

    def forward(self, x):
        return self.fc(x.mean((2, 3))) * self.scale


class _TwinB(_TwinA):
    def forward(self, x):
        return self.fc(x.amax((2, 3)))


@pytest.fixture
def twins(monkeypatch):
    monkeypatch.setattr(registry, "_FACTORIES", dict(registry._FACTORIES))
    registry.register_model("test-twin-a")(lambda num_classes=10, in_channels=3: _TwinA(num_classes, in_channels))
    registry.register_model("test-twin-b")(lambda num_classes=10, in_channels=3: _TwinB(num_classes, in_channels))


def test_several_different_networks_fit_is_an_error_listing_them(twins, tmp_path):
    torch.save(_TwinA(4, 3).state_dict(), tmp_path / "t.pth")
    with pytest.raises(KdprobeError, match=r"2 architectures.*test-twin-a, test-twin-b.*--arch test-twin-a"):
        load_checkpoint(tmp_path / "t.pth")
    ck = load_checkpoint(tmp_path / "t.pth", arch="test-twin-b")
    assert isinstance(ck.model, _TwinB) and ck.detection.how == "named"


def test_no_fit_names_the_closest_candidate_and_both_shapes(tmp_path):
    sd = create_model("resnet8b", width=0.5).state_dict()
    sd["fc.weight"] = torch.zeros(10, 33)
    torch.save({"model": sd}, tmp_path / "f.pth")
    with pytest.raises(KdprobeError, match=r"closest is resnet8b .*fc.weight is \(10, 33\) in the file but \(10, 32\)"):
        load_checkpoint(tmp_path / "f.pth")
    torch.save({"model": {"encoder.w": torch.zeros(3, 3)}}, tmp_path / "g.pth")
    with pytest.raises(KdprobeError, match="no known architecture has these tensor names; name it with --arch"):
        load_checkpoint(tmp_path / "g.pth")


def test_files_from_old_pytorch_without_bn_counters_still_detect(tmp_path):
    src = create_model("resnet8a", width=0.5)
    sd = {k: v for k, v in src.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(sd, tmp_path / "old.pth")
    ck = load_checkpoint(tmp_path / "old.pth")
    assert ck.detection.name == "resnet8a" and _logits_equal(ck.model, src)


def test_info_prints_the_detected_architecture(tmp_path):
    from typer.testing import CliRunner

    from cli.main import app
    src = create_model("resnet14b", num_classes=100, width=0.5)
    torch.save({"opt": argparse.Namespace(model="resnet14"), "model": src.state_dict(), "epoch": 240}, tmp_path / "r.pth")
    res = CliRunner().invoke(app, ["info", str(tmp_path / "r.pth")])
    assert res.exit_code == 0, res.output
    assert "resnet14b" in res.output and "detected from the tensor names and shapes (source: kdprobe" in res.output
    assert "model=resnet14" in res.output and "epoch 240" in res.output
