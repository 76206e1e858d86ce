"""Every command takes every checkpoint: --arch / --arch-kwargs for all files or per file (FILE=...),
auto-detection when neither is given, and --dataset / --image-size where data is read. The numbers
are checked against the reference models evaluated directly (kdprobe.probes.evaluate on the same tensors)."""
from __future__ import annotations

import json
import sys
import textwrap

import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from kdprobe.checkpoints.format import load_checkpoint, save_checkpoint
from kdprobe.data.datasets import load_dataset
from kdprobe.probes.evaluate import evaluate
from kdprobe.models import create_model
from kdprobe.data.preprocess import eval_resize

K = 3
USER = """
import torch.nn as nn


class Net(nn.Module):  # the user's own model: never auto-detected
    def __init__(self, num_classes, width=4):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU6())
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.head(self.body(x).mean((2, 3)))
"""


def _invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _folder(root, side=32, per_class=(4, 3)):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split, n in zip(("train", "test"), per_class):
        for c in range(K):
            d = root / split / f"c{c}"
            d.mkdir(parents=True)
            for i in range(n):
                img = torch.randint(0, 256, (side, side, 3), generator=g, dtype=torch.uint8).numpy()
                Image.fromarray(img).save(d / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    d = tmp_path_factory.mktemp("archs")
    _folder(d / "folder")
    torch.manual_seed(0)
    models = {"rd.pth": create_model("repdistiller:resnet8x4", num_classes=K),
              "l1.pth": create_model("resnet8a", num_classes=K, block_cfg=[3, 5, 7]),
              "tv.pth": create_model("torchvision:squeezenet1_1", num_classes=K)}
    torch.save({"epoch": 240, "model": models["rd.pth"].state_dict(), "best_acc": 71.0}, d / "rd.pth")  # RepDistiller
    torch.save({"cfg": [3, 5, 7], "state_dict": models["l1.pth"].state_dict()}, d / "l1.pth")  # l1-norm-pruning
    torch.save(models["tv.pth"].state_dict(), d / "tv.pth")  # torchvision users' torch.save(model.state_dict())
    (d / "usermods").mkdir()
    (d / "usermods" / "zoo_cli_user.py").write_text(textwrap.dedent(USER))
    sys.path.insert(0, str(d / "usermods"))
    import zoo_cli_user

    models["user.pth"] = zoo_cli_user.Net(K, width=5)
    torch.save(models["user.pth"].state_dict(), d / "user.pth")
    own = create_model("resnet8b", num_classes=K, width=0.25)
    save_checkpoint(d / "own.pt", own, {"method": "scratch", "dataset": f"imagefolder:{d / 'folder'}",
                                        "input_shape": [3, 32, 32], "num_classes": K})
    models["own.pt"] = own
    yield d, models
    sys.path.remove(str(d / "usermods"))
    sys.modules.pop("zoo_cli_user", None)


def _expected(model, data, size=None):
    """Test loss/accuracy of a reference model, its inputs resized by hand where it takes another size."""
    inner = model.eval()
    if size is None:
        return evaluate(inner, data.test_x, data.test_y, data.mean, data.std)

    class Resized(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.param = torch.nn.Parameter(torch.zeros(1))  # evaluate() reads the device off a parameter

        def forward(self, x):
            return inner(eval_resize(x, size))

    return evaluate(Resized().eval(), data.test_x, data.test_y, data.mean, data.std)


def test_eval_detects_each_file_or_takes_it_per_file(w):
    d, models = w
    ds = f"imagefolder:{d / 'folder'}"
    data = load_dataset(ds)
    r = _invoke("eval", d / "rd.pth", d / "l1.pth", d / "tv.pth", "--dataset", ds, "--json", d / "e.json")
    assert r.exit_code == 0, r.output
    rows = {row["checkpoint"]: row for row in json.loads((d / "e.json").read_text())["data"]}
    for name, size in (("rd.pth", None), ("l1.pth", None), ("tv.pth", 224)):  # torchvision: 224 by default
        want = _expected(models[name], data, size)
        assert rows[str(d / name)]["test_loss"] == pytest.approx(want.loss, rel=1e-5), name
        assert rows[str(d / name)]["test_acc"] == pytest.approx(want.acc)
    # the same files named one by one (a glob for the torchvision one), and the user's model, which
    # only a name can build; --image-size for all of them
    r = _invoke("eval", d / "rd.pth", d / "tv.pth", d / "user.pth", "--dataset", ds, "--json", d / "e2.json",
                "--arch", f"{d}/rd.pth=repdistiller:resnet8x4", "--arch", f"{d}/t*.pth=torchvision:squeezenet1_1",
                "--arch", f"{d / 'user.pth'}=python:zoo_cli_user:Net", "--arch-kwargs", f'{d / "user.pth"}={{"width": 5}}',
                "--image-size", "48")
    assert r.exit_code == 0, r.output
    rows = {row["checkpoint"]: row for row in json.loads((d / "e2.json").read_text())["data"]}
    for name in ("tv.pth", "user.pth"):
        assert rows[str(d / name)]["test_loss"] == pytest.approx(_expected(models[name], data, 48).loss, rel=1e-5)


@pytest.mark.parametrize("args, expected", [
    (["--arch", "{d}/rd.pth=repdistiller:wrn_16_2"], "does not fit architecture repdistiller:wrn_16_2"),
    (["--arch", "{d}/nothing.pth=repdistiller:wrn_16_2"], "names none of the checkpoints"),
    (["--arch", "resnet8a", "--arch", "resnet8b"], "expected one --arch NAME for every file"),
    (["--arch", "repdistiller:wrn_99_9"], "unknown model"),
    (["--arch-kwargs", "{{cfg: 1}}"], "JSON object"),
    (["--arch-kwargs", "[1, 2]"], "JSON object"),
    (["--arch-kwargs", "{d}/rd.pth=nonsense"], "JSON object"),
    (["--arch-kwargs", '{d}/own.pt={{"width": 0.5}}', "--arch", "{d}/rd.pth=repdistiller:resnet8x4"],
     "built with width=0.25, not 0.5; drop --arch-kwargs for kdprobe checkpoints"),
    (["--arch", "{d}/user.pth=python:zoo_cli_user:Net"], "does not fit"),  # its width is 5, not the default 4
    (["--image-size", "0"], "--image-size"),
    (["--image-size", "huge"], "--image-size"),
])
def test_mistakes_are_one_line(w, args, expected):
    d, _ = w
    files = [d / "rd.pth", d / "own.pt", d / "user.pth"] if "user" in " ".join(args) or "own" in " ".join(args) \
        else [d / "rd.pth"]
    r = _invoke("eval", *files, "--dataset", f"imagefolder:{d / 'folder'}", *[a.format(d=d) for a in args])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error: "), r.output
    assert expected in lines[0], lines[0]


def test_every_command_accepts_the_shared_options():
    import typer

    commands = typer.main.get_command(app).commands
    flags = {name: {o for p in cmd.params for o in p.opts} for name, cmd in commands.items() if hasattr(cmd, "params")}
    for command in ("eval", "info", "diversity", "landscape", "interpolate", "prune", "agreement", "cka",
                    "calibration", "sharpness"):
        assert {"--arch", "--arch-kwargs"} <= flags[command], command
        if command not in ("info", "prune"):  # the commands that read data
            assert {"--dataset", "--data-dir", "--image-size"} <= flags[command], command
    assert {"--teacher-arch", "--teacher-arch-kwargs", "--init-arch", "--init-arch-kwargs", "--model-kwargs",
            "--feature-layer", "--teacher-feature-layer", "--image-size", "--dataset", "--data-dir"} <= flags["train"]
    # one shared definition: the same help text everywhere
    helps = {next(p.help for p in cmd.params if "--arch" in p.opts) for name, cmd in commands.items()
             if name in ("eval", "info", "diversity", "landscape", "prune", "cka")}
    assert len(helps) == 1 and "IMPORTS AND RUNS" in helps.pop()


def test_probes_and_prune_take_foreign_files_without_arch(w, tmp_path):
    d, models = w
    ds = f"imagefolder:{d / 'folder'}"
    r = _invoke("info", d / "l1.pth")
    assert r.exit_code == 0 and "resnet8a" in r.output and "detected from the tensor names" in r.output, r.output
    assert "block_cfg': [3, 5, 7]" in r.output
    r = _invoke("calibration", d / "rd.pth", d / "l1.pth", "--dataset", ds, "--json", tmp_path / "c.json")
    assert r.exit_code == 0, r.output
    accs = {c["checkpoint"]: c["acc"] for c in json.loads((tmp_path / "c.json").read_text())["data"]["checkpoints"]}
    data = load_dataset(ds)
    assert accs[str(d / "rd.pth")] == pytest.approx(_expected(models["rd.pth"], data).acc)  # both fractions
    r = _invoke("prune", d / "rd.pth", "--method", "l1", "--remaining", "0.5", "--out", tmp_path / "p.pt")
    assert r.exit_code == 0, r.output
    pruned = load_checkpoint(tmp_path / "p.pt").model
    assert pruned.arch["name"] == "repdistiller:resnet8x4" and pruned.arch["kwargs"]["block_cfg"] == [32, 64, 128]
    r = _invoke("prune", d / "user.pth", "--arch", "python:zoo_cli_user:Net", "--arch-kwargs", '{"width": 5}',
                "--method", "weight", "--remaining", "0.5", "--out", tmp_path / "u.pt")
    assert r.exit_code == 0, r.output
    r = _invoke("prune", d / "user.pth", "--arch", "python:zoo_cli_user:Net", "--arch-kwargs", '{"width": 5}',
                "--method", "slimming", "--remaining", "0.5", "--out", tmp_path / "s.pt")
    assert r.exit_code == 1 and "slimming pruning supports vgg19_bn, rnp-slimming:vgg19" in r.stderr
