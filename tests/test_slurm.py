"""trainers.executors: the executor options and the local executor everywhere; the Slurm executor against a real
single-node Slurm (scripts/slurm-test-cluster.sh, started once per session or reused when CI started it), skipped
with the reason where Slurm, MUNGE or submitit is missing."""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import pytest

import slurm_cluster as sc
from kdprobe.errors import KdprobeError
from trainers.executors import (LocalExecutor, SlurmExecutor, SlurmOptions, Task, parse_slurm_pairs, parse_time)

TESTS = Path(__file__).resolve().parent


def _pythonpath(monkeypatch) -> None:
    # jobs and local task processes unpickle the callables in tests/slurm_cluster.py by module name
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(TESTS), str(sc.ROOT),
                                                                   os.environ.get("PYTHONPATH")])))


# ---- options (no cluster) -----------------------------------------------------------------------------------

def test_time_limits_parse_to_whole_minutes():
    assert [parse_time(v) for v in (90, "90", "1:30", "1:30:00", "2-00", "1-12:00", "0:0:59")] == \
        [90, 90, 2, 90, 2880, 2160, 1]
    for bad in ("soon", "", 0, -5, True, "1:2:3:4", 1.5):
        with pytest.raises(KdprobeError):
            parse_time(bad)


@pytest.mark.parametrize("kwargs, words", [
    ({"partition": "gpu nodes"}, "partition"),
    ({"gpus_per_cell": -1}, "gpus_per_cell"),
    ({"cpus_per_cell": "4"}, "cpus_per_cell"),
    ({"mem_per_cell": "lots"}, "mem_per_cell"),
    ({"time": 1, "signal_delay_s": 90}, "signal_delay_s"),
    ({"array_parallelism": 0}, "array_parallelism"),
    ({"extra": {"array": "0-3"}}, "kdprobe sets --array"),
    ({"extra": {"partition": "gpu"}}, "use the slurm option partition"),
    ({"extra": {"mail-type": "a\nb"}}, "one-line value"),
    ({"setup": "module load cuda"}, "setup"),
])
def test_bad_slurm_options_are_one_line_errors(kwargs, words):
    with pytest.raises(KdprobeError) as e:
        SlurmOptions(**kwargs)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_options_from_a_spec_table_and_free_pairs():
    o = SlurmOptions.from_mapping({"partition": "gpu", "time": "4:00:00", "gpus-per-cell": 1, "mem_per_cell": "16G",
                                   "extra": parse_slurm_pairs(["reservation=paper", "exclusive"])})
    assert (o.partition, o.time, o.gpus_per_cell, o.extra) == ("gpu", 240, 1, {"reservation": "paper",
                                                                               "exclusive": True})
    with pytest.raises(KdprobeError, match="unknown slurm option 'partion'"):
        SlurmOptions.from_mapping({"partion": "gpu"})
    for bad in ("=x", "reservation=", "-p=gpu"):
        with pytest.raises(KdprobeError):
            parse_slurm_pairs([bad])


def test_options_become_the_sbatch_lines_submitit_writes(tmp_path):
    pytest.importorskip("submitit")
    from submitit.slurm.slurm import _make_sbatch_string

    o = SlurmOptions(partition="gpu", account="lab", qos="high", time="1:30:00", gpus_per_cell=2, cpus_per_cell=8,
                     mem_per_cell="32G", array_parallelism=4, constraint="a100|h100", tasks_per_cell=2,
                     extra={"reservation": "paper", "exclusive": True})
    text = _make_sbatch_string(command="run", folder=tmp_path, map_count=10, **o.sbatch_parameters())
    for line in ("--partition=gpu", "--account=lab", "--qos=high", "--time=90", "--gpus-per-node=2",
                 "--cpus-per-task=8", "--mem=32G", "--array=0-9%4", "--constraint='a100|h100'",
                 "--ntasks-per-node=2", "--reservation=paper", "--exclusive", "--signal=USR2@120"):
        assert f"#SBATCH {line}" in text, (line, text)
    assert "--wckey" not in text and "--error" not in text  # one log per cell: stderr goes with stdout


# ---- the local executor (no cluster) ------------------------------------------------------------------------

def test_local_executor_runs_in_processes_in_dependency_order(tmp_path, monkeypatch):
    _pythonpath(monkeypatch)
    ex = LocalExecutor(tmp_path / "local", jobs=2)
    tasks = [Task("a", functools.partial(sc.hello, 1)), Task("b", functools.partial(sc.hello, 2), after=("a",)),
             Task("f", functools.partial(sc.fail, "boom")), Task("g", functools.partial(sc.hello, 3), after=("f",))]
    handles = ex.submit(tasks)
    assert all(h.new for h in handles)
    states = ex.wait(poll_s=0.1, timeout_s=120)
    assert {k: s.state for k, s in states.items()} == {"a": "done", "b": "done", "f": "failed", "g": "failed"}
    assert ex.result("b")["value"] == 4
    assert "ValueError: boom" in states["f"].reason and "boom" in Path(states["f"].log).read_text()
    assert "waits for failed" in states["g"].reason
    assert [h.new for h in ex.submit(tasks)] == [False, False, True, True]  # only the failed ones again
    ex.close()


