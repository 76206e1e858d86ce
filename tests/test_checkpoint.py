import os
import pickle
from pathlib import Path

import pytest
import torch

from kdprobe.checkpoints.format import load_checkpoint, save_checkpoint
from kdprobe.errors import KdprobeError
from kdprobe.models import create_model


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_round_trip_keeps_arch_weights_meta_extra(tmp_path, tiny_resnet):
    p = save_checkpoint(tmp_path / "a.pt", tiny_resnet, {"method": "scratch", "seed": 3}, {"note": torch.ones(2)})
    ck = load_checkpoint(p)
    assert ck.model.arch == tiny_resnet.arch and _same_weights(ck.model, tiny_resnet)
    assert ck.meta["method"] == "scratch" and ck.meta["seed"] == 3 and "torch" in ck.meta["versions"]
    assert torch.equal(ck.extra["note"], torch.ones(2)) and not ck.model.training
    assert len(ck.sha256) == 64


def test_pruned_widths_rebuild_from_checkpoint_alone(tmp_path):
    m = create_model("resnet8a", num_classes=3, in_channels=1, width=0.25, block_cfg=[2, 5, 7])
    ck = load_checkpoint(save_checkpoint(tmp_path / "p.pt", m, {}))
    assert ck.model.layer3[0].conv1.out_channels == 7 and _same_weights(ck.model, m)


def test_no_partial_file_is_left_on_failure(tmp_path, tiny_resnet, monkeypatch):
    import errno

    import kdprobe.files.io
    real_write = kdprobe.files.io._write_file

    def boom(path, data):
        real_write(path, data[:10])
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(kdprobe.files.io, "_write_file", boom)
    with pytest.raises(KdprobeError, match="no space left on .*a.pt"):
        save_checkpoint(tmp_path / "a.pt", tiny_resnet, {})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("wrap", ["bare", "model", "state_dict_cfg", "module_prefix", "compiled_prefix"])
def test_foreign_formats_load_with_arch(tmp_path, wrap):
    torch.manual_seed(1)
    src = create_model("resnet8b", num_classes=7, in_channels=3, width=0.5)
    sd = src.state_dict()
    obj = {"bare": sd, "model": {"model": sd, "epoch": 239, "best_acc": 71.2},
           "state_dict_cfg": {"state_dict": sd, "cfg": [8, 16, 32]},
           "module_prefix": {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
           "compiled_prefix": {f"_orig_mod.{k}": v for k, v in sd.items()}}[wrap]
    torch.save(obj, tmp_path / "f.pth")
    ck = load_checkpoint(tmp_path / "f.pth", arch="resnet8b", arch_kwargs={"width": 0.5})
    assert ck.foreign and ck.model.arch["kwargs"]["num_classes"] == 7
    assert _same_weights(ck.model, src)


def test_foreign_named_arch_must_fit(tmp_path):
    src = create_model("resnet8b", num_classes=7, width=0.5)
    torch.save({"model": src.state_dict()}, tmp_path / "f.pth")
    with pytest.raises(KdprobeError, match=r"downsample.*missing|unexpected key 'layer2.0.downsample"):
        load_checkpoint(tmp_path / "f.pth", arch="resnet8a", arch_kwargs={"width": 0.5})
    with pytest.raises(KdprobeError, match=r"conv1.weight is \(8, 3, 3, 3\) in the file but \(16, 3, 3, 3\)"):
        load_checkpoint(tmp_path / "f.pth", arch="resnet8b", arch_kwargs={"width": 1.0})


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = str(tmp_path / "PWNED")
    torch.save({"state_dict": {}, "evil": _Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(KdprobeError, match="could run code"):
        load_checkpoint(tmp_path / "evil.pt", arch="resnet8b")
    assert not os.path.exists(marker)
    # the plain pickle variant too
    with open(tmp_path / "evil2.pt", "wb") as f:
        pickle.dump(_Payload(marker), f)
    with pytest.raises(KdprobeError):
        load_checkpoint(tmp_path / "evil2.pt", arch="resnet8b")
    assert not os.path.exists(marker)


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(KdprobeError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "bad.pt").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(KdprobeError, match="not a torch checkpoint"):
        load_checkpoint(tmp_path / "bad.pt")
    (tmp_path / "text.pt").write_text("hello\n")
    with pytest.raises(KdprobeError, match="not a torch checkpoint"):
        load_checkpoint(tmp_path / "text.pt")
    good = tmp_path / "good.pt"
    save_checkpoint(good, create_model("resnet8b", width=0.25), {})
    (tmp_path / "trunc.pt").write_bytes(good.read_bytes()[:300])
    with pytest.raises(KdprobeError, match="corrupted or truncated"):
        load_checkpoint(tmp_path / "trunc.pt")


def test_foreign_vgg_with_other_layer_names_and_cfg_loads(tmp_path):
    """rethinking-network-pruning names VGG layers `feature.N` and stores a slimmed `cfg`: its own architecture
    (rnp-slimming:vgg19) loads it by name; kdprobe's vgg19_bn (`features.N`) is refused by name, never loaded by
    position (equal shapes in equal order are not equal roles)."""
    cfg = [8, "M", 16, "M", 16, 16, "M", 32, "M", 32]
    src = create_model("rnp-slimming:vgg19", num_classes=10, cfg=cfg)
    torch.save({"state_dict": src.state_dict(), "cfg": cfg, "epoch": 160, "best_prec1": 0.93}, tmp_path / "vgg.pth.tar")
    for arch in ("rnp-slimming:vgg19",):
        ck = load_checkpoint(tmp_path / "vgg.pth.tar", arch=arch)
        assert ck.model.arch["name"] == "rnp-slimming:vgg19" and ck.model.arch["kwargs"]["cfg"] == cfg
        assert _same_weights(ck.model, src)
        x = torch.randn(2, 3, 32, 32)
        assert torch.equal(ck.model(x), src.eval()(x))
    with pytest.raises(KdprobeError, match=r"vgg19_bn: missing key 'features.0.weight'.*keys match by name"):
        load_checkpoint(tmp_path / "vgg.pth.tar", arch="vgg19")


def test_foreign_width_multiplier_is_inferred_from_the_stem(tmp_path):
    src = create_model("resnet8b", num_classes=10, in_channels=1, width=0.5)
    torch.save({"model": src.state_dict()}, tmp_path / "f.pth")
    ck = load_checkpoint(tmp_path / "f.pth", arch="resnet8b")
    assert ck.model.arch["kwargs"]["width"] == 0.5 and _same_weights(ck.model, src)
