"""Split independent evaluation points across torchrun ranks and gather the results.

Used by the landscape probes: every rank holds the same list of points still to do;
in round r, rank k evaluates chunk r*world + k, then all ranks all-gather the round's
(index, loss, accuracy) triples, so every rank ends with the full arrays and rank 0
can save progress after every round. Works unchanged with world size 1 (no process
group). Backends: gloo for CPU tensors, nccl for CUDA tensors.
"""
from __future__ import annotations

import os
from typing import Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist

from kdprobe.errors import KdprobeError


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the current process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def local_rank() -> int:
    """torchrun's LOCAL_RANK (which GPU this process should use), 0 outside torchrun."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def rank_device(device: torch.device) -> torch.device:
    """The device of this torchrun rank: cuda:LOCAL_RANK (made current) when `device` is a GPU, else `device`;
    refused when this process sees fewer GPUs than ranks on its node."""
    if device.type != "cuda":
        return device
    if local_rank() >= torch.cuda.device_count():
        raise KdprobeError(f"torchrun rank {local_rank()} needs GPU cuda:{local_rank()} but this process sees "
                           f"{torch.cuda.device_count()} GPU(s); run at most that many ranks per node")
    dev = torch.device("cuda", local_rank())
    torch.cuda.set_device(dev)
    return dev


def init_from_env(device: str | torch.device) -> tuple[int, int]:
    """Join the torchrun process group when env WORLD_SIZE > 1; returns (rank, world size)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    return rank_world()


def shutdown() -> None:
    """Leave the process group if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _comm_device() -> torch.device:
    # nccl only moves CUDA tensors; gloo moves CPU tensors (and CUDA ones via copies)
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_array(a: np.ndarray) -> np.ndarray:
    """Rank 0's copy of a float64 array, on every rank (identity without a group)."""
    if rank_world()[1] == 1:
        return a
    t = torch.as_tensor(np.ascontiguousarray(a, dtype=np.float64), device=_comm_device())
    dist.broadcast(t, src=0)
    return t.cpu().numpy().reshape(a.shape)


def run_points(todo: Sequence[int], evaluate: Callable[[list[int]], tuple[torch.Tensor, torch.Tensor]],
               points_per_batch: int,
               on_round: Callable[[np.ndarray, np.ndarray, np.ndarray], None]) -> None:
    """Evaluate `todo` (point indices) in chunks split over ranks; on_round(idx, loss, acc) per round."""
    rank, world = rank_world()
    step = points_per_batch * world
    for start in range(0, len(todo), step):
        mine = list(todo[start + rank * points_per_batch: start + (rank + 1) * points_per_batch])
        if mine:
            loss, acc = evaluate(mine)
            part = torch.stack([torch.tensor(mine, dtype=torch.float64),
                                loss.detach().double().cpu(), acc.detach().double().cpu()], 1)
        else:
            part = torch.empty(0, 3, dtype=torch.float64)
        if world > 1:  # pad to equal size (index -1 = no point), gather from every rank
            padded = torch.full((points_per_batch, 3), -1.0, dtype=torch.float64)
            padded[: len(part)] = part
            dev = _comm_device()
            bufs = [torch.empty_like(padded, device=dev) for _ in range(world)]
            dist.all_gather(bufs, padded.to(dev))
            part = torch.cat([b.cpu() for b in bufs])
            part = part[part[:, 0] >= 0]
        a = part.numpy()
        on_round(a[:, 0].astype(np.int64), a[:, 1], a[:, 2])