def test_local_executor_inline():
    ex = LocalExecutor("unused", inline=True)
    ex.submit([Task("x", functools.partial(sc.hello, 5)), Task("y", functools.partial(sc.fail, "no"), after=("x",))])
    states = ex.wait(poll_s=0)
    assert (states["x"].state, states["y"].state, ex.result("x")["value"]) == ("done", "failed", 10)


# ---- a real Slurm ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def cluster():
    yield from sc.running_cluster()


@pytest.fixture
def slurm_env(cluster, monkeypatch):
    monkeypatch.setenv("SLURM_CONF", str(cluster.conf))
    _pythonpath(monkeypatch)
    return cluster


def _ex(tmp_path, **kw) -> SlurmExecutor:
    return SlurmExecutor(tmp_path / "slurm", SlurmOptions(**{"time": 10, "signal_delay_s": 60, **kw}))


def _squeue_ids() -> set[str]:
    """Every job the controller knows, finished ones too (for MinJobAge): a new submission adds one."""
    return set(sc.slurm("squeue", "-h", "-r", "-t", "all", "-o", "%i").split())


def test_a_function_runs_as_a_slurm_job(slurm_env, tmp_path):
    ex = _ex(tmp_path)
    try:
        (h,) = ex.submit([Task("one", functools.partial(sc.hello, 21), label="cell one")])
        assert h.new and h.job_id and "_" not in h.job_id  # a single task: a plain job, not an array
        states = ex.wait(poll_s=0.3, timeout_s=180)
        s = states["one"]
        assert (s.state, s.slurm_state, s.job_id) == ("done", "COMPLETED", h.job_id), s
        assert ex.result("one")["value"] == 42 and ex.result("one")["job"] == h.job_id
        assert f"hello from job {h.job_id}" in Path(h.log).read_text()
        if slurm_env.accounting:
            # the controller sends the record to slurmdbd a moment after the job ends
            sc.wait_until(lambda: f"{h.job_id}|COMPLETED" in sc.slurm("sacct", "-n", "-X", "-P", "-j", h.job_id,
                                                                      "-o", "JobID,State"), 30, what="sacct: COMPLETED")
    finally:
        ex.cancel()


def test_a_job_array_of_three_cells(slurm_env, tmp_path):
    ex = _ex(tmp_path, array_parallelism=2)
    try:
        handles = ex.submit([Task(f"c{i}", functools.partial(sc.hello, i)) for i in range(3)])
        arrays = {h.job_id.split("_")[0] for h in handles}
        assert len(arrays) == 1 and [h.job_id.split("_")[1] for h in handles] == ["0", "1", "2"]
        states = ex.wait(poll_s=0.3, timeout_s=180)
        assert all(s.state == "done" for s in states.values()), states
        assert [ex.result(f"c{i}")["value"] for i in range(3)] == [0, 2, 4]
        assert [ex.result(f"c{i}")["array_task"] for i in range(3)] == ["0", "1", "2"]
    finally:
        ex.cancel()


@pytest.mark.parametrize("how", ["signal", "scontrol"])
def test_a_requeued_job_resumes_and_ends_as_if_uninterrupted(slurm_env, tmp_path, how):
    """signal: SIGUSR2, what Slurm sends signal_delay_s before the time limit (submitit checkpoints and requeues);
    scontrol: an admin's or a preemption's requeue (SIGTERM, then SIGKILL after KillWait: the state saved so far
    is what the next run starts from)."""
    n = 20 if how == "signal" else 40  # scontrol: the job ignores SIGTERM and must still be running at SIGKILL
    expected = sc.count(str(tmp_path / "reference.json"), n)
    state = tmp_path / "state.json"
    ex = _ex(tmp_path)
    try:
        (h,) = ex.submit([Task("count", functools.partial(sc.count, str(state), n, 0.2))])
        sc.wait_until(lambda: state.exists() and json.loads(state.read_text())["i"] >= 4, 120, what="4 steps")
        if how == "signal":
            sc.slurm("scancel", "--signal=USR2", h.job_id)
        else:
            sc.slurm("scontrol", "requeue", h.job_id)
        # Slurm holds a requeued job back (BeginTime, 2 minutes); the test lets it start again at once
        sc.wait_until(lambda: sc.slurm("squeue", "-h", "-j", h.job_id, "-o", "%T %r").strip() == "PENDING BeginTime",
                      60, what="the requeued job")
        assert ex.poll()["count"].state == "pending"  # a requeue is not a failure
        sc.release_requeued(h.job_id)
        states = ex.wait(poll_s=0.3, timeout_s=180)
        assert states["count"].state == "done", states
        assert ex.result("count") == expected
        starts = [line.split() for line in Path(str(state) + ".starts").read_text().splitlines()]
        assert len(starts) == 2 and starts[0] == ["0", "0"] and int(starts[1][0]) >= 4 and starts[1][1] == "1", starts
    finally:
        ex.cancel()


