"""`kdprobe train --config FILE.toml` and `--print-config` (trainers/train_file.py): the printed file trains the
same bits as the flags it was printed from and prints itself again; defaults < preset < file < typed flags; a
file's teachers are checkpoint paths; a file never chooses code to run nor the output; a bad file is one
`error:` line before any work."""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import kdprobe
from cli.main import app
from kdprobe.checkpoints.format import load_checkpoint, read_payload
from trainers.config import PRESETS, TrainConfig
from trainers.train_file import read_train_file, to_toml

# a tiny run: one epoch of a quarter-width ResNet-8 on 64 digits images (about a second on 2 cores)
TINY = ["--model", "resnet8b", "--width", "0.25", "--preset", "fast", "--epochs", "1", "--train-subset", "64",
        "--device", "cpu", "--quiet"]
MODULE = "kdp_train_file_net"  # the user's own model code, written into the test folder
SOURCE = """
import pathlib
pathlib.Path("imported.marker").write_text("the module ran")  # a side effect: proves the import happened
import torch.nn as nn


def build(num_classes=10, in_channels=1):
    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * 64, num_classes))
"""


def _invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _ok(*args) -> str:
    r = _invoke(*args)
    assert r.exit_code == 0, r.output
    return r.stdout


def _print_config(*args) -> str:
    return _ok("train", *args, "--print-config")


def _state(path) -> dict:
    return read_payload(path)["state_dict"]


def _same_weights(a, b) -> bool:
    sa, sb = _state(a), _state(b)
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _hashes(d: Path) -> dict:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "folder"
            for p in sorted(d.rglob("*")) if "__pycache__" not in p.parts}


