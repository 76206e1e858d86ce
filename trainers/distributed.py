"""Single-process or torchrun training behind one small interface.

Under `torchrun --nproc-per-node K`, WORLD_SIZE/RANK/LOCAL_RANK are set: the process group
is gloo on CPU and nccl on GPU, the student is wrapped in DistributedDataParallel, and
every rank keeps an equal slice of the global batch (which all ranks augment identically
from the shared seed). Without torchrun everything here is a no-op.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
import torch.nn as nn

from kdprobe.errors import KdprobeError
from kdprobe.probes.distributed import init_from_env, rank_device
from kdprobe.runtime.devices import resolve_device  # noqa: F401  (re-exported)


@dataclass(frozen=True)
class Placement:
    """Where a study's child processes run: CUDA_VISIBLE_DEVICES per job slot (None: inherit) and their --device."""

    slots: tuple[str | None, ...]
    child_device: str


def _physical(k: int) -> str:
    """GPU k as this process sees it, named for a child's CUDA_VISIBLE_DEVICES (which counts physical GPUs)."""
    mine = os.environ.get("CUDA_VISIBLE_DEVICES")
    if mine is None or not mine.strip():
        return str(k)
    return [d.strip() for d in mine.split(",") if d.strip()][k]


def plan_placement(device: str, jobs: int, nproc: int) -> Placement:
    """Which GPUs each of `jobs` concurrent cells (each `nproc` torchrun ranks) gets; impossible ones are refused.

    cpu: no restriction. cuda / auto on a GPU machine: job slot s gets GPUs (s*nproc + i) mod count, i < nproc:
    disjoint sets when jobs x nproc <= count, else slots share GPUs (each cell's ranks still on distinct
    ones, as NCCL needs). cuda:N: every job on GPU N, one rank each. A child sees only its GPUs, so it asks
    for `cuda` (its first visible GPU; torchrun ranks take cuda:LOCAL_RANK among them)."""
    dev = resolve_device(device)
    if dev.type != "cuda":
        return Placement((None,) * jobs, device)
    count = torch.cuda.device_count()
    if dev.index is not None:
        if nproc > 1:
            raise KdprobeError(f"--device {device} pins one GPU but --nproc-per-cell {nproc} needs {nproc} (one "
                               "per rank); use --device cuda, or --nproc-per-cell 1")
        return Placement((_physical(dev.index),) * jobs, "cuda")
    if nproc > count:
        raise KdprobeError(f"--nproc-per-cell {nproc} needs {nproc} GPUs (NCCL runs one rank per GPU) but this "
                           f"machine has {count}; use --nproc-per-cell {count} or fewer, or --device cpu")
    return Placement(tuple(",".join(_physical((s * nproc + i) % count) for i in range(nproc)) for s in range(jobs)),
                     "cuda")


@dataclass(frozen=True)
class DistContext:
    """Rank, world size and device of this process."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device: str = "auto") -> "DistContext":
        """Join the torchrun process group if there is one; otherwise a world of one."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls(0, 1, resolve_device(device))
        dev = rank_device(resolve_device(device))
        rank, world = init_from_env(dev)  # the same process-group setup the landscape probe uses
        return cls(rank, world, dev)

    def wrap(self, module: nn.Module) -> nn.Module:
        """DDP around the trainable module when distributed (gradients averaged over ranks)."""
        if self.world_size == 1:
            return module
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DDP(module, device_ids=ids)

    def shard(self, mb):
        """This rank's contiguous slice of a (mixed) batch; lam stays the global one."""
        if self.world_size == 1:
            return mb
        parts = lambda t: torch.tensor_split(t, self.world_size)[self.rank] if t is not None else None  # noqa: E731
        return replace(mb, x=parts(mb.x), y_a=parts(mb.y_a), y_b=parts(mb.y_b), perm=None)

    def sum_counts(self, values: list) -> list:
        """Sum per-rank counters (loss sum, correct, seen) over all ranks."""
        if self.world_size == 1:
            return list(values)
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()
