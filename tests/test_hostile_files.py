"""What a file may and may not make kdprobe do (issue 18): a checkpoint never chooses code, keys match by
name, a few kilobytes never make kdprobe allocate gigabytes, and a model whose outputs are nan/inf is
refused by the probes instead of being dropped from some of their columns.

Every refusal is one `error: ...` line with exit 1, no file in the folder changed (as in test_hostile.py).
"""
import hashlib
import math
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from kdprobe.checkpoints.format import load_checkpoint, read_payload, save_checkpoint
from kdprobe.errors import KdprobeError
from kdprobe.models import create_model
from kdprobe.models.registry import names_code, weight_budget

META = {"method": "scratch", "dataset": "digits", "input_shape": [1, 8, 8], "num_classes": 10, "seed": 0}
GRID = ["--x", "-1:1:2", "--y", "-1:1:2", "--samples", "16", "--device", "cpu", "--precision", "fp32"]
MODULE = "kdp_user_net"  # the user's own model code, written into the test folder
SOURCE = f"""
import pathlib
pathlib.Path("imported.marker").write_text("the module ran")  # a side effect: proves the import happened
import torch.nn as nn


def build(num_classes=10, in_channels=1):
    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * 64, num_classes))


def lazy(num_classes=10, in_channels=1):
    return nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes))
"""


def _invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _hashes(d: Path) -> dict:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "folder"
            for p in sorted(d.rglob("*")) if "__pycache__" not in p.parts}


def _one_line_error(r, expected: str) -> str:
    """Exit 1 and one `error:` line (progress bars and notes printed before the refusal may precede it)."""
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.exit_code == 1, (r.exit_code, r.output)
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], r.stderr
    assert "Traceback" not in r.output and "internal error" not in r.stderr
    assert expected in errors[0], errors[0]
    return errors[0]


def _forget_module():
    for name in [n for n in sys.modules if n == MODULE or n.startswith(MODULE + ".")]:
        del sys.modules[name]


