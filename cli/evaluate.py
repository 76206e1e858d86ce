"""`kdprobe eval`: loss and accuracy of checkpoints, as a table and CSV/JSON."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from cli.common import (Arch, ArchKwargs, DataDir, Dataset, ImageSize, arch_choice, expand_paths, table, write_json,
                        write_rows_csv)

O = typer.Option


def evaluate(
    checkpoints: Annotated[list[str], typer.Argument(help="Checkpoint files or globs ('ckpts/*.pt').")],
    split: Annotated[str, O(help="test | train | both.")] = "test",
    dataset: Dataset = None,
    data_dir: DataDir = None,
    arch: Arch = None,
    arch_kwargs: ArchKwargs = None,
    image_size: ImageSize = None,
    csv: Annotated[Optional[Path], O(help="Write the table as CSV.")] = None,
    json: Annotated[Optional[Path], O(help="Write the table as JSON.")] = None,
    device: Annotated[str, O(help="auto | cpu | cuda.")] = "auto",
):
    """Evaluate checkpoints (no augmentation, BN in eval mode)."""
    from tqdm import tqdm

    from kdprobe.checkpoints.format import load_checkpoint
    from kdprobe.data.datasets import load_dataset
    from kdprobe.errors import KdprobeError
    from kdprobe.probes.evaluate import evaluate as run_eval
    from kdprobe.files.outputs import check_outputs
    from kdprobe.checkpoints.inputs import check_model_data
    from kdprobe.data.preprocess import parse_image_size
    from trainers.loop import resolve_device

    if split not in ("test", "train", "both"):
        raise KdprobeError(f"expected --split test, train or both; got {split!r}")
    dev = resolve_device(device)
    archs, size = arch_choice(arch, arch_kwargs), parse_image_size(image_size)
    cache, rows, todo = {}, [], []
    paths = expand_paths(checkpoints)
    archs.check_used(paths)
    check_outputs("eval", {"--csv": (csv, "csv"), "--json": (json, "json")}, {"CHECKPOINTS": paths})
    # every checkpoint is loaded and checked against its data before any evaluation runs
    for p in paths:
        ck = load_checkpoint(p, **archs.for_path(p), map_location=dev, finite=True)
        name, ddir = ck.data_source(dataset, data_dir)
        key = (name, str(ddir))
        if key not in cache:
            cache[key] = load_dataset(name, ddir)
        note = check_model_data(ck, cache[key], explicit=dataset is not None, image_size=size)
        if note:
            typer.echo(note, err=True)
        todo.append((p, ck, cache[key]))
    for p, ck, data in tqdm(todo, desc="eval", unit="ckpt", file=sys.stderr, dynamic_ncols=True,
                            disable=len(todo) < 2):
        row = {"checkpoint": str(p), "method": ck.method, "seed": ck.meta.get("seed"), "dataset": data.name}
        for s in (("test", "train") if split == "both" else (split,)):
            x, y = data.split(s)
            r = run_eval(ck.model, x, y, data.mean, data.std)
            row[f"{s}_loss"], row[f"{s}_acc"] = r.loss, r.acc
        rows.append(row)
    typer.echo(table(rows))
    if csv:
        write_rows_csv(rows, csv)
    if json:
        write_json(rows, json)
