"""The sha256 of every cell file a study made, in DIR/cells.sha256 (`sha256sum` format, so
`cd DIR && sha256sum -c cells.sha256` checks it by hand too).

A student records its teacher's sha256, so a changed teacher is caught through its students
(trainers.cells.check_upstream). A leaf cell has no student to vouch for it: were its weights
replaced, the probes would read the new weights while the accuracy table reads the numbers
recorded inside the file, and the report would contradict itself. So the study records each
cell's files (checkpoint and lr-stage snapshots) when the cell finishes, records files it finds
without a record (a study folder from before this file existed) the first time it sees them, and
refuses, before any training and again before the probes, a cell whose file is not the recorded one.
"""
from __future__ import annotations

import re
from pathlib import Path

from kdprobe.errors import KdprobeError
from kdprobe.files.io import atomic_write_text, read_text, sha256_file

MANIFEST = "cells.sha256"
_LINE = re.compile(r"^([0-9a-f]{64}) [ *](.+)$")


def read_hashes(out: Path) -> dict[str, str]:
    """{path relative to the study folder: sha256} as recorded in OUT/cells.sha256 ({} when absent)."""
    path = Path(out) / MANIFEST
    if not path.exists():
        return {}
    hashes = {}
    for n, line in enumerate(read_text(path, "sha256 list").splitlines(), 1):
        if not line.strip():
            continue
        m = _LINE.match(line)
        if m is None:
            raise KdprobeError(f"{path}:{n}: expected 'SHA256  PATH' as sha256sum writes it, got {line[:60]!r}; "
                               f"restore the file, or delete it (the study then records the cells it finds)")
        hashes[m.group(2)] = m.group(1)
    return hashes


def _write(out: Path, hashes: dict[str, str]) -> None:
    atomic_write_text(Path(out) / MANIFEST, "".join(f"{h}  {rel}\n" for rel, h in sorted(hashes.items())))


def _cell_files(cell, out: Path) -> list[tuple[str, Path]]:
    """(relative path, file) of the files of `cell` that exist: its checkpoint and its lr-stage snapshots."""
    return [(p.relative_to(out).as_posix(), p) for p in (cell.path(out), *cell.snapshot_files(out)) if p.exists()]


def record_hashes(cells, out: Path) -> None:
    """Record the sha256 of the files of `cells` as they are now (call it when they have just been trained)."""
    out = Path(out).resolve()
    hashes = read_hashes(out)
    new = {rel: sha256_file(p) for c in cells for rel, p in _cell_files(c, out)}
    if any(hashes.get(rel) != h for rel, h in new.items()):
        _write(out, {**hashes, **new})


def verify_hashes(cells, out: Path) -> None:
    """Refuse a cell whose file is not the one the study recorded; record files without a record."""
    out = Path(out).resolve()
    hashes = read_hashes(out)
    unrecorded = {}
    for c in cells:
        for rel, p in _cell_files(c, out):
            now = sha256_file(p)
            if rel not in hashes:
                unrecorded[rel] = now
            elif hashes[rel] != now:
                raise KdprobeError(
                    f"cell {c.label}: {p} is not the file this study made (sha256 {now[:12]}, recorded "
                    f"{hashes[rel][:12]} in {out / MANIFEST}), so its probes would read other weights than its "
                    f"recorded accuracy; restore the original file, or delete it (and the cells made from it) "
                    f"to retrain the cell")
    if unrecorded:
        _write(out, {**hashes, **unrecorded})
