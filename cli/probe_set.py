"""What `kdprobe agreement|cka|calibration|sharpness` share: their options, loading a set of checkpoints
with one dataset, the samples they are probed on, and writing the tables."""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional

import typer

from cli.common import (Arch, ArchKwargs, DataDir, Dataset, ImageSize, arch_choice, expand_paths,  # noqa: F401 (re-exported)
                        in_range)

O = typer.Option

Split = Annotated[str, O(help="Probe on this split: test | train (no augmentation).")]
Samples = Annotated[int, O(help="Use the first N examples of the split, in dataset order (image folders are served "
                                "in a fixed shuffled order); 0 = the whole split.", callback=in_range("samples"))]
GroupBy = Annotated[str, O(help="Checkpoint metadata key that names a checkpoint's group (e.g. method, seed).")]
Reference = Annotated[Optional[str], O(help="Group the others are tested against; 'none' for no tests. Default: "
                                           "scratch when there is such a group (not for foreign files alone), else "
                                           "no tests.")]
Confidence = Annotated[float, O(help="Confidence level of the intervals, in (0, 1).", callback=in_range("confidence"))]
Interval = Annotated[str, O(help="t = Student t quantile (the honest default for a few checkpoints); normal = z.")]
Csv = Annotated[Optional[Path], O(help="Write the main table as CSV (see the README for which).")]
Json = Annotated[Optional[Path], O(help="Write every table as one JSON document (schema in the README).")]
Html = Annotated[Optional[Path], O(help="Write an offline interactive figure (plotly inlined, no WebGL).")]
Device = Annotated[str, O(help="auto | cpu | cuda.")]
Seed = Annotated[int, O(help="Seed of every random draw of the probe (same seed, same device: same result).",
                         callback=in_range("seed"))]
BatchSize = Annotated[int, O(help="Samples per forward pass.", callback=in_range("batch_size"))]


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


def check_choice(name: str, value: str, allowed) -> None:
    """One-line error unless value is one of allowed."""
    from kdprobe.errors import KdprobeError

    if value not in allowed:
        raise KdprobeError(f"expected {name} one of {', '.join(allowed)}; got {value!r}")


def reference_or_none(reference: str | None) -> str | None:
    """'none' (any case) means no reference group; None (not given) is resolved once the groups are known."""
    return None if reference is None or reference.lower() == "none" else reference


def load_set(patterns, *, group_by: str, split: str, samples: int, arch, dataset, data_dir, device: str,
             min_count: int = 1, command: str = "probe", outputs: tuple = (None, None, None), arch_kwargs=None,
             image_size=None) -> ProbeSet:
    """Check the outputs, expand globs, load every checkpoint on the CPU (finite weights, no byte-identical
    copies), require one dataset that fits every model, pick the samples."""
    from tqdm import tqdm

    from kdprobe.checkpoints.format import load_checkpoint
    from kdprobe.data.datasets import load_dataset
    from kdprobe.errors import KdprobeError
    from kdprobe.checkpoints.inputs import check_model_data, require_distinct
    from kdprobe.files.outputs import check_outputs
    from kdprobe.probes.pairs import members_from_checkpoints
    from kdprobe.data.preprocess import parse_image_size
    from trainers.loop import resolve_device

    check_choice("--split", split, ("test", "train"))
    if samples < 0:
        raise KdprobeError(f"expected --samples >= 0 (0 = the whole split), got {samples}")
    dev = resolve_device(device)
    archs, size = arch_choice(arch, arch_kwargs), parse_image_size(image_size)
    paths = expand_paths(patterns)
    archs.check_used(paths)
    csv, json, html = outputs
    check_outputs(command, {"--csv": (csv, "csv"), "--json": (json, "json"), "--html": (html, "html")},
                  {"CHECKPOINTS": paths})
    if len(paths) < min_count:
        raise KdprobeError(f"expected at least {min_count} checkpoints, got {len(paths)}; pass more paths or a glob")
    loaded = [load_checkpoint(p, **archs.for_path(p), map_location="cpu", finite=True)
              for p in tqdm(paths, desc="load", unit="ckpt", file=sys.stderr, dynamic_ncols=True, disable=len(paths) < 8)]
    sources = {ck.data_source(dataset, data_dir) for ck in loaded}
    if len({name for name, _ in sources}) != 1:
        raise KdprobeError(f"expected checkpoints of one dataset, got {sorted({n for n, _ in sources})}; probe each "
                           "dataset separately (or pass --dataset)")
    name, ddir = sorted(sources, key=lambda s: str(s[1]))[0]
    require_distinct(loaded)  # a copy of one checkpoint is not a second independent model
    members = members_from_checkpoints(loaded, group_by)
    data = load_dataset(name, ddir)
    for ck in loaded:  # input shape, classes and dataset identity, before any work
        note = check_model_data(ck, data, explicit=dataset is not None, image_size=size)
        if note:
            typer.echo(note, err=True)
    x, y = data.split(split)
    n = len(y) if samples == 0 else min(samples, len(y))
    return ProbeSet(loaded, members, name, data, x[:n], y[:n], split, dev)


