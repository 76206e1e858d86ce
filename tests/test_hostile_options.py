"""Hostile option values, JSON and TOML: every one a single line `error: ...` with exit 1 before any
work and nothing in the folder touched (the rule of test_hostile.py), plus what --help prints and how a
closed stdout ends a command.

The classes, each with a generated or hand-written row per instance:
- JSON in options (--arch-kwargs, --model-kwargs, --*-arch-kwargs), TOML in `--set` values and study
  specs, JSON summaries given to `compare`: nesting 30,000 deep, numbers of 5,000 digits (decimal and
  hex), beyond the float range, NaN/Infinity, dotted keys 30,000 deep.
- unbounded numbers: every int option of every command refuses 10**30 and every float option nan/inf
  (generated from the commands themselves, so a new option without a declared range fails here);
  options bounded by the loaded model (--top-k, --lanczos-steps beyond the parameter count) are refused
  after loading and before the first Hessian product; the spec's probe tables and epochs likewise.
"""
from __future__ import annotations

import hashlib
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.main import get_command
from typer.testing import CliRunner

from cli.main import app
from kdprobe.checkpoints.format import save_checkpoint
from kdprobe.models import create_model
from kdprobe.studies.spec import builtin_specs

META = {"method": "scratch", "dataset": "digits", "input_shape": [1, 8, 8], "num_classes": 10, "seed": 0}
DEEP_LIST = "[" * 30000 + "]" * 30000
DEEP_OBJ = '{"a":' * 30000 + "1" + "}" * 30000
DIGITS = "9" * 5000

SPEC = """seeds = [0]
[train]
dataset = "digits"
model = "resnet8a"
model_kwargs = { width = 0.25 }
overrides = { epochs = 1 }
[[methods]]
name = "scratch"
"""
# name -> (text appended to / replacing the minimal spec, what the error must name)
SPECS = {
    "deep": (SPEC.replace("{ epochs = 1 }", "{ epochs = 1, x = " + DEEP_LIST + " }"), "levels of nested"),
    "digits": (SPEC.replace("epochs = 1", "epochs = " + DIGITS), "at most 100 digits"),
    "hex": (SPEC.replace("epochs = 1", "epochs = 0x" + "f" * 5000), "20,000-bit"),
    "nan": (SPEC.replace("{ width = 0.25 }", "{ width = nan }"), "finite"),
    "overflow": (SPEC.replace("{ width = 0.25 }", "{ width = 1e309 }"), "finite"),
    "dotted": (SPEC + ".".join(["a"] * 30000) + " = 1\n", "dotted parts"),
    "header": (SPEC + "[" + ".".join(['"t"'] * 40) + "]\nx = 1\n", "dotted parts"),
    "combined": (SPEC + "[" + ".".join(["t"] * 30) + "]\nx = [[[[[1]]]]]\n", "levels of nested tables"),
    "epochs": (SPEC.replace("epochs = 1", "epochs = 1000000000000"), "--epochs"),
    "seed": (SPEC.replace("seeds = [0]", "seeds = [-1]"), "seeds"),
    "lr": (SPEC.replace("epochs = 1", "epochs = 1, lr = 1e308"), "--lr"),
    "confidence": (SPEC + "[calibration]\nconfidence = 1.0\n", "calibration.confidence"),
    "bins": (SPEC + "[calibration]\nbins = 1000000000\n", "calibration.bins"),
    "top_k": (SPEC + "[sharpness]\ntop_k = 100000\n", "sharpness.top_k"),
    "tol": (SPEC + "[sharpness]\ntol = nan\n", "finite"),
    "lanczos": (SPEC + "[sharpness]\nlanczos_steps = 10000000\n", "sharpness.lanczos_steps"),
    "iterations": (SPEC + "[sharpness]\niterations = 1000000000\ntol = 0\n", "sharpness.iterations"),
    "batch": (SPEC + "[agreement]\nbatch_size = 0\n", "agreement.batch_size"),
    "div_seed": (SPEC + "[diversity]\nseed = -1\n", "diversity.seed"),
    "grid": (SPEC + "[landscape]\nx = \"-1e308:1e308:3\"\n", "landscape.x"),
}
SUMMARY = '{"format": "kdprobe-study", "accuracy": [%s]}\n'


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile_options")
    for name, seed, width in (("a.pt", 0, 0.25), ("b.pt", 1, 0.25), ("small.pt", 2, 0.07)):
        torch.manual_seed(seed)
        save_checkpoint(d / name, create_model("resnet8a", num_classes=10, in_channels=1, width=width), META)
    for name, (text, _) in SPECS.items():
        (d / f"{name}.toml").write_text(text)
    (d / "ok.json").write_text(SUMMARY % "1.5, NaN")
    (d / "deep.json").write_text(SUMMARY % DEEP_LIST)
    (d / "digits.json").write_text(SUMMARY % DIGITS)
    return d


