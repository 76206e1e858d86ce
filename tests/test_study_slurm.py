"""kdprobe study --executor slurm against a real single-node Slurm (scripts/slurm-test-cluster.sh; skipped with the
reason where Slurm, MUNGE or submitit is missing): a small digits study whose submitter is killed, whose teacher
cell is requeued mid-training, and whose rerun collects the jobs, ends equal to the local run; a failing cell
names its job, state and log; K tasks per cell train as torchrun's K processes do. The planning and option
helpers are checked without a cluster."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kdprobe
import slurm_cluster as sc
from kdprobe.checkpoints.format import load_checkpoint
from kdprobe.errors import KdprobeError
from kdprobe.studies.compare import compare, load_summary
from kdprobe.studies.spec import load_spec
from trainers import study, study_slurm
from trainers.loop import log_path, partial_path

TESTS = Path(__file__).resolve().parent

# scratch (the teacher) runs long enough to be requeued mid-training; the student is short
SPEC = """
title = "a study through Slurm"
seeds = [0]
[train]
dataset = "digits"
model = "resnet8b"
model_kwargs = { width = 0.25 }
preset = "fast"
overrides = { epochs = 2, train_subset = 128 }
[[methods]]
name = "scratch"
overrides = { epochs = 40, train_subset = 1200 }
[[methods]]
name = "kd-label"
distill = "label"
teacher = "scratch"
[slurm]
time = "0:20:00"
cpus-per-cell = 1
extra = { comment = "from-the-spec" }
"""


# ---- no cluster ----------------------------------------------------------------------------------------------

def test_flags_win_over_the_spec_table_and_slurm_flags_need_the_slurm_executor(tmp_path):
    o = study_slurm.slurm_options({"time": "0:20:00", "partition": "gpu", "extra": {"comment": "x"}},
                                  {"time": "15", "partition": None, "gpus_per_cell": 2}, ["reservation=r"], 2)
    assert (o.time, o.partition, o.gpus_per_cell, o.tasks_per_cell) == (15, "gpu", 2, 2)
    assert o.extra == {"comment": "x", "reservation": "r"}
    with pytest.raises(KdprobeError, match="each rank needs its own GPU"):
        study_slurm.slurm_options({}, {"gpus_per_cell": 1}, (), 2)
    with pytest.raises(KdprobeError, match="unknown slurm option 'partion'"):
        study_slurm.slurm_options({"partion": "gpu"})
    with pytest.raises(KdprobeError, match="--partition, --detach only apply with --executor slurm"):
        study_slurm.check_executor("local", {"partition": "gpu", "qos": None}, (), True)
    with pytest.raises(KdprobeError, match="--array-parallelism"):
        study_slurm.check_executor("slurm", {}, (), False, jobs=2)
    with pytest.raises(KdprobeError, match="expected --executor local or slurm"):
        kdprobe.study("demo", out=tmp_path / "out", executor="ssh")


def test_the_api_takes_the_slurm_flags_of_the_study_and_pipeline_commands():
    import inspect

    from cli.main import COMMANDS
    from cli.pipeline import pruning

    names = ("executor", "slurm", "detach") + study_slurm.FLAGS
    api = inspect.signature(kdprobe.study).parameters
    for command in (dict(COMMANDS)["study"], pruning):
        cli = inspect.signature(command).parameters
        assert {n: cli[n].default for n in names} == {n: api[n].default for n in names}
    assert api["executor"].default == "local" and api["detach"].default is False


def test_how_many_cells_a_run_made_is_no_difference_between_two_summaries():
    # a pruning block collected from Slurm jobs made none of its cells in the submitting process, a local run all
    a, b = {"pruning": [{"cells_run": 18, "surplus": 0.5}]}, {"pruning": [{"cells_run": 0, "surplus": 0.5}]}
    d = compare(a, b, 0, 0)
    assert d.equal and d.notes == [("pruning[0].cells_run", 18, 0)]
    assert not compare(a, {"pruning": [{"cells_run": 0, "surplus": 0.25}]}, 0, 0).equal


def test_torchrun_variables_come_from_slurm():
    env = {"SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "41", "SLURM_NNODES": "1"}
    assert study_slurm.torchrun_env(env) == {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1",
                                             "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                                             "MASTER_PORT": "20041"}
    assert study_slurm.torchrun_env({"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}) == {}
    # a job sees only its own GPUs: a --device naming one of the submitter's becomes the job's first
    assert [study_slurm.node_device(d) for d in ("auto", "cpu", "cuda", "cuda:3")] == ["auto", "cpu", "cuda", "cuda"]
    with pytest.raises(KdprobeError, match="one node"):
        study_slurm.torchrun_env({**env, "SLURM_NNODES": "2"})


def test_a_pruning_pipeline_is_three_waves_of_jobs_per_seed(tmp_path):
    from trainers.pipeline import PipelineSpec

    spec = PipelineSpec(model="resnet8a", model_kwargs={"width": 0.25}, method="weight", remaining="0.5",
                        distill="label", seeds="0", preset="fast")
    planned = study_slurm.pipeline_tasks(spec, tmp_path, "cpu")
    got = {t.key: (t.fn.names, t.after) for t in planned.tasks}
    assert got == {
        "seed0/scratch": (("scratch", "scratch_pruned"), ()),
        "seed0/scratch_finetuned": (("scratch_finetuned",), ("seed0/scratch",)),
        "seed0/kd-label": (("kd-label", "kd-label_pruned"), ("seed0/scratch",)),
        "seed0/pre_distill-label": (("pre_distill-label",), ("seed0/kd-label",)),
        "seed0/post_distill-label": (("post_distill-label",), ("seed0/scratch",)),
        "seed0/pre_post-label": (("pre_post-label",), ("seed0/kd-label", "seed0/scratch")),
        "seed0/self_distill-label": (("self_distill-label",), ("seed0/kd-label",)),
    }
    (tmp_path / "seed0").mkdir()
    for name in ("scratch.pt", "scratch_pruned.pt"):  # made: not submitted, and nothing waits for it
        (tmp_path / "seed0" / name).write_bytes(b"")
    planned = study_slurm.pipeline_tasks(spec, tmp_path, "cpu")
    assert "seed0/scratch" not in {t.key for t in planned.tasks}
    assert {t.key: t.after for t in planned.tasks}["seed0/pre_post-label"] == ("seed0/kd-label",)


# ---- a real Slurm -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cluster():
    yield from sc.running_cluster()


@pytest.fixture(scope="module")
def env(cluster):
    mp = pytest.MonkeyPatch()
    mp.setenv("SLURM_CONF", str(cluster.conf))
    mp.setattr(study_slurm, "POLL_S", 0.2)
    yield cluster
    mp.undo()


def _jobs(prefix: str) -> dict[str, str]:
    """Every job the controller knows (finished ones too) whose name starts with prefix: id -> name."""
    out = {}
    for line in sc.slurm("squeue", "-h", "-r", "-t", "all", "-o", "%i %j").splitlines():
        jid, _, name = line.strip().partition(" ")
        if name.startswith(prefix):
            out[jid] = name
    return out


def _job_processes(folder: Path) -> list[int]:
    """Pids of the submitit job processes running out of `folder` (their command line names it)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if proc.name.isdigit() and b"submitit.core._submit" in cmd and str(folder).encode() in cmd:
            pids.append(int(proc.name))
    return pids


