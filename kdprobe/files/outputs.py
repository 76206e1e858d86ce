"""One output-path rule for every command, checked before any work.

    check_outputs("landscape", {"--out": (out, "vtk"), "--h5": (h5, "surface")},
                  inputs={"checkpoint": ckpt, "--directions": dirs}, overwrite=overwrite, keep=("--h5",))

- outputs never collide with each other or with an input (resolved paths and samefile, so
  `./a.pt`, `a.pt` and a hard link of it are one file), implied outputs included (OUT.partial,
  OUT.jsonl, the .h5 next to a .vtk);
- a file of another kind is never overwritten, not even with --overwrite: the existing file is
  sniffed (kdprobe checkpoint, training state, kdprobe surface .h5, kdprobe line .h5, other
  HDF5, VTK, HTML, JSON, CSV, ...) and must be the kind the command writes there;
- an existing file of a precious kind (checkpoint, training state, surface) is replaced only
  with --overwrite, unless the command resumes or skips it itself (`keep`), and --overwrite
  replaces a checkpoint only when the same command made it (meta["made_by"]: a `prune
  --overwrite` never replaces a trained model);
- a folder where a file is expected, a file where a folder is expected, and an unwritable
  place are one-line errors before any work;
- inside a run scope (kdprobe.files.io.run_scope: every CLI command runs in one) every output is locked
  for the rest of the run before its existing file is judged, so a second run to the same output
  fails at once: "another kdprobe run (pid N, started T, ...) is writing OUT".
"""
from __future__ import annotations

import json
import os
import stat
import zipfile
from pathlib import Path
from typing import Iterable, Mapping

from kdprobe.errors import KdprobeError
from kdprobe.files.torchfile import read_payload, torch_container
from kdprobe.files.io import hold_output_locks, nearest_existing

KINDS = {
    "checkpoint": "a kdprobe checkpoint",
    "partial": "kdprobe training state (OUT.partial)",
    "torch": "a PyTorch file that is not a kdprobe checkpoint",
    "surface": "a kdprobe loss surface (.h5 of kdprobe landscape)",
    "line": "a kdprobe interpolation path (.h5 of kdprobe interpolate)",
    "hdf5": "an HDF5 file not written by kdprobe",
    "vtk": "a legacy VTK file",
    "vts": "an XML VTK file",
    "html": "an HTML page",
    "json": "a JSON file",
    "jsonl": "a JSON-lines log",
    "csv": "a CSV table",
    "pdf": "a PDF file",
    "png": "a PNG image",
    "svg": "an SVG image",
    "text": "a text file",
    "zip": "a zip archive",
    "binary": "a binary file of unknown kind",
    "empty": "an empty file",
    "folder": "a folder",
    "special": "not a regular file (a FIFO, socket or device)",
}
# what may already sit where a command writes a kind (an empty file holds nothing to lose);
# a one-line JSON object is both JSON and a one-epoch JSON-lines log
_ACCEPTS = {"jsonl": {"jsonl", "json"}}
PRECIOUS = {"checkpoint", "partial", "surface"}  # replaced only with --overwrite (or resumed by the command)
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_SNIFF_LIMIT = 64 << 20  # read at most this much of a file to tell its kind


def sniff(path: str | os.PathLike) -> str:
    """The kind of an existing file (a key of KINDS), from its bytes, not its name."""
    path = Path(path)
    st = os.stat(path)
    if stat.S_ISDIR(st.st_mode):
        return "folder"
    if not stat.S_ISREG(st.st_mode):
        return "special"
    if st.st_size == 0:
        return "empty"
    with open(path, "rb") as f:
        head = f.read(4096)
    if head.startswith(_HDF5_MAGIC):
        return _hdf5_kind(path)
    if head.startswith(b"PK\x03\x04"):
        return _zip_kind(path)
    if torch_container(path) == "legacy":
        return "torch"
    if head.startswith(b"# vtk DataFile"):
        return "vtk"
    if head.startswith(b"<?xml") and b"<VTKFile" in head:  # before the NUL test: appended raw data follows
        return "vts"
    if head.startswith(b"%PDF-"):
        return "pdf"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if (head.startswith(b"<?xml") or head.startswith(b"<svg")) and b"<svg" in head:
        return "svg"
    if b"\x00" in head:
        return "binary"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 4:  # not just a character cut at the 4096-byte boundary
            return "binary"
        text = head[:e.start].decode("utf-8")
    return _text_kind(path, text.lstrip("\ufeff \t\r\n"), st.st_size)


def _hdf5_kind(path: Path) -> str:
    try:
        import h5py

        with h5py.File(path, "r") as f:
            kind = f.attrs.get("kind")
    except Exception:  # noqa: BLE001 - a damaged HDF5 file is still "HDF5, not ours"
        return "hdf5"
    kind = kind.decode() if isinstance(kind, bytes) else kind
    return {"surface": "surface", "path": "line"}.get(kind, "hdf5")


def _zip_kind(path: Path) -> str:
    try:
        with zipfile.ZipFile(path) as z:
            pkl = next((i for i in z.infolist() if i.filename.endswith("data.pkl")), None)
            if pkl is None:
                return "zip"
            if pkl.file_size > _SNIFF_LIMIT:
                return "torch"
            data = z.read(pkl)
    except Exception:  # noqa: BLE001 - a damaged archive: we cannot tell whose it is
        return "binary"
    if b"kdprobe-checkpoint" in data:
        return "checkpoint"
    if b"run_key" in data:
        return "partial"
    return "torch"