def _invoke(args, **kw):
    return CliRunner().invoke(app, [str(a) for a in args], **kw)


def _hashes(d: Path) -> dict:
    """sha256 of every file under d ('folder' for folders), so a new or changed path shows."""
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "folder"
            for p in sorted(d.rglob("*"))}


def _timeout(signum, frame):
    raise TimeoutError("the command ran for 60 s: a hostile value was not refused up front")


def _refused(d: Path, args, expected: str) -> str:
    """Run `kdprobe ARGS`; assert one `error:` line naming `expected`, exit 1, no traceback, nothing touched."""
    before = _hashes(d)
    old = signal.signal(signal.SIGALRM, _timeout)
    signal.alarm(60)
    try:
        r = _invoke(args)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.exit_code == 1, (r.exit_code, r.output[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-2000:]
    assert "internal error" not in r.stderr and "Traceback" not in r.output
    assert expected in lines[0], lines[0]
    assert len(lines[0]) < 600, lines[0]  # a pasted 5,000-digit value is cut, not echoed
    assert _hashes(d) == before
    return lines[0]


CASES = [
    # JSON in options: nesting, digit counts, float range, non-finite constants, before json.loads recurses
    ("eval {d}/a.pt --arch-kwargs " + DEEP_LIST, "JSON object"),
    ("eval {d}/a.pt --arch-kwargs " + DEEP_OBJ, "levels of nested"),
    ('eval {d}/a.pt --arch-kwargs {"width":' + DIGITS + "}", "at most 100 digits"),
    ('eval {d}/a.pt --arch-kwargs {"width":1e999}', "finite"),
    ('eval {d}/a.pt --arch-kwargs {"width":NaN}', "finite"),
    ('eval {d}/a.pt --arch-kwargs {"cfg":[1,-Infinity]}', "finite"),
    ("eval {d}/a.pt --arch-kwargs {d}/a.pt=" + DEEP_OBJ, "levels of nested"),
    ("info {d}/a.pt --arch-kwargs " + DEEP_OBJ, "levels of nested"),
    ("prune {d}/a.pt --method weight --remaining 0.5 --out {d}/n.pt --arch-kwargs " + DEEP_OBJ, "levels of nested"),
    ('agreement {d}/a.pt {d}/b.pt --arch-kwargs {"width":' + DIGITS + "}", "at most 100 digits"),
    ("train --out {d}/n.pt --model-kwargs " + DEEP_OBJ, "--model-kwargs"),
    ('train --out {d}/n.pt --model-kwargs {"width":' + DIGITS + "}", "--model-kwargs"),
    ('train --out {d}/n.pt --model-kwargs {"width":1e309}', "finite"),
    ('train --out {d}/n.pt --model-kwargs {"width":Infinity}', "finite"),
    ("train --out {d}/n.pt --teacher {d}/a.pt --distill label --teacher-arch-kwargs " + DEEP_LIST,
     "--teacher-arch-kwargs"),
    ('train --out {d}/n.pt --init {d}/a.pt --init-arch-kwargs {"x":NaN}', "--init-arch-kwargs"),
    # TOML in --set values and keys
    ("study demo --out {d}/st --set train.overrides.epochs=" + DIGITS, "at most 100 digits"),
    ("study demo --out {d}/st --set train.overrides.epochs=0x" + "f" * 5000, "20,000-bit"),
    ("study demo --out {d}/st --set train.overrides.x=" + DEEP_LIST, "levels of nested"),
    ("study demo --out {d}/st --set train.overrides.lr=nan", "finite"),
    ("study demo --out {d}/st --set train.overrides.lr=inf", "finite"),
    ("study demo --out {d}/st --set train.overrides.lr=1e309", "finite"),
    ("study demo --out {d}/st --set " + ".".join(["a"] * 30000) + "=1", "dotted parts"),
    ("study demo --out {d}/st --set train.overrides.epochs=1000000000000", "--epochs"),
    ("study demo --out {d}/st --set train.overrides.lr=1e308", "--lr"),
    ("train --out {d}/n.pt --lr 1e300", "--lr"),
    ("study demo --out {d}/st --set train.overrides.milestones=[1e308]", "--milestones"),
    ("study demo --out {d}/st --set seeds=[99999999999999999999]", "seeds"),
    ("study demo --out {d}/st --set diversity.confidence=1.0", "diversity.confidence"),
    ("study demo --out {d}/st --set landscape.samples=1e300", "landscape.samples"),
    # study specs (one file per hostile class, the error names the key)
    *[("study {d}/" + name + ".toml --out {d}/st", expected) for name, (_, expected) in SPECS.items()],
    # compare's inputs: the shared JSON parser (NaN kept, nesting and digit counts refused)
    ("compare {d}/deep.json {d}/ok.json", "levels of nested"),
    ("compare {d}/ok.json {d}/digits.json", "at most 100 digits"),
    # refused at parse time, before any load or forward pass
    ("calibration {d}/a.pt --confidence 1.0", "--confidence"),
    ("calibration {d}/a.pt --confidence 0", "--confidence"),
    ("agreement {d}/a.pt {d}/b.pt --batch-size 0", "--batch-size"),
    ("cka {d}/a.pt {d}/b.pt --batch-size 3", "--batch-size"),
    ("calibration {d}/a.pt --bins 1000000000", "--bins"),
    ("sharpness {d}/a.pt --tol nan", "--tol"),
    ("sharpness {d}/a.pt --tol -1", "--tol"),
    ("sharpness {d}/a.pt --iterations 1000000000 --tol 0", "--iterations"),
    ("sharpness {d}/a.pt --lanczos-steps 10000000 --density", "--lanczos-steps"),
    ("sharpness {d}/a.pt --top-k 100000", "--top-k"),
    ("diversity {d}/a.pt --batch-size 1", "--batch-size"),
    ("landscape {d}/a.pt --out {d}/n.vtk --x -1e308:1e308:3", "--x"),
    ("landscape {d}/a.pt --out {d}/n.vtk --save-every nan", "--save-every"),
    ("interpolate {d}/a.pt {d}/b.pt --out {d}/n.h5 --range 0:1e300", "--range"),
    ("interpolate {d}/a.pt {d}/b.pt --out {d}/n.h5 --steps 1", "--steps"),
    ("train --out {d}/n.pt --milestones 1e308", "--milestones"),
    ("train --out {d}/n.pt --epochs 1000000000000", "--epochs"),
    ("pipeline pruning --out {d}/pp --seeds " + DIGITS, "--seeds"),
    ("pipeline pruning --out {d}/pp --seeds -1", "--seeds"),
    ("study demo --out {d}/st --jobs 0", "--jobs"),
    ("prune {d}/a.pt --method l1 --remaining 0.5 --skip 1." + DIGITS + " --out {d}/n.pt", "--skip"),
    # bounded by the loaded model: after loading, before any Hessian product
    ("sharpness {d}/small.pt --top-k 500 --samples 8", "377 trainable parameters"),
    ("sharpness {d}/small.pt --density --lanczos-steps 400 --samples 8", "377 trainable parameters"),
    # prune --skip: a preset the network has none of is refused listing what this network accepts
    ("prune {d}/a.pt --method l1 --remaining 0.5 --skip B --out {d}/n.pt", "block 1..1"),
    ("prune {d}/a.pt --method l1 --remaining 0.5 --skip resnet56-B --out {d}/n.pt", "ResNet-8 as 1-based"),
]


@pytest.mark.parametrize("line, expected", CASES, ids=[c[0][:70].replace("{d}/", "") for c in CASES])
def test_hostile_value_is_one_line_before_any_work(w, line, expected):
    _refused(w, line.replace("{d}", str(w)).split(), expected)


def test_skip_error_lists_only_what_this_network_accepts(w):
    msg = _refused(w, f"prune {w}/a.pt --method l1 --remaining 0.5 --skip B --out {w}/n.pt".split(), "--skip")
    accepted = msg.split("got")[0]
    assert "stage.block" in accepted and "block 1..1" in accepted
    assert "resnet56" not in accepted and "A, B" not in accepted  # no preset offered that would be refused
    r = _invoke(["prune", w / "a.pt", "--method", "l1", "--remaining", "0.5", "--skip", "1.1,3.1", "--out",
                 w / "skip" / "p.pt"])
    assert r.exit_code == 0, r.output
    (w / "skip" / "p.pt").unlink()
    (w / "skip").rmdir()


# ---- every numeric option of every command has a declared range (generated from the commands) ----

BASE = {  # the smallest valid command line of each command; the option under test is added to it
    "train": ["--out", "{d}/n.pt"], "diversity": ["{d}/a.pt"], "landscape": ["{d}/a.pt", "--out", "{d}/n.vtk"],
    "interpolate": ["{d}/a.pt", "{d}/b.pt", "--out", "{d}/n.h5"], "agreement": ["{d}/a.pt", "{d}/b.pt"],
    "cka": ["{d}/a.pt", "{d}/b.pt"], "calibration": ["{d}/a.pt"], "sharpness": ["{d}/a.pt"],
    "study": ["demo", "--out", "{d}/st"], "compare": ["{d}/ok.json", "{d}/ok.json"],
    "pipeline pruning": ["--out", "{d}/pp"],
}
HARMLESS = {("compare", "--show")}  # how many differences to list: any count lists at most all of them


def _numeric_options():
    out = []

    def walk(group, prefix):
        for name, cmd in group.commands.items():
            if hasattr(cmd, "commands"):
                walk(cmd, f"{prefix}{name} ")
                continue
            for p in cmd.params:
                kind = p.bare_type() if hasattr(p, "bare_type") else ""
                if p.param_type_name == "option" and kind in ("int", "float"):
                    out.append((f"{prefix}{name}", p.opts[0], kind))

    walk(get_command(app), "")
    return out


OPTIONS = _numeric_options()
UNBOUNDED = [(cmd, flag, value) for cmd, flag, kind in OPTIONS if (cmd, flag) not in HARMLESS
             for value in (["1000000000000000000000000000000"] if kind == "int" else ["nan", "inf", "-inf"])]


def test_every_numeric_option_is_covered():
    assert len(OPTIONS) > 50 and {c for c, _, _ in OPTIONS} <= set(BASE)  # a new command needs a BASE line


@pytest.mark.parametrize("cmd, flag, value", UNBOUNDED, ids=[f"{c} {f} {v[:6]}" for c, f, v in UNBOUNDED])
def test_every_numeric_option_refuses_out_of_range_values(w, cmd, flag, value):
    args = cmd.split() + [a.replace("{d}", str(w)) for a in BASE[cmd]] + [f"{flag}={value}"]
    _refused(w, args, flag)


# ---- values inside the ranges still work ----

def test_nan_in_a_summary_is_kept_for_compare(w):
    r = _invoke(["compare", w / "ok.json", w / "ok.json"])
    assert r.exit_code == 0, r.output
    assert "the same" in r.output


def test_set_values_still_read_as_toml_or_text():
    from kdprobe.studies.spec import parse_set

    assert parse_set("train.overrides.epochs=3") == (["train", "overrides", "epochs"], 3)
    assert parse_set("train.data_dir=/data/cifar") == (["train", "data_dir"], "/data/cifar")
    assert parse_set('x=[[1, 2], {a = "[[["}]') == (["x"], [[1, 2], {"a": "[[["}])


def test_shared_parser_limits_are_checked_without_recursion():
    from kdprobe.errors import KdprobeError
    from kdprobe.ranges import MAX_NESTING, parse_json, parse_toml

    ok = "[" * MAX_NESTING + "]" * MAX_NESTING
    assert parse_json(ok, "x") is not None
    assert parse_json('{"s": "' + "[" * 1000 + '"}', "x") == {"s": "[" * 1000}  # brackets in strings do not nest
    assert parse_toml('s = """\n' + "{" * 1000 + '\n"""  # ' + "[" * 1000 + "\n", "x")["s"] == "{" * 1000 + "\n"
    for bad in ("[" * (MAX_NESTING + 1) + "]" * (MAX_NESTING + 1), "1" * 101, "[1e400]", "NaN"):
        with pytest.raises(KdprobeError):
            parse_json(bad, "x")
    assert math.isnan(parse_json("[NaN]", "x", finite=False)[0])


# ---- --help: plain text at the terminal's width, every option's help whole ----

def _commands():
    out = []

    def walk(group, path):
        for name, cmd in group.commands.items():
            if hasattr(cmd, "commands"):
                walk(cmd, path + [name])
            out.append((path + [name], cmd))

    walk(get_command(app), [])
    return out


COMMANDS = _commands()


@pytest.mark.parametrize("path, cmd", COMMANDS, ids=[" ".join(p) for p, _ in COMMANDS])
def test_help_prints_every_option_whole_without_placeholders(path, cmd):
    r = _invoke([*path, "--help"], terminal_width=80)
    assert r.exit_code == 0, r.output
    text = r.output
    assert "<bool>" not in text and "…" not in text and "╭" not in text
    assert max(len(ln) for ln in text.splitlines()) <= 80
    flat = "".join(text.split())  # wrapping (and a break after a hyphen) moves no word
    for p in cmd.params:
        if p.help:  # brackets ([scales.NAME], [[pruning]]) and backticks survive: no markup is read
            assert "".join(p.help.split()) in flat, (p.name, p.help)
    if any(len(p.help or "") > 120 for p in cmd.params):  # long descriptions use the width, not a 25-column strip
        params = text[min(i for i in (text.find("Arguments:"), text.find("Options:")) if i >= 0):]
        assert max(len(ln) for ln in params.splitlines()) >= 70


def test_top_level_help_lists_every_command_in_full():
    r = _invoke(["--help"], terminal_width=80)
    assert r.exit_code == 0
    flat = " ".join(r.output.split())
    assert "Loss surface of Li et al. 2018 around a checkpoint" in flat  # click's own cut stopped at 'al.'
    for name in ("train", "study", "compare", "pipeline", "sharpness"):
        assert re.search(rf"^  {name} ", r.output, re.M), name


def test_study_help_lists_every_bundled_study():
    r = _invoke(["study", "--help"], terminal_width=80)
    flat = " ".join(r.output.split())
    names = list(builtin_specs())
    assert "demo" in names and len(names) >= 4
    for name in names:
        assert name in flat, name
    assert "Which [scales.NAME] of the spec to apply" in flat
    assert "([train] and every [[pruning]] block)" in flat


# ---- a closed stdout is a normal end: no error, no traceback ----

def _kdprobe() -> list[str]:
    exe = Path(sys.executable).parent / "kdprobe"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "cli.main"]


@pytest.mark.parametrize("args", [["models"], ["--help"], ["study", "--list"], ["study", "--help"]])
def test_closed_stdout_ends_quietly(args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.Popen(_kdprobe() + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    p.stdout.close()  # the reader is gone before the first write (imports take a second): EPIPE for sure
    err = p.stderr.read()
    assert p.wait(timeout=120) == 141, err  # 128 + SIGPIPE, as the shell reports for any tool
    assert err == b""


def test_models_piped_to_head_prints_one_line_and_no_error():
    cmd = " ".join(f"'{a}'" for a in _kdprobe()) + " models | head -1"
    r = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert len(r.stdout.splitlines()) == 1 and r.stdout.strip()
