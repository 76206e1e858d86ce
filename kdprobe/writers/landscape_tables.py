"""A loss surface or interpolation path as plain data: one JSON document (the HDF5 file's attributes and
arrays as nested lists) and one CSV table (a row per grid point), for tools that do not read HDF5.

JSON: {"settings": {the .h5 file attributes}, <the .h5 datasets by name>: nested lists}; nan (a point not
yet evaluated) is written as null. CSV: the records as written by kdprobe.writers.probe_files.write_records_csv
(floats exactly, nan as 'nan')."""
from __future__ import annotations

import json
import os

from kdprobe.files.documents import json_ready
from kdprobe.files.io import atomic_write_text
from kdprobe.writers.probe_files import write_records_csv


def grid_json_text(document: dict) -> str:
    """The document as JSON text; nan and inf become null."""
    return json.dumps(json_ready(document), indent=1, allow_nan=False) + "\n"


def write_grid_json(document: dict, path: str | os.PathLike) -> None:
    """Write a landscape's document (LandscapeResult/InterpolationResult.to_dict()) as JSON, atomically."""
    atomic_write_text(path, grid_json_text(document))


def write_grid_csv(records: list[dict], path: str | os.PathLike) -> None:
    """Write one row per grid point (LandscapeResult/InterpolationResult records) as CSV, atomically."""
    write_records_csv(records, path)
