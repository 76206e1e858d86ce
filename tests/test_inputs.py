"""A checkpoint against its data (issue 10 items 5, 6, 11): absolute dataset paths and content
fingerprints, shape/class/identity checks before any work, byte-identical copies refused."""
from __future__ import annotations

import os
import shutil

import pytest
import torch
from typer.testing import CliRunner

from kdprobe.checkpoints.format import load_checkpoint, read_payload, save_checkpoint
from kdprobe.data.datasets import load_dataset
from kdprobe.errors import KdprobeError
from kdprobe.checkpoints.inputs import check_model_data, require_distinct, same_data
from kdprobe.models import create_model


def _app():
    import typer

    from cli.common import handle_errors
    from cli.diversity import diversity
    from cli.evaluate import evaluate
    from cli.landscape import interpolate, landscape

    app = typer.Typer()
    for name, fn in (("eval", evaluate), ("landscape", landscape), ("interpolate", interpolate),
                     ("diversity", diversity)):
        app.command(name)(handle_errors(fn))
    return app


def _run(*args):
    return CliRunner().invoke(_app(), [str(a) for a in args])


def _folder(root, seed, classes=("cat", "dog", "emu"), size=8, channels=3):
    """A tiny image folder (train 4/class, test 2/class) of seeded random PNGs."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    for split, n in (("train", 4), ("test", 2)):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                img = torch.randint(0, 256, (size, size, channels), generator=g, dtype=torch.uint8).numpy()
                Image.fromarray(img[:, :, 0] if channels == 1 else img).save(root / split / c / f"{i}.png")
    return root


def _ckpt(path, *, classes=10, channels=1, meta=None, seed=0):
    torch.manual_seed(seed)
    m = create_model("resnet8b", num_classes=classes, in_channels=channels, width=0.25)
    return save_checkpoint(path, m, {"method": "scratch", "seed": seed, **(meta or {})})


def _digits_meta():
    d = load_dataset("digits")
    return {"dataset": "digits", "input_shape": [1, 8, 8], "num_classes": 10, "data_fingerprint": d.fingerprint}


def _train(cfg_kw, out):
    from trainers.config import make_config
    from trainers.loop import train

    cfg = make_config("fast", model="resnet8b", model_kwargs={"width": 0.25}, epochs=1, batch_size=8, **cfg_kw)
    return train(cfg, out, device="cpu")


# ---- item 5: absolute paths and the dataset's content fingerprint ----

def test_fingerprint_names_the_content_not_the_place(tmp_path):
    a = _folder(tmp_path / "a", seed=0)
    shutil.copytree(a, tmp_path / "moved")
    b = _folder(tmp_path / "b", seed=1)
    da, dm, db = (load_dataset(f"imagefolder:{p}") for p in (a, tmp_path / "moved", b))
    assert da.fingerprint == dm.fingerprint != db.fingerprint
    # independently: sha256 over class names, then shape/dtype/bytes of each tensor in file order
    import hashlib

    import numpy as np
    from PIL import Image

    h = hashlib.sha256(b"kdprobe-data-v1\ncat\ndog\nemu\n")
    for split in ("train", "test"):
        files = sorted((a / split).glob("*/*.png"))
        x = torch.stack([torch.as_tensor(np.array(Image.open(f))).permute(2, 0, 1) for f in files])
        y = torch.tensor([("cat", "dog", "emu").index(f.parent.name) for f in files])
        for t in (x, y):
            h.update(f"{t.dtype}{tuple(t.shape)}\n".encode() + t.numpy().tobytes())
    assert da.fingerprint == h.hexdigest()
    assert load_dataset("digits").fingerprint == load_dataset("digits").fingerprint
    assert da.name == f"imagefolder:{a.resolve()}" and da.subset(n_train=3).fingerprint == da.fingerprint


def test_relative_imagefolder_is_recorded_absolute_and_other_data_refused(tmp_path, monkeypatch):
    _folder(tmp_path / "a" / "ifd", seed=0)
    _folder(tmp_path / "b" / "ifd", seed=1)  # same name, shapes and classes, other images
    monkeypatch.chdir(tmp_path / "a")
    _train({"dataset": "imagefolder:ifd"}, tmp_path / "ck.pt")
    meta = read_payload(tmp_path / "ck.pt")["meta"]
    assert meta["dataset"] == f"imagefolder:{(tmp_path / 'a' / 'ifd').resolve()}"
    assert meta["data_fingerprint"] == load_dataset("imagefolder:ifd").fingerprint
    here = _run("eval", tmp_path / "ck.pt", "--device", "cpu", "--split", "both")
    assert here.exit_code == 0, here.output

    monkeypatch.chdir(tmp_path / "b")  # from another folder: still the recorded data, same numbers
    there = _run("eval", tmp_path / "ck.pt", "--device", "cpu", "--split", "both")
    assert there.exit_code == 0 and there.output == here.output

    # the recorded folder now holds other images: refused, unless --dataset says to use it
    shutil.rmtree(tmp_path / "a" / "ifd")
    shutil.copytree(tmp_path / "b" / "ifd", tmp_path / "a" / "ifd")
    bad = _run("eval", tmp_path / "ck.pt", "--device", "cpu")
    assert bad.exit_code == 1 and "holds other data" in bad.output and "pass --dataset" in bad.output
    assert "internal error" not in bad.output
    ok = _run("eval", tmp_path / "ck.pt", "--device", "cpu", "--dataset", "imagefolder:ifd")
    assert ok.exit_code == 0 and "using it because --dataset was given" in ok.output

    # a checkpoint from before fingerprints (none recorded) keeps working as it did
    payload = read_payload(tmp_path / "ck.pt")
    old = {k: v for k, v in payload["meta"].items() if k != "data_fingerprint"}
    ck = load_checkpoint(tmp_path / "ck.pt")
    save_checkpoint(tmp_path / "old.pt", ck.model, old)
    assert _run("eval", tmp_path / "old.pt", "--device", "cpu").exit_code == 0


# ---- item 6: shapes, channels, classes and identity, before any work ----

@pytest.mark.parametrize("kind, words", [
    ("size", ["1-channel 16x16", "1-channel 8x8"]),
    ("channels", ["3-channel 8x8", "1-channel 8x8"]),
    ("classes", ["predicts 3 classes", "digits has 10"]),
])
def test_eval_and_landscape_refuse_a_model_that_does_not_fit_the_data(tmp_path, kind, words):
    meta = {"dataset": "imagefolder:/elsewhere", "num_classes": 10}
    if kind == "size":
        p = _ckpt(tmp_path / "m.pt", meta=dict(meta, input_shape=[1, 16, 16]))  # runs on 8x8 too (global pool)
    elif kind == "channels":
        p = _ckpt(tmp_path / "m.pt", channels=3, meta=dict(meta, input_shape=[3, 8, 8]))
    else:
        p = _ckpt(tmp_path / "m.pt", classes=3, meta=dict(meta, input_shape=[1, 8, 8], num_classes=3))
    for cmd in (["eval", p], ["landscape", p, "--out", tmp_path / "s.h5", "--x", "-1:1:2", "--y", "-1:1:2"],
                ["interpolate", p, p, "--out", tmp_path / "l.h5", "--steps", "2"]):
        res = _run(*cmd, "--dataset", "digits", "--device", "cpu")
        assert res.exit_code == 1, (cmd, res.output)
        assert all(w in res.output for w in words) and "internal error" not in res.output, res.output
        assert len([ln for ln in res.output.splitlines() if ln.startswith("error:")]) == 1
    assert not (tmp_path / "s.h5").exists() and not (tmp_path / "l.h5").exists()  # refused before any work


def test_foreign_checkpoint_is_probed_with_one_forward_pass(tmp_path):
    torch.manual_seed(0)
    m = create_model("resnet8b", num_classes=10, in_channels=3, width=0.25)
    torch.save(m.state_dict(), tmp_path / "foreign.pt")  # no recorded shape: only a forward pass can tell
    res = _run("eval", tmp_path / "foreign.pt", "--arch", "resnet8b", "--dataset", "digits", "--device", "cpu")
    assert res.exit_code == 1 and "forward pass on one sample failed" in res.output
    assert "1-channel 8x8" in res.output and "internal error" not in res.output


def test_check_model_data_directly_leaves_the_model_as_found(tmp_path):
    data = load_dataset("digits")
    ck = load_checkpoint(_ckpt(tmp_path / "m.pt", meta=_digits_meta()))
    ck.model.train()
    before = {k: v.clone() for k, v in ck.model.state_dict().items()}
    assert check_model_data(ck, data, explicit=False) is None
    assert ck.model.training and all(torch.equal(before[k], v) for k, v in ck.model.state_dict().items())
    other = load_checkpoint(_ckpt(tmp_path / "o.pt", meta=dict(_digits_meta(), data_fingerprint="0" * 64)))
    with pytest.raises(KdprobeError, match="holds other data.*pass --dataset digits"):
        check_model_data(other, data, explicit=False)
    assert "note:" in check_model_data(other, data, explicit=True)
    with pytest.raises(KdprobeError, match="teacher .* holds other data.*use a teacher trained on this dataset"):
        check_model_data(other, data, explicit=False, role="teacher")
    assert same_data(ck.meta, other.meta) is False and same_data(ck.meta, ck.meta) is True
    assert same_data({"dataset": "digits"}, {"dataset": "cifar10"}) is False
    assert same_data({"dataset": "imagefolder:x"}, {"dataset": "imagefolder:y"}) is None  # unknown: not refused


def test_teacher_or_init_from_other_data_with_the_same_shapes_is_refused(tmp_path):
    a, b = _folder(tmp_path / "a", seed=0), _folder(tmp_path / "b", seed=1)
    _train({"dataset": f"imagefolder:{a}"}, tmp_path / "t.pt")
    with pytest.raises(KdprobeError, match=r"teacher .*t\.pt was trained on .*a .* but .*b holds other data"):
        _train({"dataset": f"imagefolder:{b}", "distill": "label", "teacher": str(tmp_path / "t.pt")},
               tmp_path / "s.pt")
    with pytest.raises(KdprobeError, match=r"init .*t\.pt was trained on .*holds other data.*--init"):
        _train({"dataset": f"imagefolder:{b}", "init": str(tmp_path / "t.pt")}, tmp_path / "f.pt")
    assert not (tmp_path / "s.pt").exists() and not (tmp_path / "f.pt").exists()
    # the same data (here: the same folder) is fine
    _train({"dataset": f"imagefolder:{a}", "distill": "label", "teacher": str(tmp_path / "t.pt")}, tmp_path / "s.pt")


def test_diversity_checks_every_checkpoint_and_refuses_copies(tmp_path):
    meta = _digits_meta()
    p0 = _ckpt(tmp_path / "a.pt", meta=meta, seed=0)
    _ckpt(tmp_path / "b.pt", meta=meta, seed=1)
    shutil.copy(p0, tmp_path / "c.pt")  # n=3 from two trained models
    args = ["diversity", tmp_path / "*.pt", "--batch-size", "8", "--runs", "1", "--device", "cpu", "--reference",
            "none"]
    res = _run(*args)
    assert res.exit_code == 1 and "byte-identical" in res.output and "a.pt" in res.output and "c.pt" in res.output
    os.remove(tmp_path / "c.pt")
    assert _run(*args).exit_code == 0
    _ckpt(tmp_path / "d.pt", meta=dict(meta, data_fingerprint="f" * 64), seed=2)  # "digits", but other data
    res = _run(*args)
    assert res.exit_code == 1 and "one dataset" in res.output and "d.pt" in res.output


def test_require_distinct_names_both_files(tmp_path):
    class C:
        def __init__(self, path, sha256):
            self.path, self.sha256 = path, sha256

    require_distinct([C("a", "1"), C("b", "2")])
    with pytest.raises(KdprobeError, match="a and c are byte-identical"):
        require_distinct([C("a", "1"), C("b", "2"), C("c", "1")], "models")
