"""Reading a torch file safely: regular files only, zip CRCs checked, `weights_only=True` with an allow-list of
benign globals, and every failure one line.

Real checkpoints carry an `argparse.Namespace` of options (RepDistiller's `*_last.pth`), numpy scalars and dtypes
(`best_prec1`), numpy arrays and OrderedDicts. These are allow-listed for torch's weights_only unpickler
(`BENIGN_GLOBALS`): reconstructing them runs no code of the file's choosing. Anything else is still refused, and
nothing ever falls back to full unpickling.
"""
from __future__ import annotations

import argparse
import os
import pickle
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

from kdprobe.errors import KdprobeError
from kdprobe.files.io import require_regular_file

_LEGACY_TORCH_MAGIC = b"\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19"  # pickled torch MAGIC_NUMBER (legacy torch.save)


def torch_container(path: str | os.PathLike) -> str | None:
    """'zip' (torch.save since 1.6), 'legacy' (older torch.save, a pickle stream), or None: not a torch file."""
    with open(path, "rb") as f:
        head = f.read(32)
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if head.startswith(b"\x80") and _LEGACY_TORCH_MAGIC in head:
        return "legacy"
    return None


def _numpy_globals() -> list:
    core = getattr(np, "_core", None) or np.core
    scalar, rebuild = core.multiarray.scalar, core.multiarray._reconstruct
    dtypes = [getattr(np.dtypes, n) for n in getattr(np.dtypes, "__all__", [])]
    # Files written under numpy 1.x name these numpy.core.multiarray.*; numpy 2 moved them.
    return [scalar, rebuild, np.ndarray, np.dtype, *dtypes,
            (scalar, "numpy.core.multiarray.scalar"), (rebuild, "numpy.core.multiarray._reconstruct")]


BENIGN_GLOBALS = [argparse.Namespace, *_numpy_globals()]

CHECKPOINT_FORMAT = "kdprobe-checkpoint"
#: the kdprobe checkpoint format from which meta records accuracies as fractions (0-1, docs/units.md);
#: formats 1 and 2 recorded them in percent, and read_payload converts those on reading
FRACTIONS_FROM = 3
ACCURACY_KEYS = frozenset({"test_acc", "train_acc", "best_acc", "source_test_acc"})


def _percent_to_fraction(value):
    """A format-1/2 meta value with every accuracy key (at any depth: history records, the teacher's and the
    pruning source's records) divided by 100; anything that is not a number is left as it is."""
    if isinstance(value, dict):
        return {k: (v / 100.0 if k in ACCURACY_KEYS and isinstance(v, (int, float)) and not isinstance(v, bool)
                    else _percent_to_fraction(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [_percent_to_fraction(v) for v in value]
    return value


def meta_in_fractions(obj: dict) -> dict:
    """A kdprobe checkpoint payload of format < 3 with its meta's accuracies converted from percent to fractions
    (the file's format_version is kept: it also says what its architecture names mean). Other payloads (foreign
    files, partial runs, today's checkpoints) come back unchanged."""
    version = obj.get("format_version")
    if (obj.get("format") == CHECKPOINT_FORMAT and isinstance(version, int) and not isinstance(version, bool)
            and version < FRACTIONS_FROM and isinstance(obj.get("meta"), dict)):
        return {**obj, "meta": _percent_to_fraction(obj["meta"])}
    return obj


def _verify_zip(path: Path) -> None:
    """Check every member's CRC (torch.load never does: flipped bytes in a tensor would load silently)."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, EOFError, zlib.error, ValueError, NotImplementedError, OSError) as e:
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        raise KdprobeError(f"{path} is corrupted or truncated ({why}); restore it from a copy or re-create it") from None
    if bad is not None:
        raise KdprobeError(f"{path} is corrupted: its record {bad} fails the CRC check (damaged bytes); restore it "
                           "from a copy or re-create it")


def read_payload(path) -> dict:
    """torch.load with weights_only=True and every failure turned into a one-line error.

    Order: a regular file (a FIFO would block forever), a torch container (zip or legacy pickle:
    anything else is "not a torch checkpoint"), zip CRCs intact ("corrupted"), then the
    restricted unpickler (a global it refuses means code could run on load). A kdprobe checkpoint written
    before format 3 has its meta's accuracies converted from percent to fractions (meta_in_fractions)."""
    path = require_regular_file(path, "checkpoint")
    container = torch_container(path)
    if container is None:
        raise KdprobeError(f"{path} is not a torch checkpoint (neither a torch zip archive nor a legacy torch "
                           "file); check the path")
    if container == "zip":
        _verify_zip(path)
    try:
        # benign objects real checkpoints carry (argparse.Namespace, numpy scalars) are allow-listed;
        # everything else is still refused by the weights_only unpickler, never run
        with torch.serialization.safe_globals(BENIGN_GLOBALS):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        glob = next((ln for ln in lines if "global" in ln.lower() and "weights_only" not in ln), None)
        if glob is None:
            why = (lines[-1] if lines else type(e).__name__)[:160]
            raise KdprobeError(f"{path} is not a readable torch checkpoint (damaged pickle data: {why}); "
                               "restore it from a copy or re-create it") from None
        raise KdprobeError(
            f"refusing to load {path}: it holds Python objects that could run code on load "
            f"(weights_only=True rejected it: {glob[:160]}); if you trust it, re-save its state_dict with plain torch.save"
        ) from None
    except Exception as e:  # noqa: BLE001 - any other failure of the unpickler means a foreign or broken file
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise KdprobeError(f"{path} is not a readable torch checkpoint (corrupt, truncated or another format?): {why}") from None
    if not isinstance(obj, dict):
        raise KdprobeError(f"{path} holds a {type(obj).__name__}, expected a dict (a state_dict or a checkpoint dict)")
    return meta_in_fractions(obj)