def _refused(folder: Path, args, *expected: str) -> str:
    """`kdprobe ARGS` fails with one `error:` line holding every `expected` text, no traceback, nothing written."""
    before = _hashes(folder)
    r = _invoke(*args)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.exit_code == 1, (r.exit_code, r.output)
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.output and "internal error" not in r.stderr
    for text in expected:
        assert text in lines[0], lines[0]
    assert _hashes(folder) == before
    return lines[0]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A tiny trained checkpoint: the teacher of the KD runs here, and an --init checkpoint."""
    path = tmp_path_factory.mktemp("teacher") / "t.pt"
    _ok("train", *TINY, "--seed", "5", "--out", path)
    return path


# ---- the round trip -------------------------------------------------------------------------------------

def test_printed_config_prints_itself_and_trains_the_same_bits(tmp_path):
    text = _print_config(*TINY, "--seed", "3")
    (tmp_path / "f.toml").write_text(text)
    assert _print_config("--config", tmp_path / "f.toml") == text
    flags = dict(model="resnet8b", width=0.25, preset="fast", epochs=1, train_subset=64, seed=3)
    from_flags, from_file = kdprobe.train_config(**flags), kdprobe.train_config(config=tmp_path / "f.toml")
    assert from_file == from_flags and from_file.fingerprint() == from_flags.fingerprint()
    assert kdprobe.train_config_toml(**flags) == text
    # fully resolved: every schedule setting is in the file, so it depends on no preset's values
    tree = read_train_file(tmp_path / "f.toml").fields
    assert {k: tree[k] for k in PRESETS["fast"]} == {k: getattr(from_flags, k) for k in PRESETS["fast"]}
    _ok("train", *TINY, "--seed", "3", "--out", tmp_path / "flags.pt")
    _ok("train", "--config", tmp_path / "f.toml", "--device", "cpu", "--quiet", "--out", tmp_path / "file.pt")
    assert _same_weights(tmp_path / "flags.pt", tmp_path / "file.pt")
    meta = load_checkpoint(tmp_path / "file.pt").meta
    assert TrainConfig.from_dict(meta["config"]).fingerprint() == from_flags.fingerprint()


def test_every_kind_of_value_round_trips_exactly(tmp_path):
    """Floats by their exact repr, strings with quotes, backslashes and non-ASCII, lists, inline tables, bools."""
    args = ["--model", "resnet8b", "--model-kwargs", '{"width": 0.3333333333333333}', "--data-dir",
            'data "x"\\ünï\tcode', "--lr", "0.123456789012345678", "--weight-decay", "1e-05", "--schedule", "step",
            "--milestones", "0.3,0.6", "--nesterov", "--image-size", "native", "--distill", "dkd", "--teacher", "a.pt",
            "--teacher-arch-kwargs", '{"odd key": [1, 2.5, {"s": "q\\"\\u0001"}], "b": true}',
            "--kd-settings", '{"beta": 6.5}', "--seed", str(2**63 - 1), "--augment", "cutmix", "--cutmix-beta",
            "0.25", "--bn-sparsity", "1e-4"]
    text = _print_config(*args)
    (tmp_path / "f.toml").write_text(text)
    assert _print_config("--config", tmp_path / "f.toml") == text
    a, b = kdprobe.train_config(config=tmp_path / "f.toml"), kdprobe.train_config(
        model="resnet8b", model_kwargs={"width": 1 / 3}, data_dir='data "x"\\ünï\tcode',
        teacher_arch_kwargs={"odd key": [1, 2.5, {"s": 'q"\x01'}], "b": True},
        lr=0.123456789012345678, weight_decay=1e-5, schedule="step", milestones=[0.3, 0.6], nesterov=True,
        image_size="native", distill="dkd", teacher="a.pt", kd_settings={"beta": 6.5}, seed=2**63 - 1,
        augment="cutmix", cutmix_beta=0.25, bn_sparsity=1e-4)
    assert a == b and a.fingerprint() == b.fingerprint()
    assert a.lr == 0.123456789012345678 and a.image_size == 0 and a.milestones == (0.3, 0.6)


# ---- precedence: defaults < preset < file < typed flags ------------------------------------------------

def test_file_beats_preset_and_typed_flags_beat_the_file(tmp_path):
    (tmp_path / "f.toml").write_text('seed = 4\n[train]\nmodel = "resnet8b"\npreset = "rnp"\n'
                                     "overrides = { epochs = 3, lr = 0.2 }\n"
                                     '[method]\naugment = "cutmix"\noverrides = { cutmix_prob = 0.25 }\n')
    f = tmp_path / "f.toml"
    cfg = kdprobe.train_config(config=f)
    assert (cfg.epochs, cfg.lr) == (3, 0.2)  # the file over the preset
    assert (cfg.schedule, cfg.milestones, cfg.weight_decay) == ("step", (0.5, 0.75), 1e-4)  # the preset's
    assert (cfg.seed, cfg.augment, cfg.cutmix_prob, cfg.cutmix_beta) == (4, "cutmix", 0.25, 1.0)  # file; default
    typed = kdprobe.train_config(config=f, epochs=1, seed=0, augment="standard", preset="cutmix")
    assert (typed.epochs, typed.seed, typed.augment) == (1, 0, "standard")  # typed over the file
    assert (typed.preset, typed.lr, typed.nesterov) == ("cutmix", 0.2, True)  # the typed preset under the file
    # the same through the command line
    printed = read_train_file(_write(tmp_path / "p.toml", _print_config("--config", f, "--epochs", "1")))
    assert printed.fields["epochs"] == 1 and printed.fields["lr"] == 0.2 and printed.fields["seed"] == 4


def test_a_typed_flag_overrides_a_printed_file_and_trains_as_typed(tmp_path):
    (tmp_path / "f.toml").write_text(_print_config(*TINY, "--epochs", "3"))
    text = _print_config("--config", tmp_path / "f.toml", "--epochs", "1")
    assert "epochs = 1\n" in text and "epochs = 3" not in text
    _ok("train", "--config", tmp_path / "f.toml", "--epochs", "1", "--out", tmp_path / "a.pt", "--quiet")
    assert load_checkpoint(tmp_path / "a.pt").meta["config"]["epochs"] == 1


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ---- teachers from the file ------------------------------------------------------------------------------

def test_teacher_path_from_the_file_teaches(tmp_path, teacher):
    text = _print_config(*TINY, "--distill", "label", "--teacher", teacher, "--seed", "1")
    assert f'teacher = "{teacher}"' in text and 'name = "kd-label"' in text
    f = _write(tmp_path / "kd.toml", text)
    _ok("train", "--config", f, "--out", tmp_path / "kd.pt", "--quiet")
    _ok("train", *TINY, "--distill", "label", "--teacher", teacher, "--seed", "1", "--out", tmp_path / "flags.pt")
    assert _same_weights(tmp_path / "kd.pt", tmp_path / "flags.pt")
    meta = load_checkpoint(tmp_path / "kd.pt").meta
    assert meta["method"] == "kd-label" and meta["config"]["teacher"] == str(teacher)
    assert meta["teacher"]["sha256"] == hashlib.sha256(teacher.read_bytes()).hexdigest()


def test_a_list_of_teachers_is_an_ensemble_and_a_typed_teacher_replaces_them(tmp_path):
    f = _write(tmp_path / "ens.toml", '[method]\ndistill = "label"\nteacher = ["runs/a.pt", "runs/b.pt/", "c.pt"]\n')
    cfg = kdprobe.train_config(config=f)
    assert cfg.teachers == ("runs/a.pt", "runs/b.pt", "c.pt") and cfg.method == "kd-label+ens3"
    text = _print_config("--config", f)
    assert 'teacher = ["runs/a.pt", "runs/b.pt", "c.pt"]' in text
    assert _print_config("--config", _write(tmp_path / "again.toml", text)) == text
    assert kdprobe.train_config(config=f, teacher="d.pt").teachers == ("d.pt",)


def test_a_born_again_chain_prints_without_its_generation_0(tmp_path):
    text = _print_config(*TINY, "--distill", "label", "--generations", "2")
    assert "generations = 2\n" in text and "teacher" not in text.replace("teacher_", "")
    f = _write(tmp_path / "ba.toml", text)
    assert _print_config("--config", f) == text
    with pytest.raises(kdprobe.KdprobeError, match="pass out="):
        kdprobe.train_config(config=f)
    assert kdprobe.train_config(config=f, out=tmp_path / "ba.pt").teacher == str(tmp_path / "ba-gen0.pt")


def test_init_checkpoint_gives_the_model_in_a_file_too(tmp_path, teacher):
    text = _print_config("--init", teacher, "--epochs", "1", "--preset", "finetune")
    assert f'init = "{teacher}"' in text and "model =" not in text
    f = _write(tmp_path / "ft.toml", text)
    assert _print_config("--config", f) == text
    assert kdprobe.train_config(config=f).model == "resnet8b"
    _refused(tmp_path, ["train", "--config", f, "--model", "resnet8b", "--out", tmp_path / "n.pt"],
             "--init", "gives the model", "drop --model")


# ---- a file never chooses code, nor the output -----------------------------------------------------------

@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """The user's model module in the test folder (cwd), importable; importing it leaves imported.marker."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / f"{MODULE}.py").write_text(SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield f"python:{MODULE}:build"
    sys.modules.pop(MODULE, None)