def _finish_the_kill(folder: Path, grace: float = 3.0) -> None:
    """What a requeue does to the running job on a node: SIGTERM (which submitit ignores), then SIGKILL after
    KillWait (2 s). On some hosts (seen on an AMD EPYC VM, Debian's Slurm 22.05, proctrack/linuxproc or pgid)
    slurmstepd cancels the step but its SIGKILL never reaches the task, which then trains on to the end and the
    requeue tests nothing. After the grace the node should have needed, the test delivers that SIGKILL itself."""
    import signal
    import time

    end = time.monotonic() + grace
    while time.monotonic() < end and _job_processes(folder):
        time.sleep(0.1)
    for pid in _job_processes(folder):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _weights(path: Path) -> dict:
    return load_checkpoint(path).model.state_dict()


@pytest.fixture(scope="module")
def flow(env, tmp_path_factory):
    """The study through Slurm: submitted by a CLI process that is killed once the jobs are in, the teacher cell
    requeued mid-training (as a preemption does), the same study run again through the API (it collects), and
    the same study run locally."""
    tmp = tmp_path_factory.mktemp("slurm_study")
    spec_file = tmp / "slurmstudy.toml"
    spec_file.write_text(SPEC)
    out = tmp / "out"
    cells = {c.method: c for c in study.plan_cells(load_spec(str(spec_file))[0], out)}
    record = out / "slurm" / "submissions.json"
    before = set(_jobs("kdprobe-slurmstudy-"))  # jobs of this test's earlier runs, while Slurm still lists them
    penv = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(sc.ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", "study", str(spec_file), "--out", str(out),
                             "--executor", "slurm", "--time", "15", "--device", "cpu", "--quiet"],
                            env=penv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def submitted():
            try:
                tasks = json.loads(record.read_text())["tasks"]
            except (OSError, ValueError, KeyError):
                return None
            ids = {k: e.get("job_id") for k, e in tasks.items()}
            return ids if len(ids) == 2 and all(ids.values()) else None

        ids = sc.wait_until(submitted, 120, what="both cells submitted")
    finally:
        proc.kill()  # the submitter dies; its jobs go on
        text = proc.communicate()[0]
    scratch, student = cells["scratch"], cells["kd-label"]
    jid = ids[scratch.rel]
    sc.wait_until(lambda: log_path(scratch.path(out)).exists(), 120, what="the teacher's first epoch")
    sc.slurm("scontrol", "requeue", jid)
    _finish_the_kill(out / "slurm")
    sc.wait_until(lambda: sc.slurm("squeue", "-h", "-j", jid, "-o", "%T %r").strip() == "PENDING BeginTime", 60,
                  what="the requeued teacher")
    during = study_slurm.status(out)
    sc.release_requeued(jid)  # Slurm holds a requeued job ~2 minutes
    local = kdprobe.study(str(spec_file), out=tmp / "local", device="cpu", quiet=True)  # while the jobs run
    res = kdprobe.study(str(spec_file), out=out, executor="slurm", time="15", device="cpu", quiet=True)
    assert local is not None
    return {"out": out, "local": tmp / "local", "ids": ids, "cells": cells, "during": during, "res": res,
            "submitter": text, "after": study_slurm.status(out),
            "jobs": sorted(set(_jobs("kdprobe-slurmstudy-")) - before),
            "record": json.loads(record.read_text()), "scratch": scratch, "student": student}


