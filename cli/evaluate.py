"""`kdprobe eval`: loss and accuracy of checkpoints, as a table and CSV/JSON."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cli.common import Arch, ArchKwargs, DataDir, Dataset, ImageSize, table, write_json, write_rows_csv

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
    from kdprobe.api.diversity import evaluate as run
    from kdprobe.files.outputs import check_outputs
    from kdprobe.probes.checkpoint_set import checkpoint_paths

    check_outputs("eval", {"--csv": (csv, "csv"), "--json": (json, "json")},
                  {"CHECKPOINTS": checkpoint_paths(checkpoints)})
    result = run(checkpoints, split=split, dataset=dataset, data_dir=data_dir, arch=arch, arch_kwargs=arch_kwargs,
                 image_size=image_size, device=device, note=lambda text: typer.echo(text, err=True))
    rows = result.records()
    typer.echo(table(rows))
    if csv:
        write_rows_csv(rows, csv)
    if json:
        write_json(result.to_dict(), json)  # the envelope: kind, kdprobe_version, units, settings, data (the rows)
