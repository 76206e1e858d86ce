"""Two runs to one output: the second fails at once with one line, the first's file is what it
would have written alone, and no lock file is left behind (kdprobe.files.io.output_lock)."""
import multiprocessing
import os
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

from cli.main import app
from kdprobe.checkpoints.format import read_payload, save_checkpoint
from kdprobe.errors import KdprobeError
from kdprobe.files.io import atomic_write_text, lock_path, output_lock
from kdprobe.models import create_model

KDPROBE = Path(sys.executable).with_name("kdprobe")
META = {"method": "scratch", "dataset": "digits", "input_shape": [1, 8, 8], "num_classes": 10, "seed": 0}
TRAIN = ["--model", "resnet8b", "--width", "0.25", "--train-subset", "256", "--epochs", "3", "--quiet"]
GRID = ["--x", "-1:1:9", "--y", "-1:1:9", "--samples", "64", "--device", "cpu", "--precision", "fp32"]
_fork = multiprocessing.get_context("fork")  # the children need only kdprobe.files.io: no second torch import


# ---- the library lock, in two processes -------------------------------------------------------

def _hold(path, ready, release):
    with output_lock([path], command="train"):
        ready.set()
        release.wait(30)


def _try(path, result):
    try:
        with output_lock([path], command="train"):
            result.put("locked")
    except KdprobeError as e:
        result.put(str(e))


def _try_once(path):
    result = _fork.Queue()
    p = _fork.Process(target=_try, args=(path, result))
    p.start()
    p.join(30)
    return result.get(timeout=5)


def test_a_second_process_is_refused_while_the_first_holds_the_lock(tmp_path):
    out = tmp_path / "new" / "a.pt"
    ready, release = _fork.Event(), _fork.Event()
    holder = _fork.Process(target=_hold, args=(out, ready, release))
    holder.start()
    try:
        assert ready.wait(30)
        assert lock_path(out).exists()
        msg = _try_once(out)
        assert msg.startswith(f"another kdprobe run (pid {holder.pid}, started ") and "kdprobe train" in msg
        assert msg.endswith(f"is writing {out}; wait for it to finish or choose another --out") and "\n" not in msg
    finally:
        release.set()
        holder.join(30)
    assert not (tmp_path / "new").exists()  # lock file and the folder made for it are gone again
    assert _try_once(out) == "locked"  # released: the next run takes it


def _hold_and_die(path, ready):
    with output_lock([path], command="landscape"):
        ready.set()
        os.kill(os.getpid(), signal.SIGKILL)


def test_a_killed_runs_lock_is_released_and_its_file_taken_over(tmp_path):
    out = tmp_path / "s.h5"
    ready = _fork.Event()
    p = _fork.Process(target=_hold_and_die, args=(out, ready))
    p.start()
    p.join(30)
    assert p.exitcode == -signal.SIGKILL and lock_path(out).exists()  # left behind by the kill
    assert _try_once(out) == "locked"  # the kernel released the lock: the rerun (resume) goes ahead
    assert list(tmp_path.iterdir()) == []  # and it removed the stale lock file


def test_locks_are_reentrant_in_one_process(tmp_path):
    out = tmp_path / "a.pt"
    with output_lock([out], command="train"):
        with output_lock([out], command="train"):  # the CLI locks OUT, then the trainer it calls
            pass
        assert _try_once(out).startswith("another kdprobe run")  # the outer lock still holds
    assert _try_once(out) == "locked"


def test_folder_outputs_are_locked_inside_the_folder(tmp_path):
    study = tmp_path / "study"
    with output_lock(folders=[study], command="study"):
        assert (study / ".kdprobe.lock").exists()
        assert "is writing" in _try_once_folder(study)
    assert not study.exists()  # made for the lock, empty again: removed


def _try_folder(path, result):
    try:
        with output_lock(folders=[path], command="study"):
            result.put("locked")
    except KdprobeError as e:
        result.put(str(e))


def _try_once_folder(path):
    result = _fork.Queue()
    p = _fork.Process(target=_try_folder, args=(path, result))
    p.start()
    p.join(30)
    return result.get(timeout=5)


def test_torchrun_ranks_other_than_0_take_no_lock(tmp_path, monkeypatch):
    out = tmp_path / "a.h5"
    monkeypatch.setenv("RANK", "1")
    with output_lock([out], command="landscape"):
        assert not lock_path(out).exists()
    monkeypatch.setenv("RANK", "0")
    with output_lock([out], command="landscape"):
        assert lock_path(out).exists()


def test_the_final_rename_never_replaces_a_file_that_appeared_meanwhile(tmp_path):
    out, kept = tmp_path / "r.json", tmp_path / "kept.json"
    with output_lock([out], command="eval"):
        out.write_text("another program's")  # not through kdprobe: it took no lock
        with pytest.raises(KdprobeError, match="created or replaced by another program") as e:
            atomic_write_text(out, "{}")
        assert "\n" not in str(e.value)
    assert out.read_text() == "another program's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]  # no temp file, no lock file
    kept.write_text("old")
    with output_lock([kept], command="eval"):  # there when the run's checks approved it: replaced
        atomic_write_text(kept, "new 1")
        atomic_write_text(kept, "new 2")  # its own last write: replaced again
    assert kept.read_text() == "new 2"


