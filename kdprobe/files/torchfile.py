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
    restricted unpickler (a global it refuses means code could run on load)."""
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
    return obj