def check_classes(ps: ProbeSet, ck, n_out: int) -> None:
    """One-line error when a model predicts another number of classes than the dataset has."""
    from kdprobe.errors import KdprobeError

    if n_out != ps.data.num_classes:
        raise KdprobeError(f"{ck.path} predicts {n_out} classes but {ps.dataset} has {ps.data.num_classes}; pass the "
                           "matching --dataset")


def fmt_ci(mean, half_width, digits: int = 4) -> str:
    """'mean ± half-width' for a table cell ('-' parts when undefined)."""
    if mean is None or (isinstance(mean, float) and not math.isfinite(mean)):
        return "-"
    hw = "-" if half_width is None or not math.isfinite(half_width) else f"{half_width:.{digits}f}"
    return f"{mean:.{digits}f} ± {hw}"


def fmt_p(p) -> str:
    """A p-value cell ('-' when there is no test)."""
    return "-" if p is None or not math.isfinite(p) else f"{p:.3g}"


def write_outputs(tables, csv_table: str, csv: Path | None, json: Path | None, html: Path | None) -> list[Path]:
    """Write the requested files; returns what was written."""
    from kdprobe.writers.probe_files import write_probe_csv, write_probe_json
    from kdprobe.writers.probe_plots import write_probe_html

    written = []
    if csv:
        write_probe_csv(tables, csv_table, csv)
        written.append(csv)
    if json:
        write_probe_json(tables, json)
        written.append(json)
    if html:
        write_probe_html(tables, html)
        written.append(html)
    if written:
        typer.echo("wrote " + ", ".join(str(p) for p in written))
    return written


def group_table(group_rows: list[dict], metrics: list[str], digits: int = 4, tested: int = 1) -> list[dict]:
    """Terminal rows: one per group, 'mean ± CI' per metric; p(Holm) and g after each of the first `tested` metrics."""
    out = {}
    for r in group_rows:
        if r["metric"] not in metrics:
            continue
        row = out.setdefault(r["group"], {"group": r["group"], "n": r["n"]})
        row[r["metric"]] = fmt_ci(r["mean"], r["half_width"], digits)
        if r["metric"] in metrics[:tested]:
            suffix = "" if tested == 1 else f" {r['metric']}"
            row[f"p(Holm){suffix}"] = fmt_p(r["p_holm"])
            row[f"g{suffix}"] = "-" if r["hedges_g"] is None else f"{r['hedges_g']:.2f}"
    return list(out.values())


def pair_type_table(type_rows: list[dict], metrics: list[str], digits: int = 4) -> list[dict]:
    """Terminal rows: one per pair type, 'mean ± CI' per metric, then the test of the first metric vs the reference."""
    out = {}
    for r in type_rows:
        if r["metric"] not in metrics:
            continue
        row = out.setdefault(r["key"], {"pair type": r["key"], "pairs": r["n_pairs"], "ckpts": r["n_checkpoints"]})
        row[r["metric"]] = fmt_ci(r["mean"], r["half_width"], digits)
        if r["metric"] == metrics[0]:
            row["p(Holm)"] = fmt_p(r["p_holm"])
    return list(out.values())


def check_reference(reference: str | None, groups) -> None:
    """One-line error when the reference group is not among the checkpoints' groups."""
    from kdprobe.errors import KdprobeError

    if reference is not None and reference not in set(groups):
        raise KdprobeError(f"expected the reference group {reference!r} among the groups {sorted(set(groups))}; pass "
                           "one of them with --reference (or --reference none)")


def open_set(patterns, *, interval: str, reference: str | None, group_by: str, split: str, samples: int, arch, dataset,
             data_dir, device: str, min_count: int = 1, command: str = "probe",
             outputs: tuple = (None, None, None), arch_kwargs=None, image_size=None) -> tuple[ProbeSet, str | None]:
    """Check the shared options, load the checkpoints and their samples, check the reference group."""
    from kdprobe.stats import INTERVALS

    check_choice("--interval", interval, INTERVALS)
    ref = reference_or_none(reference)
    ps = load_set(patterns, group_by=group_by, split=split, samples=samples, arch=arch, dataset=dataset,
                  data_dir=data_dir, device=device, min_count=min_count, command=command, outputs=outputs,
                  arch_kwargs=arch_kwargs, image_size=image_size)
    groups = [m.group for m in ps.members]
    if reference is None:  # the default: scratch where the set has it
        ref = "scratch" if "scratch" in groups else None
    check_reference(ref, groups)
    return ps, ref


def cached_logits(ps: ProbeSet, batch_size: int, desc: str = "logits"):
    """A LogitCache holding every checkpoint's logits on the samples: one forward pass each, one model on the device."""
    from tqdm import tqdm

    from kdprobe.probes.predictions import LogitCache

    cache = LogitCache(ps.x, ps.y, mean=ps.data.mean, std=ps.data.std, batch_size=batch_size)
    for ck, m in tqdm(list(zip(ps.loaded, ps.members)), desc=desc, unit="ckpt", file=sys.stderr, dynamic_ncols=True):
        ck.model.to(ps.device)
        logits = cache.get(m.path, ck.model)
        ck.model.to("cpu")
        check_classes(ps, ck, logits.logits.shape[1])
    return cache