def test_a_failing_cell_names_its_job_state_and_log(slurm_env, tmp_path):
    ex = _ex(tmp_path)
    try:
        (h,) = ex.submit([Task("bad", functools.partial(sc.fail, "boom"), label="cell bad")])
        s = ex.wait(poll_s=0.3, timeout_s=180)["bad"]
        assert (s.state, s.job_id, s.slurm_state) == ("failed", h.job_id, "FAILED"), s
        assert s.reason == "ValueError: boom" and s.log == h.log and "boom" in Path(s.log).read_text()
        line = s.line()
        assert line.startswith("cell bad: failed") and h.job_id in line and s.log in line
        assert h.job_id in ex.status() and "1 failed" in ex.status()
    finally:
        ex.cancel()


def test_a_cancelled_cell_and_one_waiting_for_a_failure(slurm_env, tmp_path):
    flag = tmp_path / "go"
    ex = _ex(tmp_path)
    try:
        handles = ex.submit([Task("a", functools.partial(sc.hello, 1)),
                             Task("b", functools.partial(sc.hello, 2), after=("a",)),
                             Task("f", functools.partial(sc.fail, "no")),
                             Task("g", functools.partial(sc.hello, 3), after=("f",)),
                             Task("slow", functools.partial(sc.wait_for_file, str(flag)))])
        rec = json.loads(ex.record_path.read_text())
        afters = sorted(b["after"] for b in rec["batches"].values())
        job = {h.key: h.job_id for h in handles}
        assert afters == sorted([[], [job["a"]], [job["f"]]]), afters  # b and g wait in arrays of their own
        sc.wait_until(lambda: ex.poll()["slow"].state == "running", 120, what="slow to run")
        sc.slurm("scancel", job["slow"])
        states = ex.wait(poll_s=0.3, timeout_s=180)
        assert {k: s.state for k, s in states.items()} == {"a": "done", "b": "done", "f": "failed", "g": "failed",
                                                            "slow": "failed"}
        assert states["slow"].slurm_state == "CANCELLED" and states["slow"].reason == "cancelled"
        assert "waits for failed" in states["g"].reason  # and its job, which could never start, is cancelled:
        assert sc.slurm("squeue", "-h", "-t", "all", "-j", job["g"], "-o", "%T").strip() == "CANCELLED"
    finally:
        flag.touch()
        ex.cancel()


def test_a_new_submitter_neither_resubmits_done_or_running_cells_nor_loses_unrecorded_ones(slurm_env, tmp_path):
    flag = tmp_path / "go"
    tasks = [Task("quick", functools.partial(sc.hello, 1)),
             Task("slow", functools.partial(sc.wait_for_file, str(flag)))]
    ex = _ex(tmp_path)
    try:
        first = {h.key: h.job_id for h in ex.submit(tasks)}
        sc.wait_until(lambda: [s.state for s in ex.poll().values()] == ["done", "running"], 120,
                      what="quick done, slow running")
        before = _squeue_ids()
        again = _ex(tmp_path).submit(tasks)  # a rerun after the submitter died
        assert [(h.key, h.job_id, h.new) for h in again] == [(k, first[k], False) for k in ("quick", "slow")]
        assert _squeue_ids() == before
        # a submitter killed between sbatch and writing the job ids: the next one finds the job by its name
        held = Task("held", functools.partial(sc.hello, 7))
        ex2 = _ex(tmp_path, extra={"hold": True})
        (h,) = ex2.submit([held])
        rec = json.loads(ex2.record_path.read_text())
        token = rec["tasks"]["held"]["batch"]
        rec["batches"][token]["job_id"] = None
        rec["tasks"]["held"].update(job_id=None, state=None)
        ex2.record_path.write_text(json.dumps(rec))
        (tmp_path / "slurm" / f"{h.job_id}_submitted.pkl").unlink()  # nor had submitit moved the pickle in
        (h2,) = _ex(tmp_path).submit([held])
        assert (h2.job_id, h2.new) == (h.job_id, False)
        sc.slurm("scontrol", "release", h.job_id)
        flag.touch()
        states = _ex(tmp_path).wait(poll_s=0.3, timeout_s=180)
        assert all(s.state == "done" for s in states.values()), states
        assert _ex(tmp_path).result("held")["value"] == 14
    finally:
        flag.touch()
        ex.cancel()