CODE_FILES = {  # key -> (the file, the flag that may name it)
    "train.model": ('[train]\nmodel = "{code}"\n', "--model"),
    "method.overrides.teacher_arch": ('[method]\ndistill = "label"\nteacher = "t.pt"\n'
                                      'overrides = {{ teacher_arch = "{code}" }}\n', "--teacher-arch"),
    "train.overrides.init_arch": ('[train.overrides]\ninit = "t.pt"\ninit_arch = "{code}"\n', "--init-arch"),
}


@pytest.mark.parametrize("key", CODE_FILES)
def test_a_file_naming_code_is_refused_before_any_import(tmp_path, user_module, key):
    text, flag = CODE_FILES[key]
    f = _write(tmp_path / "code.toml", text.format(code=user_module))
    for extra in ([], ["--print-config"]):
        msg = _refused(tmp_path, ["train", "--config", f, "--out", tmp_path / "n.pt", *extra],
                       f"code.toml: {key}: ", "names code", f"on the command line instead: {flag} {user_module}")
        assert len(msg) < 400
    assert not (tmp_path / "imported.marker").exists() and MODULE not in sys.modules
    with pytest.raises(kdprobe.KdprobeError, match=f"{flag} "):
        kdprobe.train_config(config=f)


def test_the_same_code_name_typed_on_the_command_line_is_honoured(tmp_path, user_module):
    f = _write(tmp_path / "code.toml", CODE_FILES["train.model"][0].format(code=user_module)
               + "[train.overrides]\nepochs = 1\ntrain_subset = 64\n")
    _ok("train", "--config", f, "--model", user_module, "--quiet", "--device", "cpu", "--out", tmp_path / "u.pt")
    assert (tmp_path / "imported.marker").exists()
    assert load_checkpoint(tmp_path / "u.pt", arch=user_module).meta["config"]["model"] == user_module
    # printed, the name stays in the file: reading it again needs it typed again
    text = _print_config("--config", f, "--model", user_module)
    assert f'model = "{user_module}"' in text
    assert _print_config("--config", _write(tmp_path / "p.toml", text), "--model", user_module) == text