def test_the_study_through_slurm_equals_the_local_run(flow):
    out, local = flow["out"], flow["local"]
    d = compare(load_summary(local), load_summary(out))
    assert d.equal and d.tolerance.rtol == 0 and d.tolerance.atol == 0, d.differences
    assert (out / "cells.csv").read_text() == (local / "cells.csv").read_text()
    for c in flow["cells"].values():
        a, b = _weights(c.path(out)), _weights(c.path(local))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), c.label
    for key, jid in flow["ids"].items():  # every cell ran as a Slurm job: its log names the job
        log = out / "slurm" / f"{jid}_0_log.out"
        assert log.exists() and jid in log.read_text(), key


def test_a_requeued_cell_resumes_from_its_partial_and_ends_bit_equal(flow):
    out, scratch = flow["out"], flow["scratch"]
    result = study_slurm.SlurmExecutor(out / "slurm").result(scratch.rel)
    assert (result["job"], result["restarts"], result["action"]) == (flow["ids"][scratch.rel], 1, "resumed"), result
    assert 1 <= result["resumed_from_epoch"] < 40, result
    assert not partial_path(scratch.path(out)).exists()
    a, b = _weights(scratch.path(out)), _weights(scratch.path(flow["local"]))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert load_checkpoint(scratch.path(out)).meta["history"] == load_checkpoint(scratch.path(flow["local"])).meta["history"]


def test_a_killed_submitter_and_the_rerun_submit_every_cell_once(flow):
    tasks = flow["record"]["tasks"]
    assert {k: e["job_id"] for k, e in tasks.items()} == flow["ids"]
    assert all(e["attempt"] == 1 and e["state"] == "done" for e in tasks.values()), tasks
    assert flow["jobs"] == sorted(flow["ids"].values()), flow["jobs"]  # no job but the first two
    assert flow["res"] is not None and (flow["out"] / "report.html").exists()


