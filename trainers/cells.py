"""Is a checkpoint that already sits at a cell's path really that cell? One check for the
pruning pipeline and for studies, which both skip cells whose file exists.

A file is accepted only when it is a kdprobe checkpoint of the expected architecture, trained
with the expected configuration (every TrainConfig field; teacher and init are compared by
content instead of by path, so a moved folder still matches), on the same data (content
fingerprint, when the file records one) and from the same upstream files (the sha256 the cell
recorded for its teacher and init must be that of the files there now). Anything else is
refused with a message naming the cell, the file and the first mismatch.
"""
from __future__ import annotations

from pathlib import Path

from kdprobe.checkpoints.format import FORMAT
from kdprobe.errors import KdprobeError
from kdprobe.files.io import sha256_file
from kdprobe.models.registry import canonical_name
from trainers.config import TrainConfig


def model_label(model: str, model_kwargs: dict) -> str:
    """A cell's model as tables show it: registry name plus non-default kwargs (resnet8a-width0.25)."""
    return "-".join([canonical_name(model)] + [f"{k}{v}" for k, v in sorted(model_kwargs.items())])


def _fix(path: Path) -> str:
    return f"delete {path} (and the cells made from it) or use a new --out"


def comparable(config: dict) -> dict:
    """A recorded config as a plain dict without teacher/init paths (those are compared by sha256)."""
    d = TrainConfig.from_dict(config).to_dict()
    return {k: v for k, v in d.items() if k not in ("teacher", "init", "extra_teachers")}


def check_config(label: str, path: Path, meta: dict, expected: TrainConfig) -> None:
    """Refuse a checkpoint whose recorded training config differs from `expected` in any field."""
    try:
        got = comparable(meta.get("config") or {})
    except (TypeError, ValueError):  # a foreign or damaged config: nothing in it can match
        got = {}
    want = comparable(expected.to_dict())
    diff = next((k for k in want if got.get(k, "<missing>") != want[k]), None)
    if diff is not None:
        raise KdprobeError(f"{label}: {path} exists but was trained with {diff}={got.get(diff, '<missing>')!r}, "
                           f"expected {diff}={want[diff]!r}; {_fix(path)}")


def check_upstream(label: str, path: Path, role: str, recorded: str | None, upstream: Path) -> None:
    """Refuse a cell made from an upstream file (teacher, init, prune source) that has changed since."""
    current = sha256_file(upstream)
    if recorded != current:
        raise KdprobeError(f"{label}: {path} was made from {role} {upstream} with sha256 {str(recorded)[:12]}, but "
                           f"that file now has sha256 {current[:12]}; {_fix(path)}")


def check_cell(label: str, path: Path, payload: dict, expected: TrainConfig, *,
               data_fingerprint: str | None = None, upstream: dict[str, Path] | None = None) -> dict:
    """Check an existing training cell (payload = kdprobe.checkpoints.format.read_payload(path)); returns its meta.

    data_fingerprint: the current dataset's (None: not compared). upstream: role ('teacher',
    'init') -> the file the cell must have been made from, or 'teachers' -> every teacher's file in order
    (an ensemble: meta["teachers"]) (None: not compared yet).
    """
    if payload.get("format") != FORMAT or not isinstance(payload.get("arch"), dict):
        raise KdprobeError(f"{label}: {path} exists but is not a kdprobe checkpoint; {_fix(path)}")
    meta = payload.get("meta") if isinstance(payload.get("meta"), dict) else {}
    arch = payload["arch"].get("name")
    if arch != canonical_name(expected.model):
        raise KdprobeError(f"{label}: {path} exists but holds a {arch}, expected a {canonical_name(expected.model)}; "
                           f"{_fix(path)}")
    check_config(label, path, meta, expected)
    recorded = meta.get("data_fingerprint")
    if data_fingerprint and recorded and recorded != data_fingerprint:
        raise KdprobeError(f"{label}: {path} exists but was trained on other data than {expected.dataset} holds now "
                           f"(data fingerprint {str(recorded)[:12]}, now {data_fingerprint[:12]}); {_fix(path)}")
    for role, file in (upstream or {}).items():
        if role == "teachers":
            recorded = [t.get("sha256") if isinstance(t, dict) else None for t in meta.get("teachers") or []]
            if not recorded and isinstance(meta.get("teacher"), dict):  # made before meta["teachers"] existed
                recorded = [meta["teacher"].get("sha256")]
            if len(recorded) != len(file):
                raise KdprobeError(f"{label}: {path} was made from {len(recorded)} teacher(s), expected {len(file)}; "
                                   f"{_fix(path)}")
            for i, (rec, f) in enumerate(zip(recorded, file), 1):
                check_upstream(label, path, f"teacher {i}", rec, f)
            continue
        check_upstream(label, path, role, (meta.get(role) or {}).get("sha256"), file)
    return meta