def test_the_output_never_comes_from_the_file_and_is_needed_to_train(tmp_path):
    f = _write(tmp_path / "out.toml", 'out = "run.pt"\n[train]\nmodel = "resnet8b"\n')
    _refused(tmp_path, ["train", "--config", f], "out.toml: out: unknown key", "seed, train, method")
    ok = _write(tmp_path / "ok.toml", '[train]\nmodel = "resnet8b"\n')
    _refused(tmp_path, ["train", "--config", ok], "--out is missing", "--print-config")
    _refused(tmp_path, ["train", "--model", "resnet8b"], "--out is missing")


# ---- bad files: one line naming the file, the key and the fix, before any work ---------------------------

BAD = {  # name -> (file text, what the one error line says)
    "syntax": ('[train\nmodel = "resnet8b"\n', ["bad.toml: expected valid TOML", "fix the file"]),
    "unknown key": ('[train]\nmodle = "resnet8b"\n', ["bad.toml: train.modle: unknown key", "model, model_kwargs"]),
    "unknown override": ("[train.overrides]\nepoch = 3\n", ["train.overrides.epoch: unknown key", "epochs"]),
    "unknown table": ("[methods]\nname = 'x'\n", ["bad.toml: methods: unknown key", "method"]),
    "wrong type": ('[train.overrides]\nepochs = "3"\n', ["train.overrides.epochs: expected an integer >= 1",
                                                        "got '3'; fix the file"]),
    "wrong type bool": ("[train.overrides]\nnesterov = 1\n", ["train.overrides.nesterov: expected true or false"]),
    "not a table": ("method = 3\n", ["bad.toml: method: expected a table ([method]), got 3"]),
    "out of range": ("[method.overrides]\nalpha = 1.5\n", ["method.overrides.alpha: expected a finite number >= 0"]),
    "bad choice": ('[method]\naugment = "mixup"\n', ["method.augment: expected one of standard, cutmix"]),
    "bad preset": ('[train]\npreset = "imagenet"\n', ["train.preset: expected one of repdistiller"]),
    "bad milestones": ("[train.overrides]\nmilestones = [0.5, 1.5]\n", ["train.overrides.milestones: expected a list"]),
    "own key": ("[train.overrides]\nteacher = 't.pt'\n", ["train.overrides.teacher: set by its own key, "
                                                          "method.teacher; move it there"]),
    "empty teachers": ("[method]\nteacher = []\n", ["method.teacher: expected a teacher checkpoint's path"]),
    "seed": ("seed = -1\n", ["bad.toml: seed: expected an integer >= 0"]),
    "generations": ("[method]\ngenerations = 101\n", ["method.generations: expected an integer >= 0 and <= 100"]),
    "whole config": ('[method]\ndistill = "label"\n', ["bad.toml: --distill label needs a teacher"]),
    "nan": ("[train.overrides]\nlr = nan\n", ["bad.toml: expected a finite number"]),
}


@pytest.mark.parametrize("name", BAD)
def test_a_bad_file_is_one_line_naming_the_file_and_key(tmp_path, name):
    text, expected = BAD[name]
    f = _write(tmp_path / "bad.toml", text)
    for extra in (["--out", tmp_path / "n.pt"], ["--print-config"]):
        _refused(tmp_path, ["train", "--config", f, *extra], *expected)


def test_a_missing_or_non_utf8_file_is_one_line(tmp_path):
    _refused(tmp_path, ["train", "--config", tmp_path / "none.toml", "--print-config"], "none.toml")
    (tmp_path / "utf16.toml").write_bytes("seed = 1\n".encode("utf-16"))
    _refused(tmp_path, ["train", "--config", tmp_path / "utf16.toml", "--print-config"], "UTF-8")


def test_the_built_in_defaults_are_written_whole_and_read_back(tmp_path):
    """No preset: the dataclass's own schedule is written out, and an empty file is the same run."""
    from trainers.train_file import TrainRun

    text = to_toml(TrainRun(TrainConfig()))
    assert "preset" not in text and "\nepochs = 15\n" in text and "milestones = []" in text
    assert kdprobe.train_config(config=_write(tmp_path / "d.toml", text)) == TrainConfig()
    assert kdprobe.train_config(config=_write(tmp_path / "empty.toml", "")) == TrainConfig()
    assert _print_config() == text
