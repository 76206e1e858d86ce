"""No lost files, honest interrupts, checked writes (issue 10 items 1, 3, 7, 8, 9, 13).

The one-line answers to bad command lines are in test_hostile.py; here are the behaviours that
take more than one command: an --overwrite run that is stopped or completes, a disk that fills
up during a landscape, a read-only folder, temp files of a killed run, Ctrl-C at start-up.
"""
import errno
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import kdprobe.files.io
from cli.main import app
from kdprobe.checkpoints.format import load_checkpoint, read_payload, save_checkpoint
from kdprobe.errors import Interrupted, KdprobeError
from kdprobe.files.io import atomic_write_text, write_error
from kdprobe.models import create_model
from kdprobe.files.outputs import check_outputs, sniff
from trainers.config import RANGES, TrainConfig
from trainers.loop import partial_path, train

TINY = dict(model="resnet8b", model_kwargs={"width": 0.25}, dataset="digits", train_subset=128, epochs=2,
            batch_size=64)
REPO = Path(__file__).resolve().parents[1]
META = {"method": "scratch", "dataset": "digits", "input_shape": [1, 8, 8], "num_classes": 10, "seed": 0}


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _tiny_ckpt(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    return save_checkpoint(path, create_model("resnet8b", num_classes=10, in_channels=1, width=0.25), META)


# ---- item 1: --overwrite replaces only when the new checkpoint is complete ----------------------

def test_overwrite_keeps_old_files_until_the_new_run_has_saved_its_own(tmp_path):
    out = _tiny_ckpt(tmp_path / "keep.pt")
    old_out = _sha(out)
    torch.save({"version": 1, "run_key": "another config"}, partial_path(out))
    old_partial = _sha(partial_path(out))
    cfg = TrainConfig(**TINY)

    class StopAtFirstStep:  # Ctrl-C before the new run saved anything
        def start(self, *a): ...
        def step(self, n, postfix): raise KeyboardInterrupt
        def epoch(self, r): ...
        def close(self): ...

    with pytest.raises(Interrupted) as e:
        train(cfg, out, overwrite=True, progress=StopAtFirstStep())
    assert e.value.saved is None  # nothing of this run was saved: the CLI prints just "interrupted"
    assert _sha(out) == old_out and _sha(partial_path(out)) == old_partial

    with pytest.raises(Interrupted) as e:  # stopped after its first save: that save replaced the old state
        train(cfg, out, overwrite=True, stop_after_steps=1)
    assert "partial work is saved in" in e.value.saved and str(partial_path(out)) in e.value.saved
    assert _sha(out) == old_out and read_payload(partial_path(out))["run_key"] != "another config"

    res = train(cfg, out, overwrite=True)  # the same command again: continues its own state, then replaces OUT
    assert res.resumed_from_epoch == pytest.approx(0.5)
    assert _sha(out) != old_out and load_checkpoint(out).meta["config"] == cfg.to_dict()
    assert not partial_path(out).exists()


def test_without_overwrite_a_partial_of_another_config_is_refused_and_kept(tmp_path):
    out = tmp_path / "x.pt"
    torch.save({"version": 1, "run_key": "another config"}, partial_path(out))
    before = _sha(partial_path(out))
    with pytest.raises(KdprobeError, match="different configuration.*--overwrite"):
        train(TrainConfig(**TINY), out)
    assert _sha(partial_path(out)) == before


@pytest.mark.parametrize("args, message", [
    (["--model", "bogus"], "unknown model"),
    (["--lr", "-1"], "--lr"),
    (["--distill", "label", "--teacher", "{d}/missing.pt"], "does not exist"),
    (["--distill", "label", "--teacher", "{d}/junk.pt"], "not a torch checkpoint"),
    (["--dataset", "imagefolder:{d}/nodata"], "does not exist"),
    (["--init", "{d}/junk.pt"], "not a torch checkpoint"),
])
def test_train_overwrite_checks_everything_before_touching_out(tmp_path, args, message):
    out = _tiny_ckpt(tmp_path / "keep.pt")
    torch.save({"version": 1, "run_key": "another config"}, partial_path(out))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    before = {p.name: _sha(p) for p in tmp_path.iterdir()}
    r = CliRunner().invoke(app, ["train", "--epochs", "1", "--train-subset", "64", "--quiet", "--out", str(out),
                                 "--overwrite", *[a.format(d=tmp_path) for a in args]])
    assert r.exit_code == 1 and message in r.stderr, r.output
    assert {p.name: _sha(p) for p in tmp_path.iterdir()} == before


# ---- item 3: full disk, read-only folders, temp files of a killed run -------------------------

def _landscape_args(ck: Path, out: Path):
    return ["landscape", str(ck), "--out", str(out), "--x", "-1:1:3", "--y", "-1:1:3", "--samples", "16",
            "--device", "cpu", "--precision", "fp32", "--save-every", "0"]


def test_landscape_on_a_full_disk_stops_at_the_first_failed_write_and_says_what_is_kept(tmp_path, monkeypatch):
    ck = _tiny_ckpt(tmp_path / "a.pt")
    real, calls = kdprobe.files.io._write_file, []

    def fills_up(path, data):  # the disk is full from the 3rd write on (half written, as a real one)
        calls.append(path)
        if len(calls) >= 3:
            real(path, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)
    monkeypatch.setattr(kdprobe.files.io, "_write_file", fills_up)
    r = CliRunner().invoke(app, _landscape_args(ck, tmp_path / "s.vtk"))
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error")]
    assert r.exit_code == 1 and len(lines) == 1, r.output
    assert len(calls) == 3  # no write after the first failure
    kept = int(np.asarray(h5py.File(tmp_path / "s.h5", "r")["done"]).sum())  # the 2nd save's points
    assert kept == 2 and f"no space left on " in lines[0] and f"{tmp_path / 's.h5'} keeps 2 of 9 points" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt", "s.h5"]  # no temp file, no VTK
    monkeypatch.setattr(kdprobe.files.io, "_write_file", real)
    again = CliRunner().invoke(app, _landscape_args(ck, tmp_path / "s.vtk"))
    assert again.exit_code == 0 and "7 points in" in again.output  # the rerun continues from the kept points


def test_landscape_ctrl_c_says_how_many_points_are_kept(tmp_path, monkeypatch):
    import cli.landscape as cl

    ck, calls, orig = _tiny_ckpt(tmp_path / "a.pt"), [], cl._Saver.__call__

    def ctrl_c_at_the_third_point(self, partial):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        orig(self, partial)
    monkeypatch.setattr(cl._Saver, "__call__", ctrl_c_at_the_third_point)
    r = CliRunner().invoke(app, _landscape_args(ck, tmp_path / "s.vtk"))
    kept = int(np.asarray(h5py.File(tmp_path / "s.h5", "r")["done"]).sum())
    assert r.exit_code == 130 and r.stderr.splitlines()[-1] == (
        f"interrupted; {tmp_path / 's.h5'} keeps {kept} of 9 points; run the same command again to resume")
    assert kept == 2


def _unshare(script: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """Run `script` (sh) as root of a new user+mount namespace, where it may mount a tmpfs."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare here: the monkeypatched full-disk test covers the logic")
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                            f"mount -t tmpfs -o size=64k tmpfs {tmp_path}"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("cannot mount a tmpfs in a user namespace here")
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script], env=env,
                          capture_output=True, text=True, timeout=300)


_DRIVER = """
import json, os, sys
from typer.testing import CliRunner
from cli.main import app
ck, full, ro = sys.argv[1:4]
grid = "--x -1:1:3 --y -1:1:3 --samples 16 --device cpu --precision fp32 --save-every 0".split()
runs = [["landscape", ck, "--out", full + "/s.vtk", *grid], ["landscape", ck, "--out", ro + "/s.vtk", *grid],
        ["eval", ck, "--csv", ro + "/e.csv"]]
res = [CliRunner().invoke(app, r) for r in runs]
print(json.dumps({"rc": [r.exit_code for r in res], "stderr": [r.stderr for r in res], "full": os.listdir(full)}))
"""


def test_real_full_disk_and_read_only_file_system(tmp_path):
    import json

    ck = _tiny_ckpt(tmp_path / "a.pt")
    full, ro = tmp_path / "full", tmp_path / "ro"
    full.mkdir()
    ro.mkdir()
    (tmp_path / "driver.py").write_text(_DRIVER)
    # 80 KiB hold one surface file (~60 KiB) but not a second one next to it: the 2nd save fails
    r = _unshare(f"mount -t tmpfs -o size=80k tmpfs {full} && mount -t tmpfs -o ro tmpfs {ro} && "
                 f"{sys.executable} {tmp_path / 'driver.py'} {ck} {full} {ro}", tmp_path)
    assert r.returncode == 0, r.stderr  # no segmentation fault at exit (h5py never saw the full disk)
    got = json.loads(r.stdout.splitlines()[-1])
    errors = [[ln for ln in e.splitlines() if ln.startswith("error")] for e in got["stderr"]]
    assert got["rc"] == [1, 1, 1] and all(len(e) == 1 for e in errors), got
    assert not any("Traceback" in e or "HDF5" in e for e in got["stderr"]), got
    assert "no space left on" in errors[0][0] and "s.h5 keeps" in errors[0][0] and "of 9 points" in errors[0][0]
    assert got["full"] == ["s.h5"]  # the kept points; the temp file of the failed write is gone
    assert "read-only file system" in errors[1][0] and "read-only file system" in errors[2][0]


def test_write_errors_are_named(tmp_path):
    target = tmp_path / "x.h5"
    assert "read-only file system" in str(write_error(target, OSError(errno.EROFS, "Read-only file system")))
    assert "permission denied" in str(write_error(target, PermissionError(errno.EACCES, "denied")))
    # h5py and torch lose the errno on the way; the one in their message counts
    h5_style = OSError("Can't write data (file write failed: errno = 28, error message = 'No space left')")
    assert "no space left on" in str(write_error(target, h5_style))
    assert write_error(target, ValueError("a bug")) is None  # not a file-system refusal: not renamed


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores folder permissions (the tmpfs test covers ro)")
def test_read_only_folder_is_refused_before_any_work(tmp_path):
    ck = _tiny_ckpt(tmp_path / "a.pt")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        r = CliRunner().invoke(app, ["eval", str(ck), "--csv", str(ro / "e.csv")])
        assert r.exit_code == 1 and "permission denied" in r.stderr
    finally:
        ro.chmod(0o755)


def test_temp_files_of_a_killed_run_are_removed_by_the_next_write(tmp_path):
    import fcntl

    stale = tmp_path / ".r.json.k1ll3d_x.tmp"
    stale.write_text("half")
    other = tmp_path / ".other.json.abcdefgh.tmp"  # another file's temp: not ours to remove
    other.write_text("x")
    live = tmp_path / ".r.json.w0rk1ng_.tmp"  # a writer still running holds its lock
    live.write_text("in progress")
    fd = os.open(live, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        atomic_write_text(tmp_path / "r.json", "{}")
    finally:
        os.close(fd)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([other.name, live.name, "r.json"])


def test_the_vts_writer_side_file_is_locked_and_a_killed_runs_copy_is_cleaned(tmp_path):
    """pyevtk names its own output (TMP + ".vts"): kdprobe creates and locks that name first, so a
    kill leaves a file the next run recognizes as stale, while a live writer's is left alone."""
    import fcntl

    from kdprobe.probes.landscape import Directions, SurfaceResult
    from kdprobe.writers.landscape_vtk import write_surface_vtk

    stale = tmp_path / ".s.vts.k1ll3d_x.tmp.vts"
    stale.write_text("half")
    live = tmp_path / ".s.vts.w0rk1ng_.tmp.vts"
    live.write_text("in progress")
    fd = os.open(live, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    d = Directions({"w": torch.ones(2)}, {"w": torch.ones(2)}, 0, False)
    g = np.arange(6.0).reshape(2, 3) + 1
    try:
        write_surface_vtk(SurfaceResult(np.arange(2.0), np.arange(3.0), g, g, g > 0, d, "eval", "fp32", 4),
                          tmp_path / "s.vts")
    finally:
        os.close(fd)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "s.vts"])
    assert (tmp_path / "s.vts").read_bytes().startswith(b"<?xml")


# ---- item 2: the rule's file sniffing (kinds) ---------------------------------------------

def test_sniff_tells_every_kind_apart(tmp_path):
    from kdprobe.probes.landscape import Directions, LineResult, SurfaceResult
    from kdprobe.writers.landscape_h5 import write_line_h5, write_surface_h5

    ck = _tiny_ckpt(tmp_path / "a.pt")
    torch.save({"run_key": "k", "version": 1}, tmp_path / "a.pt.partial")
    torch.save({"w": torch.zeros(2)}, tmp_path / "foreign.pt")
    torch.save({"w": torch.zeros(2)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    d = Directions({"w": torch.ones(2)}, {"w": torch.ones(2)}, 0, False)
    g = np.zeros((2, 2))
    write_surface_h5(SurfaceResult(np.arange(2.0), np.arange(2.0), g, g, g == 0, d, "eval", "fp32", 4),
                     tmp_path / "s.h5")
    write_line_h5(LineResult(np.arange(2.0), np.zeros(2), np.zeros(2), np.ones(2, bool), "eval", "fp32", 4),
                  tmp_path / "p.h5")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = 1
    files = {"a.pt": "checkpoint", "a.pt.partial": "partial", "foreign.pt": "torch", "legacy.pt": "torch",
             "s.h5": "surface", "p.h5": "line", "other.h5": "hdf5", "e.csv": "csv", "e.json": "json",
             "log.jsonl": "jsonl", "r.html": "html", "s.vtk": "vtk", "n.txt": "text", "z.bin": "binary",
             "empty": "empty"}
    (tmp_path / "e.csv").write_text("a,b\n1,2\n")
    (tmp_path / "e.json").write_text('[\n {"a": 1}\n]\n')
    (tmp_path / "log.jsonl").write_text('{"epoch": 1}\n{"epoch": 2}\n')
    (tmp_path / "r.html").write_text("<!DOCTYPE html><html></html>")
    (tmp_path / "s.vtk").write_bytes(b"# vtk DataFile Version 3.0\nx\nBINARY\n\x00\x01")
    (tmp_path / "n.txt").write_text("notes\n")
    (tmp_path / "z.bin").write_bytes(bytes(range(256)))
    (tmp_path / "empty").write_bytes(b"")
    assert {name: sniff(tmp_path / name) for name in files} == files
    assert check_outputs("x", {"--csv": (tmp_path / "empty", "csv")}) == {"--csv": tmp_path / "empty"}
    assert ck.exists()


def test_same_file_by_another_name_is_one_file(tmp_path):
    ck = _tiny_ckpt(tmp_path / "a.pt")
    os.link(ck, tmp_path / "hard.pt")
    (tmp_path / "sub").mkdir()
    for out in (tmp_path / "hard.pt", tmp_path / "sub" / ".." / "a.pt"):
        with pytest.raises(KdprobeError, match="also the input"):
            check_outputs("prune", {"--out": (out, "checkpoint")}, {"CHECKPOINT": ck}, overwrite=True)


# ---- items 7, 8: loading -----------------------------------------------------------------

def test_legacy_torch_files_still_load_and_zip_crcs_are_checked(tmp_path):
    torch.manual_seed(0)
    m = create_model("resnet8b", num_classes=10, in_channels=1, width=0.25)
    torch.save(m.state_dict(), tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    ck = load_checkpoint(tmp_path / "legacy.pth", arch="resnet8b", arch_kwargs={"in_channels": 1})
    assert all(torch.equal(a, b) for a, b in zip(ck.model.state_dict().values(), m.state_dict().values()))
    good = save_checkpoint(tmp_path / "a.pt", m, META)
    data = bytearray(good.read_bytes())
    i = data.index(b"archive/data/0") + 200  # inside the first tensor's bytes (past its local header)
    data[i] ^= 1
    (tmp_path / "b.pt").write_bytes(bytes(data))
    with pytest.raises(KdprobeError, match="corrupted"):
        load_checkpoint(tmp_path / "b.pt")


def test_info_shows_nonfinite_weights_that_other_commands_refuse(tmp_path):
    torch.manual_seed(0)
    m = create_model("resnet8b", num_classes=10, in_channels=1, width=0.25)
    with torch.no_grad():
        m.fc.bias[3] = float("inf")
    ck = save_checkpoint(tmp_path / "inf.pt", m, META)
    r = CliRunner().invoke(app, ["info", str(ck)])
    assert r.exit_code == 0 and "NON-FINITE" in r.output and "fc.bias" in r.output
    assert load_checkpoint(ck).nonfinite() == "fc.bias"
    with pytest.raises(KdprobeError, match="non-finite weights"):
        load_checkpoint(ck, finite=True)


# ---- item 9: one table of ranges serves TrainConfig (study and pipeline specs build TrainConfigs) ----

@pytest.mark.parametrize("field", sorted(RANGES))
def test_every_declared_range_is_enforced_by_trainconfig(field):
    rng = RANGES[field]
    bad = [float("nan"), -1] if rng.kind is float else [-1, 1.5]
    if rng.high is not None:
        bad.append(rng.high * 2 + 1)
    for value in bad:
        with pytest.raises(KdprobeError, match=f"--{field.replace('_', '-')}"):
            TrainConfig(**{field: value})


def test_model_kwargs_and_milestones_are_checked_in_the_config():
    with pytest.raises(KdprobeError, match="width"):
        TrainConfig(model="resnet8b", model_kwargs={"width": -1.0})
    with pytest.raises(KdprobeError, match="does not accept"):
        TrainConfig(model="resnet8b", model_kwargs={"depth": 3})
    with pytest.raises(KdprobeError, match="--milestones"):
        TrainConfig(milestones=(1.5,))
    assert TrainConfig(milestones=(0.5, 3)).milestones == (0.5, 3)


# ---- item 13: Ctrl-C -----------------------------------------------------------------------

def test_ctrl_c_while_starting_is_one_line_and_exit_130(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    p = subprocess.Popen([sys.executable, "-m", "cli.main", "train", "--quiet", "--epochs", "50", "--out",
                          str(tmp_path / "x.pt")], stderr=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True)
    time.sleep(0.5)  # torch is still importing
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130 and err.strip() == "interrupted", err


def test_cli_says_saved_only_when_something_was_saved():
    from cli.common import handle_errors

    def saved():
        raise Interrupted("partial work is saved in x.pt.partial (epoch 1.50 of 3)")

    def nothing():
        raise KeyboardInterrupt

    import typer
    t = typer.Typer()
    t.command("saved")(handle_errors(saved))
    t.command("nothing")(handle_errors(nothing))
    r = CliRunner().invoke(t, ["saved"])
    assert r.exit_code == 130 and r.stderr.strip() == ("interrupted; partial work is saved in x.pt.partial "
                                                       "(epoch 1.50 of 3); run the same command again to resume")
    r = CliRunner().invoke(t, ["nothing"])
    assert r.exit_code == 130 and r.stderr.strip() == "interrupted"
