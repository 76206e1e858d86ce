"""A set of checkpoints probed together on one dataset: what agreement, cka, calibration, sharpness and
ensembles share (loading every checkpoint once, one dataset that fits every model, the samples, the groups
and the reference group, one forward pass per checkpoint cached)."""
from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path
import torch.nn as nn

from kdprobe.checkpoints.format import LoadedCheckpoint, load_checkpoint
from kdprobe.checkpoints.inputs import check_model_data, require_distinct
from kdprobe.checkpoints.selection import arch_choice, expand_paths
from kdprobe.data.datasets import load_dataset
from kdprobe.data.preprocess import parse_image_size
from kdprobe.errors import KdprobeError
from kdprobe.probes.pairs import members_from_checkpoints
from kdprobe.probes.predictions import LogitCache
from kdprobe.runtime.devices import resolve_device
from kdprobe.stats import INTERVALS


@dataclass
class ProbeSet:
    """Loaded checkpoints (models on the CPU), their members, the dataset and the chosen samples."""

    loaded: list
    members: list
    dataset: str
    data: object  # kdprobe.data.datasets.TensorData
    x: object  # uint8 images of the chosen samples
    y: object  # their labels
    split: str
    device: object


def stderr_note(text: str) -> None:
    """The default receiver of a probe's remarks (note=): one line on stderr."""
    print(text, file=sys.stderr)


def check_choice(name: str, value: str, allowed) -> None:
    """One-line error unless value is one of allowed."""
    if value not in allowed:
        raise KdprobeError(f"expected {name} one of {', '.join(allowed)}; got {value!r}")


def reference_or_none(reference: str | None) -> str | None:
    """'none' (any case) means no reference group; None (not given) is resolved once the groups are known."""
    return None if reference is None or reference.lower() == "none" else reference


def module_checkpoint(model: nn.Module, *, dataset: str | None, name: str, method: str = "module") -> LoadedCheckpoint:
    """A plain nn.Module as a checkpoint of `dataset` (its weights' sha256 stands in for the file's)."""
    if not isinstance(model, nn.Module):
        raise KdprobeError(f"expected a checkpoint path, a kdprobe.Checkpoint or a torch.nn.Module, got "
                           f"{type(model).__name__}")
    if dataset is None:
        raise KdprobeError(f"{name} is a plain nn.Module, which records no dataset; pass dataset='digits' (or the "
                           "dataset it was trained on)")
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return LoadedCheckpoint(model.eval(), {"method": method, "dataset": dataset}, Path(name), h.hexdigest())


def as_entries(items) -> list:
    """`items` as a list of entries: one path, glob, Checkpoint or module (an nn.Sequential is iterable, but it
    is one model) becomes a list of one."""
    if isinstance(items, (str, Path, nn.Module)) or not hasattr(items, "__iter__"):
        return [items]
    return list(items)


def checkpoint_paths(items) -> list[Path]:
    """The files among `items` (paths and globs expanded in order, repeats dropped), for checking outputs."""
    texts = [str(i) for i in as_entries(items) if isinstance(i, (str, Path))]
    return expand_paths(texts) if texts else []


def collect_checkpoints(items, *, arch=None, arch_kwargs=None, dataset: str | None = None, progress: bool = True
                        ) -> list[LoadedCheckpoint]:
    """Checkpoints in the order given: paths and globs (loaded on the CPU, finite weights required),
    kdprobe.Checkpoint objects (kept as they are) and plain nn.Modules (named module0, module1, ...)."""
    from tqdm import tqdm

    entries, seen = [], set()
    for item in as_entries(items):
        if isinstance(item, (str, Path)):
            for p in expand_paths([str(item)]):
                if p not in seen:
                    seen.add(p)
                    entries.append(p)
        else:
            entries.append(item)
    if not entries:
        raise KdprobeError("no checkpoints given; pass paths, a glob like 'ckpts/*.pt', checkpoints or modules")
    archs = arch_choice(arch, arch_kwargs)
    paths = [e for e in entries if isinstance(e, Path)]
    archs.check_used(paths)
    out, modules = [], 0
    with tqdm(total=len(paths), desc="load", unit="ckpt", file=sys.stderr, dynamic_ncols=True,
              disable=not progress or len(paths) < 8) as bar:
        for e in entries:
            if isinstance(e, Path):
                out.append(load_checkpoint(e, **archs.for_path(e), map_location="cpu", finite=True))
                bar.update()
            elif isinstance(e, LoadedCheckpoint):
                out.append(e.require_finite())
            else:
                out.append(module_checkpoint(e, dataset=dataset, name=f"module{modules}").require_finite())
                modules += 1
    return out


