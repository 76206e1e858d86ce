"""Ensemble-perspective probe tables as files: one JSON document (every table) and one CSV table."""
from __future__ import annotations

import csv
import io
import json
import os

from kdprobe.files.io import atomic_write_text


def probe_document(tables) -> dict:
    """The --json document (kdprobe.files.documents.envelope): kind (the command), kdprobe_version, machine,
    units, settings, data ({table name: [records]})."""
    from kdprobe.files.documents import envelope
    from kdprobe.runtime.machine import machine

    return envelope(tables.command, tables.settings, dict(tables.tables), machine=machine())


def write_probe_json(tables, path: str | os.PathLike) -> None:
    """The probe_document as JSON; nan written as null."""
    atomic_write_text(path, json.dumps(probe_document(tables), indent=1, allow_nan=False) + "\n")


def write_records_csv(rows, path: str | os.PathLike) -> None:
    """Records as CSV that pandas reads: header = the union of their keys in order of appearance; floats
    written exactly (repr), None as empty."""
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    for r in rows:
        w.writerow({k: repr(v) if isinstance(v, float) else ("" if v is None else v) for k, v in r.items()})
    atomic_write_text(path, buf.getvalue())


def write_probe_csv(tables, name: str, path: str | os.PathLike) -> None:
    """One table of a probe's tables as CSV (see write_records_csv)."""
    write_records_csv(tables.table(name), path)
