"""`python:MODULE:FACTORY`: the user's own model, imported from their module."""
from __future__ import annotations

import json
import sys
import textwrap

import pytest
import torch

from kdprobe.checkpoints.format import load_checkpoint, save_checkpoint
from kdprobe.errors import KdprobeError
from kdprobe.models import create_model
from kdprobe.models.registry import canonical_name, detectable_models, list_sources

USER_CODE = """
import torch.nn as nn


class TinyNet(nn.Module):
    def __init__(self, num_classes, in_channels=3, hidden=4):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, hidden, 3, padding=1)
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x):
        return self.fc(self.conv(x).relu().mean((2, 3)))


def build(num_classes, widths=(4,)):  # no in_channels: kdprobe must not pass one
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, widths[0]), nn.ReLU(), nn.Linear(widths[0], num_classes))


class Factories:
    @staticmethod
    def tiny(num_classes):
        return TinyNet(num_classes)


not_a_model = lambda num_classes: 42  # noqa: E731
"""


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    pkg = tmp_path / "userpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "MyModels.py").write_text(textwrap.dedent(USER_CODE))
    (pkg / "broken.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "userpkg.MyModels"
    for name in [m for m in sys.modules if m.startswith("userpkg")]:
        del sys.modules[name]


def test_user_class_builds_with_kwargs_and_in_channels(user_module, tmp_path):
    torch.manual_seed(0)
    name = f"python:{user_module}:TinyNet"
    assert canonical_name(name) == name  # case kept: module paths are case-sensitive
    m = create_model(name, num_classes=5, in_channels=1, hidden=6)
    assert m.conv.in_channels == 1 and m.conv.out_channels == 6 and m.fc.out_features == 5
    arch = json.loads(json.dumps(m.arch))
    assert arch == {"name": name, "kwargs": {"num_classes": 5, "in_channels": 1, "hidden": 6}}
    path = save_checkpoint(tmp_path / "u.pt", m, {"method": "scratch"})
    with pytest.raises(KdprobeError, match="never runs code a file names"):  # the file alone never imports it
        load_checkpoint(path)
    ck = load_checkpoint(path, arch=name)  # the user names the code: their choice
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(ck.model(x), m.eval()(x), rtol=0, atol=0)


def test_factory_without_in_channels_and_dotted_attribute(user_module):
    m = create_model(f"python:{user_module}:build", num_classes=3, widths=[7])
    assert m[1].out_features == 7 and m[3].out_features == 3
    assert create_model(f"python:{user_module}:Factories.tiny", num_classes=2).fc.out_features == 2


def test_bad_names_are_one_line_errors(user_module):
    cases = [("python:userpkg.NoSuchModule:x", "cannot import 'userpkg.NoSuchModule'"),
             ("python:userpkg.broken:x", "importing 'userpkg.broken' .* failed: ModuleNotFoundError: No module named 'no_such"),
             (f"python:{user_module}:Nope", "has no attribute 'Nope'"),
             (f"python:{user_module}:not_a_model", "returned a int"),
             ("python:just_a_module", "expected python:MODULE:FACTORY")]
    for name, msg in cases:
        with pytest.raises(KdprobeError, match=msg) as e:
            create_model(name, num_classes=2)
        assert "\n" not in str(e.value)
    with pytest.raises(KdprobeError, match="does not accept"):
        create_model(f"python:{user_module}:TinyNet", num_classes=2, depth=3)


def test_python_source_is_listed_but_never_detected():
    assert list_sources()["python"] == []
    assert not any(n.startswith("python:") for n in detectable_models())


def test_module_in_the_current_directory_is_found(tmp_path, monkeypatch):
    """`kdprobe` run as a console script does not have the current directory on sys.path."""
    (tmp_path / "cwd_models_xyz.py").write_text("import torch.nn as nn\n\ndef net(num_classes):\n"
                                                "    return nn.Linear(2, num_classes)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    try:
        assert create_model("python:cwd_models_xyz:net", num_classes=4).out_features == 4
        assert str(tmp_path) not in sys.path  # searched once, not left behind
    finally:
        sys.modules.pop("cwd_models_xyz", None)
