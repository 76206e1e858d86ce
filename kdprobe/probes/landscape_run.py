"""What a landscape or interpolation run needs besides the evaluation itself: the process's device (joining
torchrun's group), the checkpoints as objects, the evaluation samples, the settings that identify a surface
(and must match for a saved partial surface to be continued), and the progress bar with its throttled saves.

Nothing here writes a file: the saver is handed the function that does (kdprobe.api.landscape passes the
HDF5 writer), so the same bookkeeping runs with a file or purely in memory."""
from __future__ import annotations

import copy
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from kdprobe.errors import KdprobeError
from kdprobe.probes.checkpoint_set import stderr_note

# settings that must be equal for a saved partial surface to be continued
RESUME_KEYS = ("checkpoint_sha256", "dataset", "split", "samples", "bn", "precision", "directions_sha256",
               "seed", "include_bn", "x", "y", "image_size")


@dataclass(frozen=True)
class RunProcess:
    """This process's place in a run: its device, rank and world size; `joined` when the run itself joined
    torchrun's process group (and so leaves it again at the end)."""

    device: object  # torch.device
    rank: int = 0
    world: int = 1
    joined: bool = False

    def close(self) -> None:
        """Leave the process group if this run joined it (a group the caller made is left alone)."""
        if self.joined:
            from kdprobe.probes.distributed import shutdown

            shutdown()


def run_process(device: str = "auto") -> RunProcess:
    """Resolve `device` ('auto', 'cpu', 'cuda', 'cuda:N') and, under torchrun (env WORLD_SIZE > 1), join the
    process group: each rank on GPU cuda:LOCAL_RANK when the device is a GPU (the same rule as training)."""
    import os

    import torch.distributed as dist

    from kdprobe.probes.distributed import init_from_env, rank_device, rank_world
    from kdprobe.runtime.devices import resolve_device

    dev = resolve_device(device)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return RunProcess(dev, *rank_world())
    dev = rank_device(dev)
    already = dist.is_available() and dist.is_initialized()
    rank, world = init_from_env(dev)
    return RunProcess(dev, rank, world, joined=not already)


def checkpoint_of(item, *, device, dataset: str | None, name: str, archs=None):
    """A kdprobe.checkpoints.format.LoadedCheckpoint on `device` with finite weights, from a path (loaded
    with what `archs`, a kdprobe.checkpoints.selection.ArchChoice, says for it), a LoadedCheckpoint or a
    plain nn.Module (which records no dataset, so `dataset` must name one; `name` is what it is called in
    settings and messages). A model that lives on another device is copied there; the caller's object is
    not moved."""
    import torch.nn as nn

    from kdprobe.checkpoints.format import LoadedCheckpoint, load_checkpoint
    from kdprobe.checkpoints.selection import ArchChoice
    from kdprobe.probes.checkpoint_set import module_checkpoint

    if isinstance(item, (str, Path)):
        path = Path(item)
        return load_checkpoint(path, **(archs or ArchChoice()).for_path(path), map_location=device, finite=True)
    if isinstance(item, LoadedCheckpoint):
        ck = item
    elif isinstance(item, nn.Module):
        ck = module_checkpoint(item, dataset=dataset, name=name)
    else:
        raise KdprobeError(f"expected a checkpoint path, a kdprobe.Checkpoint or a torch.nn.Module, got "
                           f"{type(item).__name__}")
    ck.require_finite()
    first = next(iter(ck.model.parameters()), None)
    if first is not None and first.device != device:
        ck = replace(ck, model=copy.deepcopy(ck.model).to(device).eval())
    return ck


def grid_samples(ck, *, dataset: str | None, data_dir, split: str, samples: int, device, also=(),
                 image_size: int | None = None, note: Callable[[str], None] = stderr_note):
    """(dataset name, x, y): the first `samples` examples of `split` (no augmentation), normalized, on
    `device`; `ck` (and the checkpoints in `also`) fitted to the data and checked against it first
    (kdprobe.checkpoints.inputs.check_model_data). note(text) receives remarks."""
    from kdprobe.checkpoints.inputs import check_model_data
    from kdprobe.data.datasets import load_dataset

    if split not in ("train", "test"):
        raise KdprobeError(f"expected --split train or test, got {split!r}")
    name, ddir = ck.data_source(dataset, data_dir)
    data = load_dataset(name, ddir)
    for c in (ck, *also):
        text = check_model_data(c, data, explicit=dataset is not None, image_size=image_size)
        if text:
            note(text)
    if samples < 0:
        raise KdprobeError(f"expected --samples >= 0 (0 = the whole split), got {samples}")
    x, y = data.head(split, samples)
    n, seen = len(y), len(set(y.tolist()))
    if seen < data.num_classes:
        note(f"note: the first {n} {split} examples cover {seen} of {data.num_classes} classes "
             f"(the split is stored in that order); raise --samples to cover more")
    return data.name, x.to(device), y.to(device)


def resume_differences(old: dict, settings: dict, partial, xcoords, ycoords) -> list[str]:
    """What differs between the settings of a saved partial surface (`old`, its file attributes; `partial`,
    its SurfaceResult) and this run's; empty when the run may continue it."""
    import numpy as np

    shown = lambda v: "" if v is None else str(v)  # noqa: E731 - None is stored as '' (and may be absent)
    diff = [f"{k} (file {shown(old.get(k)):.24}, now {shown(settings[k]):.24})" for k in RESUME_KEYS
            if shown(old.get(k)) != shown(settings[k])]
    if not diff and not (np.array_equal(partial.xcoords, xcoords) and np.array_equal(partial.ycoords, ycoords)):
        diff = ["grid coordinates"]
    return diff


class Saver:
    """Progress bar on rank 0, and a throttled save of the partial result through `write` (None: nothing
    is saved, the run is in memory).

    `kept` is how many finished points the saved file holds; after a failed write (full disk) nothing
    more is attempted, so the error is reported once and the last good file stays."""

    def __init__(self, write: Callable | None, total: int, desc: str, every_s: float, rank: int, kept: int = 0,
                 bar: bool = True):
        from tqdm import tqdm

        self.write, self.every_s, self.rank, self.last, self.latest = write, every_s, rank, time.monotonic(), None
        self.total, self.kept, self.failed = total, kept, False
        self.bar = tqdm(total=total, desc=desc, unit="pt", file=sys.stderr, dynamic_ncols=True,
                        disable=rank != 0 or not bar)

    def save(self, partial) -> None:
        """Write `partial` now (rank 0), unless there is nowhere to write or an earlier write failed."""
        if self.write is None or self.rank != 0 or self.failed:
            return
        try:
            self.write(partial)
        except BaseException:
            self.failed = True
            raise
        self.kept = int(partial.done.sum())

    def __call__(self, partial) -> None:
        self.latest = partial
        self.bar.update(int(partial.done.sum()) - self.bar.n)
        if time.monotonic() - self.last >= self.every_s:
            self.save(partial)
            self.last = time.monotonic()

    def flush(self) -> None:
        """Close the bar and save the latest partial result."""
        self.bar.close()
        if self.latest is not None:
            self.save(self.latest)

    def kept_note(self, path) -> str:
        """What a rerun continues from, for an error or Ctrl-C message."""
        if self.write is None:
            return ""
        if self.kept:
            return f"{path} keeps {self.kept} of {self.total} points"
        return "no finished points were saved" if self.failed else ""
