"""Where a study's data lives: the `auto:cifar10` dataset value, resolved when a study runs, not when it is parsed.

A built-in spec cannot know where CIFAR-10 sits on a machine, so the cifar10-cpu scales name it
`auto:cifar10`, found in this order:
  1. $KDPROBE_CIFAR10: an image-folder archive or folder (imagefolder:PATH), or torchvision's CIFAR-10
     folder (the one holding cifar-10-batches-py: dataset cifar10 with that data_dir);
  2. ../shared/data/cifar10-jpeg.tar.gz relative to the working directory;
  3. the same path relative to the repository (next to the kdprobe checkout).
Otherwise a one-line error says how to point at it (`--dataset imagefolder:PATH`, or
`--dataset cifar10 --data-dir DIR`). Checkpoints record the resolved, absolute dataset.
"""
from __future__ import annotations

import copy
import os
from dataclasses import replace
from pathlib import Path

from kdprobe.errors import KdprobeError

AUTO_CIFAR10 = "auto:cifar10"
ENV = "KDPROBE_CIFAR10"
SHARED = Path("..") / "shared" / "data" / "cifar10-jpeg.tar.gz"


def find_cifar10() -> tuple[str, str | None]:
    """(dataset, data_dir) that `auto:cifar10` stands for on this machine."""
    env = os.environ.get(ENV)
    if env:
        p = Path(env).expanduser()
        if not p.exists():
            raise KdprobeError(f"${ENV} is {env!r}, which does not exist; expected an image-folder archive or folder "
                               "of CIFAR-10, or torchvision's CIFAR-10 folder; fix or unset it")
        if p.is_dir() and (p / "cifar-10-batches-py").is_dir():
            return "cifar10", str(p.resolve())
        return f"imagefolder:{p.resolve()}", None
    repo = Path(__file__).resolve().parents[1]
    for base in (Path.cwd(), repo):
        candidate = base / SHARED
        if candidate.is_file():
            return f"imagefolder:{candidate.resolve()}", None
    raise KdprobeError(f"expected CIFAR-10 for dataset {AUTO_CIFAR10!r}, got none: ${ENV} is not set and {SHARED} is "
                       "not next to the working directory or the repository; set KDPROBE_CIFAR10=PATH, or pass "
                       "--dataset imagefolder:PATH (a CIFAR-10 image folder or .tar.gz) or --dataset cifar10 "
                       "--data-dir DIR (torchvision's files)")


def _located(table: dict, found) -> dict:
    if table.get("dataset") != AUTO_CIFAR10:
        return table
    name, data_dir = found()
    return {**table, "dataset": name, **({"data_dir": data_dir} if data_dir else {})}


def locate_data(spec):
    """The spec with every `auto:cifar10` dataset (train and pruning blocks) replaced by where CIFAR-10 is."""
    cache: list = []

    def found():  # looked up once, and only when a value needs it
        if not cache:
            cache.append(find_cifar10())
        return cache[0]

    train = spec.train
    if train is not None and train.dataset == AUTO_CIFAR10:
        name, data_dir = found()
        train = replace(train, dataset=name, data_dir=data_dir or train.data_dir)
    pruning = tuple(_located(b, found) for b in spec.pruning)
    if train is spec.train and pruning == spec.pruning:
        return spec
    settings = copy.deepcopy(spec.settings)
    if "train" in settings:
        settings["train"] = _located(settings["train"], found)
    if "pruning" in settings:
        settings["pruning"] = [_located(b, found) for b in settings["pruning"]]
    return replace(spec, train=train, pruning=pruning, settings=settings)
