"""Study placement on GPUs (mocked device counts): impossible ones are refused up front, children get the right device."""
from __future__ import annotations

import json

import pytest
import torch

import trainers.study as study
from kdprobe.errors import KdprobeError
from kdprobe.studies.spec import load_spec
from trainers.distributed import Placement, plan_placement, resolve_device

SPEC = """
title = "placement"
seeds = [0]
[train]
dataset = "digits"
model = "resnet8b"
model_kwargs = { width = 0.25 }
preset = "fast"
overrides = { epochs = 1, train_subset = 64 }
[[methods]]
name = "scratch"
"""


@pytest.fixture
def gpus(monkeypatch):
    """gpus(n): pretend this machine has n CUDA devices."""
    def set_count(n: int):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return set_count


def test_two_ranks_on_one_gpu_are_refused(gpus):
    gpus(1)
    with pytest.raises(KdprobeError, match=r"--nproc-per-cell 2 needs 2 GPUs .* has 1; use --nproc-per-cell 1"):
        plan_placement("cuda", 1, 2)
    with pytest.raises(KdprobeError, match="needs 2 GPUs"):
        plan_placement("auto", 3, 2)


def test_a_gpu_ordinal_beyond_the_machine_is_refused(gpus):
    gpus(1)
    with pytest.raises(KdprobeError, match=r"--device cuda:1 names GPU 1 but this machine has 1 GPU\(s\) "
                                           r"\(cuda:0 to cuda:0\); pick one of them"):
        resolve_device("cuda:1")
    with pytest.raises(KdprobeError, match="names GPU 1"):
        plan_placement("cuda:1", 2, 1)


def test_a_pinned_gpu_with_several_ranks_is_refused(gpus):
    gpus(4)
    with pytest.raises(KdprobeError, match=r"--device cuda:2 pins one GPU but --nproc-per-cell 2 needs 2"):
        plan_placement("cuda:2", 1, 2)


def test_pinned_gpu_jobs_all_see_that_gpu_and_ask_for_cuda(gpus):
    gpus(2)
    assert plan_placement("cuda:1", 3, 1) == Placement(("1", "1", "1"), "cuda")


def test_disjoint_gpu_sets_when_there_are_enough(gpus):
    gpus(4)
    assert plan_placement("cuda", 2, 2) == Placement(("0,1", "2,3"), "cuda")
    assert plan_placement("auto", 4, 1) == Placement(("0", "1", "2", "3"), "cuda")


def test_more_jobs_than_gpus_share_them_round_robin_with_distinct_gpus_per_cell(gpus):
    gpus(2)
    assert plan_placement("cuda", 3, 1) == Placement(("0", "1", "0"), "cuda")
    gpus(3)
    p = plan_placement("cuda", 2, 2)
    assert p.slots == ("0,1", "2,0")
    assert all(len(set(s.split(","))) == 2 for s in p.slots)


def test_a_parents_visible_devices_are_respected(gpus, monkeypatch):
    gpus(2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")  # this process sees physical GPUs 4 and 6 as 0 and 1
    assert plan_placement("cuda", 2, 1) == Placement(("4", "6"), "cuda")
    assert plan_placement("cuda:1", 2, 1) == Placement(("6", "6"), "cuda")


def test_cpu_is_not_restricted(gpus):
    gpus(0)
    assert plan_placement("cpu", 2, 2) == Placement((None, None), "cpu")
    with pytest.raises(KdprobeError, match="CUDA is not available; use --device cpu"):
        plan_placement("cuda", 1, 1)


def _spec(tmp_path):
    p = tmp_path / "s.toml"
    p.write_text(SPEC)
    return load_spec(str(p))[0]


def test_study_refuses_before_writing_anything(gpus, tmp_path):
    gpus(1)
    out = tmp_path / "out"
    with pytest.raises(KdprobeError, match="needs 2 GPUs"):
        study.run_study(_spec(tmp_path), out, device="cuda", nproc_per_cell=2)
    assert not out.exists()


def test_children_get_their_gpus_and_ask_for_cuda(gpus, tmp_path, monkeypatch):
    gpus(2)
    spec = _spec(tmp_path)
    out = tmp_path / "out"
    cells = study.plan_cells(spec, out)
    seen = []

    class FakeProc:
        pid = 1

        def __init__(self, cmd, env, stdout, stderr):
            job = json.loads(open(cmd[-1]).read())
            seen.append((env.get("CUDA_VISIBLE_DEVICES"), job["device"]))

        def poll(self):
            return 1  # "failed": the study stops after starting it

        def terminate(self): ...

        def wait(self): ...

    monkeypatch.setattr(study.subprocess, "Popen", FakeProc)
    monkeypatch.setattr(study.time, "sleep", lambda s: None)
    with pytest.raises(KdprobeError, match="failed"):
        study._train_parallel(cells, out.resolve(), "cuda:1", 2, study.StudyProgress())
    assert seen == [("1", "cuda")]  # GPU 1 only, and the child asks for its first visible GPU, not cuda:1