def _text_kind(path: Path, text: str, size: int) -> str:
    low = text.lower()
    if low.startswith(("<!doctype html", "<html")):
        return "html"
    if low.startswith(("{", "[")) and size <= _SNIFF_LIMIT:
        body = path.read_text(encoding="utf-8-sig", errors="replace")
        try:
            json.loads(body)
            return "json"
        except (ValueError, RecursionError):  # RecursionError: nesting too deep to be any output of ours
            pass
        try:
            rows = [json.loads(ln) for ln in body.splitlines() if ln.strip()]
            if rows and all(isinstance(r, dict) for r in rows):
                return "jsonl"
        except (ValueError, RecursionError):
            pass
    first = text.splitlines()[0] if text else ""
    return "csv" if "," in first else "text"


def checkpoint_maker(path: str | os.PathLike) -> str | None:
    """Which kdprobe command wrote a checkpoint: meta["made_by"], else read off older files' metadata
    (a training history = train, a pruning record without one = prune); None when unknown."""

    try:
        meta = read_payload(path).get("meta")
    except KdprobeError:
        return None
    if not isinstance(meta, dict):
        return None
    if isinstance(meta.get("made_by"), str):
        return meta["made_by"]
    if "history" in meta:
        return "train"
    return "prune" if meta.get("pruning") else None


def _same(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _check_place(role: str, p: Path, kind: str) -> None:
    """A file path must not be a folder (and vice versa); the nearest existing ancestor must be a
    writable folder."""
    if kind == "folder":
        if p.exists() and not p.is_dir():
            raise KdprobeError(f"{role} {p} is a file, expected a folder (it is created if missing); "
                               "choose a folder path")
    elif p.is_dir():
        raise KdprobeError(f"{role} {p} is a folder, expected a file path; name a file inside it")
    anc = nearest_existing(p if kind == "folder" else p.parent)
    if not anc.is_dir():
        raise KdprobeError(f"{role} {p}: {anc} is a file, not a folder; choose another path")
    if not os.access(anc, os.W_OK | os.X_OK):
        try:
            ro = bool(os.statvfs(anc).f_flag & os.ST_RDONLY)
        except OSError:
            ro = False
        why = "read-only file system" if ro else "permission denied"
        raise KdprobeError(f"cannot write {role} {p}: {why}; write elsewhere")


def _paths(value) -> list[Path]:
    if value is None:
        return []
    if isinstance(value, (str, os.PathLike)):
        return [Path(value)]
    return [Path(v) for v in value if v is not None]


def check_outputs(command: str, outputs: Mapping[str, tuple], inputs: Mapping[str, object] | None = None, *,
                  overwrite: bool = False, keep: Iterable[str] = ()) -> dict[str, Path]:
    """Check a command's output paths before any work; returns {role: Path}.

    outputs: role (how the user names it: "--out", "--h5", "OUT.partial") -> (path or None, kind),
    kind a key of KINDS ("folder" for a folder the command fills). inputs: role -> a path, a list of
    paths or None. overwrite: the user passed --overwrite. keep: roles whose existing file the command
    resumes or skips itself (so it is not refused for existing). Inside kdprobe.files.io.run_scope the
    outputs stay locked until the scope ends."""
    outs = {role: (Path(p), kind) for role, (p, kind) in outputs.items() if p is not None}
    ins = [(role, p) for role, v in (inputs or {}).items() for p in _paths(v)]
    for role, (p, kind) in outs.items():
        if kind not in KINDS:
            raise ValueError(f"unknown output kind {kind!r}")  # a bug of the caller, not a user mistake
        _check_place(role, p, kind)
    items = list(outs.items())
    for i, (r1, (p1, _)) in enumerate(items):
        for r2, (p2, _) in items[i + 1:]:
            if _same(p1, p2):
                raise KdprobeError(f"{r1} and {r2} are the same file ({p1}); give each output its own path")
        for r2, p2 in ins:
            if _same(p1, p2):
                raise KdprobeError(f"{r1} {p1} is also the input {r2}; writing it would destroy that input; "
                                   f"choose another path for {r1}")
    # one writer per output: the checks below and the whole run happen under the lock (a refusal
    # releases it and removes the lock file again)
    hold_output_locks([(p, kind == "folder", role if role.startswith("--") else "--out", command)
                       for role, (p, kind) in outs.items()])
    for role, (p, kind) in outs.items():
        if kind == "folder" or not p.exists():
            continue
        have = sniff(p)
        if have != "empty" and have != kind and have not in _ACCEPTS.get(kind, ()):
            also = ", not even with --overwrite" if overwrite else ""
            raise KdprobeError(f"{role} {p} holds {KINDS[have]}; {command} writes {KINDS[kind]} there and never "
                               f"replaces another kind of file{also}; choose another path")
        if kind == have == "checkpoint" and overwrite:
            maker = checkpoint_maker(p)
            if maker is not None and maker != command:
                raise KdprobeError(f"{role} {p} is a checkpoint made by kdprobe {maker}; {command} --overwrite replaces "
                                   f"only checkpoints that {command} made; choose another path")
        if kind in PRECIOUS and have != "empty" and not overwrite and role not in set(keep):
            raise KdprobeError(f"{role} {p} exists ({KINDS[have]}); pass --overwrite to replace it, or choose "
                               "another path")
    return {role: p for role, (p, _) in outs.items()}