# ---- real commands, two processes at once ------------------------------------------------------

def _start(*args) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([str(KDPROBE), *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


def _holds(lock: Path) -> bool:
    """The run has taken `lock` and written who it is (pid, start) into it."""
    try:
        return "pid=" in lock.read_text()
    except OSError:
        return False


def _wait_for(lock: Path, proc: subprocess.Popen, timeout=120.0) -> None:
    end = time.monotonic() + timeout
    while not _holds(lock):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < end, f"{lock} never appeared"
        time.sleep(0.002)


def _race(first_args, second_args, lock: Path):
    """Start the first run, freeze it once it holds `lock`, run the second to the end, then let the first finish."""
    a = _start(*first_args)
    try:
        _wait_for(lock, a)
        a.send_signal(signal.SIGSTOP)  # mid-run, holding its lock: the second run starts while it works
        b = _start(*second_args)
        b_out, b_err = b.communicate(timeout=300)
    finally:
        a.send_signal(signal.SIGCONT)
    a_out, a_err = a.communicate(timeout=300)
    return (a.returncode, a_out, a_err, a.pid), (b.returncode, b_out, b_err)


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.mark.skipif(not KDPROBE.exists(), reason="the kdprobe console script is not installed next to python")
def test_two_train_runs_to_one_out(tmp_path):
    out = tmp_path / "a.pt"
    (rc_a, _, err_a, pid_a), (rc_b, out_b, err_b) = _race(
        ["train", *TRAIN, "--seed", "0", "--out", out],
        ["train", "--model", "resnet8a", "--width", "0.5", "--train-subset", "64", "--epochs", "1", "--quiet",
         "--seed", "1", "--out", out],  # another seed and another architecture
        lock_path(out))
    assert rc_a == 0, err_a
    assert rc_b == 1, (out_b, err_b)
    line = _one_error_line(err_b)
    assert line.startswith(f"error: another kdprobe run (pid {pid_a}, started ") and "kdprobe train" in line
    assert line.endswith(f"is writing {out}; wait for it to finish or choose another --out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "a.pt"]  # no lock, partial or temp file
    solo = tmp_path / "solo" / "a.pt"  # the same command uncontested, in a process like the racers' (the test
    solo.parent.mkdir()                 # process's torch settings, left by earlier tests, are not the question)
    s = _start("train", *TRAIN, "--seed", "0", "--out", solo)
    s_out, s_err = s.communicate(timeout=300)
    assert s.returncode == 0, s_err
    got, want = read_payload(out), read_payload(solo)
    assert got["arch"] == want["arch"] and got["meta"]["config"] == want["meta"]["config"]
    assert got["state_dict"].keys() == want["state_dict"].keys()
    assert all(torch.equal(got["state_dict"][k], want["state_dict"][k]) for k in want["state_dict"])
    assert out.with_suffix(".jsonl").read_text() == solo.with_suffix(".jsonl").read_text()


@pytest.mark.skipif(not KDPROBE.exists(), reason="the kdprobe console script is not installed next to python")
def test_two_landscape_runs_to_one_out(tmp_path):
    torch.manual_seed(0)
    ck = save_checkpoint(tmp_path / "a.pt", create_model("resnet8b", num_classes=10, in_channels=1, width=0.25), META)
    out = tmp_path / "s.vtk"
    (rc_a, _, err_a, pid_a), (rc_b, out_b, err_b) = _race(
        ["landscape", ck, "--out", out, *GRID, "--seed", "0"],
        ["landscape", ck, "--out", out, *GRID, "--seed", "1", "--html"],
        lock_path(tmp_path / "s.h5"))
    assert rc_a == 0, err_a
    assert rc_b == 1, (out_b, err_b)
    line = _one_error_line(err_b)
    assert line.startswith(f"error: another kdprobe run (pid {pid_a}, started ") and "kdprobe landscape" in line
    assert f"is writing {tmp_path / 's.h5'}; wait for it" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt", "s.h5", "s.vtk"]  # no .html of the refused run
    r = CliRunner().invoke(app, ["landscape", str(ck), "--out", str(tmp_path / "solo" / "s.vtk"), *GRID,
                                 "--seed", "0"])
    assert r.exit_code == 0, r.output
    with h5py.File(tmp_path / "s.h5") as got, h5py.File(tmp_path / "solo" / "s.h5") as want:
        assert set(got.keys()) == set(want.keys())
        for k in want.keys():
            if isinstance(want[k], h5py.Dataset):
                assert np.array_equal(np.asarray(got[k]), np.asarray(want[k])), k
        assert bool(np.asarray(got["done"]).all())


def test_a_command_refused_after_taking_its_locks_leaves_no_lock_file(tmp_path):
    torch.manual_seed(0)
    ck = save_checkpoint(tmp_path / "a.pt", create_model("resnet8b", num_classes=10, in_channels=1, width=0.25), META)
    (tmp_path / "s.h5").write_text("some notes\n")  # a text file where the surface goes
    r = CliRunner().invoke(app, ["landscape", str(ck), "--out", str(tmp_path / "new" / "s.vtk"),
                                 "--h5", str(tmp_path / "s.h5"), *GRID])
    assert r.exit_code == 1 and "holds a text file" in r.stderr, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt", "s.h5"]  # no lock file, no folder made for one
