"""torchrun with 2 CPU processes (gloo) trains the same recipe as 1 process, within tolerance."""
import os
import subprocess
import sys

import pytest
import torch

from kdprobe.checkpoints.format import load_checkpoint

ARGS = ["train", "--model", "resnet8b", "--width", "0.25", "--train-subset", "256", "--epochs", "2",
        "--batch-size", "64", "--lr", "0.05", "--quiet", "--device", "cpu"]


def _flat(path):
    sd = load_checkpoint(path).model.state_dict()
    return torch.cat([v.flatten().float() for k, v in sd.items() if "num_batches" not in k])


def _run(cmd, env_extra=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}))
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed missing")
def test_two_rank_torchrun_matches_single_process(tmp_path):
    one, two, other = tmp_path / "one.pt", tmp_path / "two.pt", tmp_path / "other.pt"
    _run([sys.executable, "-m", "cli.main", *ARGS, "--out", str(one)])
    _run([sys.executable, "-m", "cli.main", *ARGS, "--seed", "1", "--out", str(other)])
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29531",
          "-m", "cli.main", *ARGS, "--out", str(two)])
    meta = load_checkpoint(two).meta
    assert meta["world_size"] == 2 and meta["global_batch"] == 64 and meta["per_rank_batch"] == 32
    # the ranks together saw every training image once per epoch
    a, b, c = _flat(one), _flat(two), _flat(other)
    same_recipe, other_seed = (a - b).norm() / a.norm(), (a - c).norm() / a.norm()
    # per-rank BatchNorm statistics make 2 ranks differ slightly from 1; a different seed differs a lot
    # measured: 0.017 with DDP, 0.039 when the ranks do not average gradients, 1.0 for another seed
    assert same_recipe < 0.025 * other_seed, (float(same_recipe), float(other_seed))
    assert abs(meta["test_acc"] - load_checkpoint(one).meta["test_acc"]) < 0.15
