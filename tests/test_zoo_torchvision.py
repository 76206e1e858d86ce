"""`torchvision:NAME`: torchvision's own builders, loaded from the user's file, nothing downloaded.

The reference side is torchvision's builder itself (torchvision.models.NAME(num_classes=...)),
its state_dict saved as torchvision users do; kdprobe loads the file and must give the same
logits. Every builder of list_models resolves on the meta device (no memory, no weights), and
the per-family facts (classifier key, feature layer) are checked against each built model.
"""
from __future__ import annotations

import json

import pytest
import torch
import torchvision

from conftest import settle_bn
from kdprobe.checkpoints.format import load_checkpoint
from kdprobe.errors import KdprobeError
from kdprobe.models import create_model
from kdprobe.models.registry import canonical_name, detectable_models, infer_kwargs, list_sources
from kdprobe.models.torchvision_source import FAMILIES, family

ALL = torchvision.models.list_models(module=torchvision.models)


# (builder, input side): one per family, small inputs where the model allows
CASES = [("resnet18", 32), ("mobilenet_v3_small", 32), ("densenet121", 32), ("efficientnet_b0", 32),
         ("shufflenet_v2_x0_5", 32), ("googlenet", 32), ("squeezenet1_1", 32), ("regnet_x_400mf", 32)]


@pytest.mark.parametrize("name, side", CASES)
def test_torchvision_file_loads_and_equals_torchvision(tmp_path, name, side):
    torch.manual_seed(0)
    kw = {"init_weights": True} if name == "googlenet" else {}
    ref = settle_bn(getattr(torchvision.models, name)(num_classes=7, **kw))
    torch.save(ref.state_dict(), tmp_path / "tv.pth")  # what `torch.save(model.state_dict(), PATH)` writes
    sd = torch.load(tmp_path / "tv.pth", weights_only=True)
    inferred = infer_kwargs(f"torchvision:{name}", sd)
    assert inferred["num_classes"] == 7
    ck = load_checkpoint(tmp_path / "tv.pth", arch=f"torchvision:{name}")
    assert ck.model.arch["name"] == f"torchvision:{name}" and ck.model.arch["kwargs"]["num_classes"] == 7
    assert list(ck.model.state_dict()) == list(ref.state_dict())
    x = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = ck.model(x), ref(x)
    assert b.abs().max() > 1e-3
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6 * float(b.abs().max()))
    det = load_checkpoint(tmp_path / "tv.pth")  # auto-detected among every builder
    assert det.detection.how == "detected" and det.model.arch == ck.model.arch
    with torch.no_grad():
        torch.testing.assert_close(det.model(x), b, rtol=1e-6, atol=1e-6 * float(b.abs().max()))
    assert ck.model.feature_layer.removesuffix(":in") in dict(ck.model.named_modules())


def test_torchvision_vgg11_bn_equals_torchvision():
    """vgg11_bn is 129M parameters: compared in memory (no 0.5 GB file), ours built on meta (no init)."""
    torch.manual_seed(0)
    ref = settle_bn(torchvision.models.vgg11_bn(num_classes=5))
    with torch.device("meta"):
        model = create_model("torchvision:vgg11_bn", num_classes=5)
    model.to_empty(device="cpu").load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), ref(x), rtol=1e-6, atol=1e-6)
    assert infer_kwargs("torchvision:vgg11_bn", ref.state_dict()) == {"num_classes": 5}


@pytest.mark.parametrize("name", ALL)
def test_every_builder_resolves_on_the_meta_device(name):
    with torch.device("meta"):
        model = create_model(f"torchvision:{name}", num_classes=7)
    sd = model.state_dict()
    assert all(v.is_meta for v in sd.values())
    assert sd[FAMILIES[family(name)][1]].shape[0] == 7  # the classifier key of the family's rule
    assert model.feature_layer.removesuffix(":in") in dict(model.named_modules())
    assert infer_kwargs(f"torchvision:{name}", sd)["num_classes"] == 7
    assert json.loads(json.dumps(model.arch)) == {"name": f"torchvision:{name}", "kwargs": {"num_classes": 7, "in_channels": 3}}


def test_listing_detection_and_names():
    assert list_sources()["torchvision"] == ALL
    assert {f"torchvision:{n}" for n in ALL} <= set(detectable_models())
    assert canonical_name("TorchVision:ResNet18") == "torchvision:resnet18"
    with pytest.raises(KdprobeError, match="did you mean torchvision:resnet18"):
        create_model("torchvision:resnet81")


def test_refusals_are_one_line_errors():
    with pytest.raises(KdprobeError, match="3-channel") as e:
        create_model("torchvision:resnet18", in_channels=1)
    assert "\n" not in str(e.value)
    with pytest.raises(KdprobeError, match="never downloads"):
        create_model("torchvision:resnet18", weights="DEFAULT")
    with pytest.raises(KdprobeError, match="rejected"):
        create_model("torchvision:resnet18", no_such_argument=3)


def test_kwargs_are_recorded_flat_and_rebuild():
    m = create_model("torchvision:mobilenet_v2", num_classes=3, width_mult=0.5)
    arch = json.loads(json.dumps(m.arch))
    assert arch["kwargs"] == {"num_classes": 3, "in_channels": 3, "width_mult": 0.5}
    again = create_model(arch["name"], **arch["kwargs"])
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in m.state_dict().items()}
    assert again.features[0][0].out_channels == 16  # the kwarg reached torchvision (default: 32)


def test_aux_heads_googlenet_inception():
    torch.manual_seed(0)
    m = create_model("torchvision:googlenet", num_classes=4).train()
    out = m(torch.randn(2, 3, 32, 32))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 4)  # main logits in train mode too
    assert "aux1.fc2.weight" in m.state_dict()
    no_aux = {k: v for k, v in m.state_dict().items() if not k.startswith(("aux1.", "aux2."))}
    kw = infer_kwargs("torchvision:googlenet", no_aux)
    assert kw == {"num_classes": 4, "aux_logits": False}
    assert list(create_model("torchvision:googlenet", **kw).state_dict()) == list(no_aux)
    with torch.device("meta"):
        inc = create_model("torchvision:inception_v3", num_classes=4, aux_logits=False)
    assert infer_kwargs("torchvision:inception_v3", inc.state_dict()) == {"num_classes": 4, "aux_logits": False}


def test_vit_image_size_read_off_the_position_embedding():
    with torch.device("meta"):
        vit = create_model("torchvision:vit_b_16", num_classes=3, image_size=32)
        full = create_model("torchvision:vit_b_16", num_classes=3)
    assert infer_kwargs("torchvision:vit_b_16", vit.state_dict()) == {"num_classes": 3, "image_size": 32}
    assert infer_kwargs("torchvision:vit_b_16", full.state_dict()) == {"num_classes": 3}
    assert infer_kwargs("torchvision:resnet18", full.state_dict()) is None  # no fc.weight: not a resnet


def test_kdprobe_models_lists_the_sources():
    from typer.testing import CliRunner

    from cli.main import app

    res = CliRunner().invoke(app, ["models"])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert f"torchvision:NAME  ({len(ALL)} builders: {', '.join(ALL)})" in lines
    assert any(ln.startswith("python:MODULE:FACTORY  (your own model: imports and runs MODULE") for ln in lines)
    assert "resnet56a  (alias: rnp-l1:resnet56)" in lines and "resnet56a-subsample" in lines
    assert "rnp-slimming:densenet40" in lines