@pytest.fixture
def folder(tmp_path, monkeypatch):
    """A folder holding the user's module, a checkpoint of it (made by importing it, as the user would), an
    ordinary checkpoint, and a victim file; cwd is the folder (the python: source looks there)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / f"{MODULE}.py").write_text(SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "user.pt", create_model(f"python:{MODULE}:build", num_classes=10, in_channels=1),
                    META)
    torch.manual_seed(1)
    save_checkpoint(tmp_path / "other.pt", create_model(f"python:{MODULE}:build", num_classes=10, in_channels=1),
                    META)
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "plain.pt", create_model("resnet8a", num_classes=10, in_channels=1, width=0.25), META)
    good = read_payload(tmp_path / "user.pt")
    torch.save({**good, "arch": {"name": "python:logging:basicConfig",
                                 "kwargs": {"filename": str(tmp_path / "victim.txt"), "filemode": "w"}}},
               tmp_path / "logging.pt")
    (tmp_path / "victim.txt").write_text("precious\n")
    (tmp_path / "imported.marker").unlink()
    _forget_module()
    monkeypatch.syspath_prepend("/nonexistent-kdprobe-test")  # sys.path restored after the test
    sys.path.remove(str(tmp_path))
    yield tmp_path
    _forget_module()


REFUSED = [
    "info {d}/user.pt",
    "info {d}/logging.pt",
    "eval {d}/user.pt",
    "landscape {d}/user.pt --out {d}/s.vtk " + " ".join(GRID),
    "interpolate {d}/user.pt {d}/other.pt --out {d}/p.h5 --steps 2 " + " ".join(GRID[4:]),
    "diversity {d}/user.pt {d}/other.pt",
    "calibration {d}/user.pt",
    "agreement {d}/user.pt {d}/other.pt",
    "cka {d}/user.pt {d}/other.pt",
    "sharpness {d}/user.pt --samples 16",
    "prune {d}/user.pt --method weight --remaining 0.5 --out {d}/n.pt",
    "train --distill label --teacher {d}/user.pt --epochs 1 --out {d}/n.pt",
    "train --init {d}/user.pt --epochs 1 --out {d}/n.pt",
]


@pytest.mark.parametrize("line", REFUSED, ids=[c.split()[0] + ":" + c.split()[1].split("/")[-1] for c in REFUSED])
def test_a_checkpoint_never_chooses_code(folder, line):
    before = _hashes(folder)
    r = _invoke(*line.format(d=folder).split())
    msg = _one_line_error(r, "never runs code a file names")
    flag = "--teacher-arch" if "--teacher" in line else "--init-arch" if "--init" in line else "--arch"
    assert f"pass {flag} python:" in msg  # says how to choose it explicitly
    assert not (folder / "imported.marker").exists()  # the module was never imported ...
    assert MODULE not in sys.modules
    assert (folder / "victim.txt").read_text() == "precious\n"  # ... and no function was called
    assert _hashes(folder) == before


def test_the_same_architecture_typed_by_the_user_is_honoured(folder):
    r = _invoke("info", folder / "user.pt", "--arch", f"python:{MODULE}:build")
    assert r.exit_code == 0, r.output
    assert (folder / "imported.marker").exists()  # the user's explicit choice imports their module
    ck = load_checkpoint(folder / "user.pt", arch=f"python:{MODULE}:build")
    assert ck.model.arch["name"] == f"python:{MODULE}:build"
    # another python: name than the file's is not a licence for the file's own
    with pytest.raises(KdprobeError, match="never runs code"):
        load_checkpoint(folder / "logging.pt", arch=f"python:{MODULE}:build")
    assert (folder / "victim.txt").read_text() == "precious\n"


def test_names_code_is_decided_without_importing():
    assert names_code("python:nosuchmodule_xyz:build") and names_code(" Python : a.b:c ")
    assert not names_code("resnet8a") and not names_code("torchvision:resnet18") and not names_code(None)
    assert "nosuchmodule_xyz" not in sys.modules


def test_lazy_modules_are_refused_with_a_message(folder):
    sys.path.insert(0, str(folder))
    try:
        with pytest.raises(KdprobeError, match="uninitialized lazy parameter '1.weight'"):
            create_model(f"python:{MODULE}:lazy", num_classes=10, in_channels=1)
    finally:
        sys.path.remove(str(folder))
    r = _invoke("train", "--model", f"python:{MODULE}:lazy", "--epochs", "1", "--out", folder / "n.pt")
    _one_line_error(r, "lazy parameter")
    assert not (folder / "n.pt").exists()


# ---- keys by name, never by position ------------------------------------------------------------------

def test_a_renamed_key_with_arch_is_an_error_not_a_load_by_position(tmp_path):
    model = create_model("resnet8a", num_classes=10, in_channels=1, width=0.25)
    sd = model.state_dict()
    # swap the names of a BN layer's weight and bias through a rename: same shapes, same order of shapes
    renamed = {("bn1.scale" if k == "bn1.weight" else k): v for k, v in sd.items()}
    torch.save(renamed, tmp_path / "renamed.pt")
    with pytest.raises(KdprobeError) as e:
        load_checkpoint(tmp_path / "renamed.pt", arch="resnet8a", arch_kwargs={"width": 0.25})
    assert "'bn1.weight'" in str(e.value) and "'bn1.scale'" in str(e.value) and "by name" in str(e.value)
    r = _invoke("eval", tmp_path / "renamed.pt", "--arch", "resnet8a", "--arch-kwargs", '{"width": 0.25}',
                "--dataset", "digits")
    _one_line_error(r, "missing key 'bn1.weight'")


def test_keys_that_collide_after_prefix_stripping_are_an_error(tmp_path):
    sd = create_model("resnet8a", num_classes=10, in_channels=1, width=0.25).state_dict()
    torch.save({**sd, "module.fc.bias": sd["fc.bias"] + 1}, tmp_path / "dup.pt")
    r = _invoke("info", tmp_path / "dup.pt")
    _one_line_error(r, "'fc.bias' and 'module.fc.bias' are both 'fc.bias'")


@pytest.mark.parametrize("key", [3, (1, 2), b"fc.bias"])
def test_state_dicts_with_non_string_keys_are_refused(tmp_path, key):
    sd = create_model("resnet8a", num_classes=10, in_channels=1, width=0.25).state_dict()
    torch.save({**sd, key: torch.zeros(1)}, tmp_path / "keys.pt")
    r = _invoke("info", tmp_path / "keys.pt")
    _one_line_error(r, "expected tensor names (strings)")


# ---- a file cannot make kdprobe allocate what it does not hold -----------------------------------------

def _stride0_classes(n: int, width: int) -> torch.Tensor:
    """A (n, width) tensor stored as `width` floats: every row is the same storage (stride 0)."""
    return torch.zeros(1, width).expand(n, width)


def test_a_tiny_file_declaring_1e8_classes_is_refused_before_allocating(tmp_path):
    model = create_model("resnet8a", num_classes=10, in_channels=1, width=0.25)
    sd = dict(model.state_dict())
    width = sd["fc.weight"].shape[1]
    sd["fc.weight"], sd["fc.bias"] = _stride0_classes(10**8, width), torch.zeros(1).expand(10**8)
    torch.save(sd, tmp_path / "bare.pt")  # foreign: the classes are read off the tensors' shapes
    good = model.state_dict()
    torch.save({"format": "kdprobe-checkpoint", "format_version": 2,
                "arch": {"name": "resnet8a", "kwargs": {**model.arch["kwargs"], "num_classes": 10**8}},
                "state_dict": {**good, "fc.weight": _stride0_classes(10**8, width),
                               "fc.bias": torch.zeros(1).expand(10**8)},
                "meta": META, "extra": {}}, tmp_path / "native.pt")
    assert (tmp_path / "native.pt").stat().st_size < 2**20  # the declared tensors are 25+ GB
    for name in ("bare.pt", "native.pt"):
        r = _invoke("info", tmp_path / name)
        msg = _one_line_error(r, "can justify")
        assert "GiB" in msg


def test_the_budget_is_what_the_file_holds_and_what_memory_is_free(tmp_path, monkeypatch):
    with weight_budget(1000, "a test budget"):
        with pytest.raises(KdprobeError, match="more than a test budget can justify"):
            create_model("resnet8a", num_classes=10, in_channels=1)
    import kdprobe.models.registry as reg

    monkeypatch.setattr(reg, "available_memory", lambda: 1000)  # pretend 1,000 bytes are free
    with pytest.raises(KdprobeError, match="of memory free now"):
        create_model("resnet8a", num_classes=10, in_channels=1)


@pytest.mark.parametrize("cfg, expected", [([[16, 16], [32]], "cannot rebuild its model"), ([2**62] * 3, "")])
def test_hostile_cfg_lists_are_one_line(tmp_path, cfg, expected):
    model = create_model("vgg19_bn", num_classes=10, in_channels=3, width=0.125)
    torch.save({"state_dict": model.state_dict(), "cfg": cfg}, tmp_path / "cfg.pt")
    r = _invoke("info", tmp_path / "cfg.pt", "--arch", "rnp-slimming:vgg19")
    _one_line_error(r, expected)


@pytest.mark.parametrize("meta, field", [({"input_shape": [3, 10**6, 10**6]}, "meta.input_shape"),
                                         ({"input_shape": [10**5, 8, 8]}, "meta.input_shape"),
                                         ({"image_size": 10**7}, "meta.image_size"),
                                         ({"image_size": -3}, "meta.image_size")])
def test_sizes_a_file_declares_are_bounded(tmp_path, meta, field):
    save_checkpoint(tmp_path / "a.pt", create_model("resnet8a", num_classes=10, in_channels=1, width=0.25),
                    {**META, **meta})
    _one_line_error(_invoke("info", tmp_path / "a.pt"), field)


# ---- finite weights, non-finite outputs ---------------------------------------------------------------

@pytest.fixture
def overflow(tmp_path):
    """A checkpoint whose weights are all finite but whose first logit overflows to inf on most inputs."""
    torch.manual_seed(0)
    model = create_model("resnet8a", num_classes=10, in_channels=1, width=0.25)
    with torch.no_grad():
        model.fc.bias[0] = 3.0e38
        model.fc.weight[0] = 1.0e37
    assert all(bool(torch.isfinite(v).all()) for v in model.state_dict().values() if v.is_floating_point())
    save_checkpoint(tmp_path / "inf.pt", model, META)
    torch.manual_seed(1)
    save_checkpoint(tmp_path / "ok.pt", create_model("resnet8a", num_classes=10, in_channels=1, width=0.25), META)
    return tmp_path


@pytest.mark.parametrize("command", ["calibration {d}/inf.pt {d}/ok.pt", "agreement {d}/ok.pt {d}/inf.pt",
                                     "sharpness {d}/ok.pt {d}/inf.pt --samples 16 --trace-samples 2 --iterations 2"])
def test_a_model_with_nonfinite_outputs_is_refused_by_name(overflow, command):
    before = _hashes(overflow)
    msg = _one_line_error(_invoke(*command.format(d=overflow).split(), "--samples", "64"), "nan/inf")
    assert "inf.pt" in msg
    assert _hashes(overflow) == before


# ---- CKA stays within its mathematical bounds -----------------------------------------------------------

def test_cka_of_a_model_and_its_offset_copy_is_at_most_one():
    from kdprobe.probes.cka import CkaCache, linear_cka

    torch.manual_seed(0)
    x = torch.randn(300, 10, dtype=torch.float64)
    for estimator in ("exact", "minibatch"):
        v = linear_cka(x, x + 1e4, estimator=estimator, batch_size=64)
        # the offset copy is the same representation: CKA 1 up to float64 rounding of sums of 300 terms
        assert v <= 1.0 and abs(v - 1.0) < 300 * 1e4 * torch.finfo(torch.float64).eps, (estimator, v)

    class Offset(torch.nn.Module):
        def __init__(self, shift):
            super().__init__()
            self.lin, self.shift = torch.nn.Linear(64, 10), shift

        def forward(self, z):
            return self.lin(z.flatten(1)) + self.shift

    torch.manual_seed(0)
    a = Offset(0.0)
    b = Offset(1e4)
    b.lin.load_state_dict(a.lin.state_dict())
    images = torch.rand(200, 1, 8, 8)
    for estimator in ("exact", "minibatch"):
        cache = CkaCache(images, estimator=estimator, batch_size=50)
        cache.add("a", torch.nn.Sequential(a, torch.nn.Identity(), torch.nn.Linear(10, 10)), layer="0")
        cache.add("b", torch.nn.Sequential(b, torch.nn.Identity(), torch.nn.Linear(10, 10)), layer="0")
        v = cache.cka("a", "b")
        # the +1e4 logits are rounded to float32 (ulp 1e-3 at 1e4), so they agree with a's to ~1e-7 relative
        assert v <= 1.0 and v > 1 - 1e-5, (estimator, v)


def test_cka_is_bounded_on_random_features_of_every_kind():
    from kdprobe.probes.cka import linear_cka

    g = torch.Generator().manual_seed(0)
    for trial in range(40):
        n, p, q = 8 + trial, 1 + trial % 5, 1 + trial % 3
        x = torch.randn(n, p, generator=g, dtype=torch.float64) * 10 ** (trial % 7)
        y = x[:, :1].repeat(1, q) + 1e-3 * torch.randn(n, q, generator=g, dtype=torch.float64) + 1e3 * trial
        for est in ("exact", "minibatch"):
            v = linear_cka(x, y, estimator=est, batch_size=max(4, n // 2))
            assert math.isnan(v) or -1.0 <= v <= 1.0


def test_an_hdf5_file_declaring_more_than_it_holds_is_refused_before_reading(tmp_path):
    import h5py

    torch.manual_seed(0)
    save_checkpoint(tmp_path / "a.pt", create_model("resnet8a", num_classes=10, in_channels=1, width=0.25), META)
    r = _invoke("landscape", tmp_path / "a.pt", "--out", tmp_path / "s.vtk", *GRID)
    assert r.exit_code == 0, r.output
    with h5py.File(tmp_path / "s.h5", "a") as f:  # 8 TB declared, nothing written: the file stays small
        f.create_dataset("xdirection/huge", shape=(10**6, 10**6), dtype="f8", chunks=(64, 64))
    before = _hashes(tmp_path)
    r = _invoke("landscape", tmp_path / "a.pt", "--out", tmp_path / "t.vtk", "--directions", tmp_path / "s.h5", *GRID)
    msg = _one_line_error(r, "declares")
    assert "'xdirection/huge'" in msg
    assert _hashes(tmp_path) == before


@pytest.mark.parametrize("args, expected", [
    (["--width", "1e308"], "--width"),
    (["--model-kwargs", '{"width": 1e300}'], "<= 10000"),
    (["--model", "vgg19_bn", "--model-kwargs", '{"cfg": [1e30]}'], "cannot be built"),
    (["--model", "vgg19_bn", "--model-kwargs", '{"cfg": [4611686018427387904, "M"]}'], "cannot be built"),
])
def test_model_arguments_beyond_what_can_be_built_are_one_line(tmp_path, args, expected):
    r = _invoke("train", *args, "--epochs", "1", "--out", tmp_path / "n.pt")
    _one_line_error(r, expected)
    assert not any(tmp_path.iterdir())


def test_a_deeply_nested_json_file_at_an_output_path_is_told_apart_without_recursion(tmp_path):
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "a.pt", create_model("resnet8a", num_classes=10, in_channels=1, width=0.25), META)
    (tmp_path / "deep.json").write_text("[" * 30000 + "]" * 30000)
    before = _hashes(tmp_path)
    _one_line_error(_invoke("eval", tmp_path / "a.pt", "--json", tmp_path / "deep.json"), "deep.json")
    assert _hashes(tmp_path) == before