def test_status_shows_each_cell_with_its_job(flow):
    ids, scratch, student = flow["ids"], flow["scratch"], flow["student"]
    during = flow["during"].splitlines()
    assert during[0].startswith("2 cell(s) submitted to Slurm: 2 pending"), during
    assert f"cell scratch seed 0: pending (job {ids[scratch.rel]}, PENDING): BeginTime" in during
    assert any(line.startswith(f"cell kd-label seed 0: pending (job {ids[student.rel]}") for line in during), during
    after = flow["after"].splitlines()
    assert after[0] == "2 cell(s) submitted to Slurm: 2 done" and after[-1] == f"report: {flow['out'] / 'report.html'}"
    from typer.testing import CliRunner

    from cli.main import app

    r = CliRunner().invoke(app, ["study", "status", str(flow["out"])])
    assert r.exit_code == 0 and f"cell scratch seed 0: done (job {ids[scratch.rel]}, COMPLETED)" in r.output


def test_the_flags_win_over_the_spec_slurm_table(flow):
    script = (flow["out"] / "slurm" / f"{flow['ids'][flow['scratch'].rel]}_submission.sh").read_text()
    assert "#SBATCH --time=15\n" in script and "#SBATCH --comment=from-the-spec\n" in script
    assert "#SBATCH --cpus-per-task=1\n" in script


BAD = """
seeds = [0]
[train]
dataset = "digits"
model = "resnet8b"
model_kwargs = { width = 0.25 }
preset = "fast"
overrides = { epochs = 2, train_subset = 128 }
[[methods]]
name = "scratch"
overrides = { lr = 1e30 }
[[methods]]
name = "kd-label"
distill = "label"
teacher = "scratch"
[[methods]]
name = "other"
augment = "none"
"""


def test_a_failing_cell_names_its_job_state_and_log_and_the_others_go_on(env, tmp_path):
    spec_file = tmp_path / "failing.toml"
    spec_file.write_text(BAD)
    out = tmp_path / "out"
    with pytest.raises(KdprobeError) as e:
        kdprobe.study(str(spec_file), out=out, executor="slurm", time="10", device="cpu", quiet=True)
    msg = str(e.value)
    rec = json.loads((out / "slurm" / "submissions.json").read_text())["tasks"]
    by = {e["label"]: e["job_id"] for e in rec.values()}
    log = out / "slurm" / f"{by['cell scratch seed 0']}_0_log.out"
    assert msg.startswith(f"1 Slurm job(s) failed: cell scratch seed 0: failed (job {by['cell scratch seed 0']}, "
                          "FAILED): kdprobe.errors.KdprobeError: loss became non-finite at epoch 1"), msg
    assert f"log {log}" in msg and "non-finite" in log.read_text()
    assert "cancelled 1 job(s) waiting for it (cell kd-label seed 0)" in msg and "\n" not in msg
    states = study_slurm.SlurmExecutor(out / "slurm").wait(poll_s=0.2, timeout_s=120)
    got = {s.label: (s.state, s.slurm_state) for s in states.values()}
    assert got == {"cell scratch seed 0": ("failed", "FAILED"), "cell kd-label seed 0": ("failed", "CANCELLED"),
                   "cell other seed 0": ("done", "COMPLETED")}, got
    other = next(c for c in study.plan_cells(load_spec(str(spec_file))[0], out) if c.method == "other")
    assert other.done(out)  # the cell that does not need the failed one is kept
    assert study_slurm.status(out).splitlines()[0] == "3 cell(s) submitted to Slurm: 1 done, 2 failed"


NPROC = """
seeds = [0]
[train]
dataset = "digits"
model = "resnet8b"
model_kwargs = { width = 0.25 }
preset = "fast"
overrides = { epochs = 2, train_subset = 128, batch_size = 32 }
[[methods]]
name = "scratch"
"""


def test_two_tasks_per_cell_train_as_two_torchrun_processes(env, tmp_path):
    cpus = int(sc.slurm("sinfo", "-h", "-o", "%c").split()[0])
    if cpus < 2:
        pytest.skip(f"the test node has {cpus} CPU; two tasks per cell need 2")
    spec_file = tmp_path / "nproc.toml"
    spec_file.write_text(NPROC)
    kdprobe.study(str(spec_file), out=tmp_path / "slurm", executor="slurm", nproc_per_cell=2, time="10",
                  device="cpu", quiet=True)
    kdprobe.study(str(spec_file), out=tmp_path / "local", nproc_per_cell=2, device="cpu", quiet=True)
    (cell,) = study.plan_cells(load_spec(str(spec_file))[0], tmp_path / "x")
    a, b = (load_checkpoint(tmp_path / d / cell.rel) for d in ("slurm", "local"))
    assert (a.meta["world_size"], a.meta["per_rank_batch"]) == (2, 16)
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