def load_set(checkpoints, *, group_by: str = "method", split: str = "test", samples: int = 0, arch=None,
             arch_kwargs=None, dataset: str | None = None, data_dir=None, device: str = "auto", min_count: int = 1,
             image_size=None, note=None) -> ProbeSet:
    """Load every checkpoint on the CPU (finite weights, no byte-identical copies), require one dataset that
    fits every model, pick the samples. `note(text)` receives remarks (default: printed to stderr)."""
    note = note or stderr_note
    check_choice("--split", split, ("test", "train"))
    if samples < 0:
        raise KdprobeError(f"expected --samples >= 0 (0 = the whole split), got {samples}")
    dev = resolve_device(device)
    size = parse_image_size(image_size)
    loaded = collect_checkpoints(checkpoints, arch=arch, arch_kwargs=arch_kwargs, dataset=dataset)
    if len(loaded) < min_count:
        raise KdprobeError(f"expected at least {min_count} checkpoints, got {len(loaded)}; pass more paths or a glob")
    sources = {ck.data_source(dataset, data_dir) for ck in loaded}
    if len({name for name, _ in sources}) != 1:
        raise KdprobeError(f"expected checkpoints of one dataset, got {sorted({n for n, _ in sources})}; probe each "
                           "dataset separately (or pass --dataset)")
    name, ddir = sorted(sources, key=lambda s: str(s[1]))[0]
    require_distinct(loaded)  # a copy of one checkpoint is not a second independent model
    members = members_from_checkpoints(loaded, group_by)
    data = load_dataset(name, ddir)
    for ck in loaded:  # input shape, classes and dataset identity, before any work
        text = check_model_data(ck, data, explicit=dataset is not None, image_size=size)
        if text:
            note(text)
    x, y = data.split(split)
    n = len(y) if samples == 0 else min(samples, len(y))
    return ProbeSet(loaded, members, name, data, x[:n], y[:n], split, dev)


def check_classes(ps: ProbeSet, ck, n_out: int) -> None:
    """One-line error when a model predicts another number of classes than the dataset has."""
    if n_out != ps.data.num_classes:
        raise KdprobeError(f"{ck.path} predicts {n_out} classes but {ps.dataset} has {ps.data.num_classes}; pass the "
                           "matching --dataset")


def check_reference(reference: str | None, groups) -> None:
    """One-line error when the reference group is not among the checkpoints' groups."""
    if reference is not None and reference not in set(groups):
        raise KdprobeError(f"expected the reference group {reference!r} among the groups {sorted(set(groups))}; pass "
                           "one of them with --reference (or --reference none)")


def open_set(checkpoints, *, interval: str = "t", reference: str | None = None, **load) -> tuple[ProbeSet, str | None]:
    """Check the shared options, load the checkpoints and their samples (load_set's keywords), check the
    reference group: 'none' = no tests, None = scratch where the set has such a group."""
    check_choice("--interval", interval, INTERVALS)
    ref = reference_or_none(reference)
    ps = load_set(checkpoints, **load)
    groups = [m.group for m in ps.members]
    if reference is None:  # the default: scratch where the set has it
        ref = "scratch" if "scratch" in groups else None
    check_reference(ref, groups)
    return ps, ref


def cached_logits(ps: ProbeSet, batch_size: int, desc: str = "logits") -> LogitCache:
    """A LogitCache holding every checkpoint's logits on the samples: one forward pass each, one model on the device."""
    from tqdm import tqdm

    cache = LogitCache(ps.x, ps.y, mean=ps.data.mean, std=ps.data.std, batch_size=batch_size)
    for ck, m in tqdm(list(zip(ps.loaded, ps.members)), desc=desc, unit="ckpt", file=sys.stderr, dynamic_ncols=True):
        ck.model.to(ps.device)
        logits = cache.get(m.path, ck.model)
        ck.model.to("cpu")
        check_classes(ps, ck, logits.logits.shape[1])
    return cache
