"""kdprobe's cache folder: its layout, the locks that keep entries in use, listing and clearing it.

Layout under cache_dir() ($KDPROBE_CACHE or ~/.cache/kdprobe); an entry's name is what
`kdprobe cache list` shows and `kdprobe cache clear` takes:
  extracted/<key>/            an extracted archive; <key> = the first 16 hex digits of the sha256 of the
                              archive's bytes, so an archive replaced by another (even one of the same size
                              with the old modification time restored) is a new entry, never the old copy.
                              <key>/.complete holds {"source", "sha256"} once the copy is whole.
  extracted/<key>.tmp<pid>    an extraction in progress, or one a killed run left (same entry)
  imagefolder/<key>.pt        decoded uint8 tensors of an image folder, <key>.json names the folder
  arch-signatures-<h>.json    kdprobe.checkpoints.foreign's table of architecture signatures
  locks/<entry>.lock          advisory locks: whoever extracts, reads or writes an entry holds one
                              (shared to read, exclusive to extract or remove), so `clear` never removes
                              an entry another process is using; it skips it and says so.
Archives are extracted into it by kdprobe.data.archives.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import stat
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from kdprobe.errors import KdprobeError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks, clear then trusts the user
    fcntl = None


def cache_dir() -> Path:
    """Where decoded datasets and extracted archives are kept ($KDPROBE_CACHE or ~/.cache/kdprobe)."""
    return Path(os.environ.get("KDPROBE_CACHE", Path.home() / ".cache" / "kdprobe"))


def human(n: float) -> str:
    """Bytes as '1.5 GiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


# ---- locks ----

@contextmanager
def entry_lock(name: str, exclusive: bool = False, wait: bool = True) -> Iterator[bool]:
    """Hold the advisory lock of cache entry `name`; yields False (not held) when wait=False and it is taken.
    A cache folder where no lock file can be made (read-only) is read without one: nobody can remove from it."""
    fd = _lock(cache_dir() / "locks" / (name.replace("/", "-") + ".lock"), exclusive, wait) if fcntl else None
    try:
        yield fd != -1
    finally:
        if fd is not None and fd >= 0:
            os.close(fd)


def _lock(path: Path, exclusive: bool, wait: bool) -> int | None:
    """A locked descriptor of `path`, -1 if taken (wait=False), None if no lock file can be made."""
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError:
            return None
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | (0 if wait else fcntl.LOCK_NB))
        except OSError:
            os.close(fd)
            return -1
        if os.fstat(fd).st_nlink > 0:
            return fd
        os.close(fd)  # `clear` removed this lock file while we waited for it: take the new one


def touch(path: Path) -> None:
    """Mark an entry as used now (what `cache list` shows as last used); a read-only cache stays as it is."""
    try:
        os.utime(path)
    except OSError:
        pass


# ---- listing and clearing ----

_KEY = r"[0-9a-f]{16,64}"
_TEMP = re.compile(r"^\.(.+)\.[a-z0-9_]{8}\.tmp(\.[a-z0-9]{1,8})?$")  # kdprobe.files.io's temp files of NAME


@dataclass(frozen=True)
class CacheEntry:
    """One thing in the cache: what `kdprobe cache clear` removes as a whole."""

    name: str  # extracted/<key>, imagefolder/<key> or arch-signatures-<h>
    kind: str
    source: str  # the archive or folder it was made from ('' if not recorded)
    bytes: int
    last_used: float  # POSIX seconds
    paths: tuple[Path, ...]

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "source": self.source, "bytes": self.bytes,
                "last_used": self.last_used}


@dataclass(frozen=True)
class CacheListing:
    """The cache folder's entries, oldest use first."""

    root: Path
    entries: tuple[CacheEntry, ...]

    @property
    def bytes(self) -> int:
        return sum(e.bytes for e in self.entries)

    def to_dict(self) -> dict:
        return {"root": str(self.root), "bytes": self.bytes, "entries": [e.to_dict() for e in self.entries]}


def _real_dir(p: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(p).st_mode)  # a symlinked folder is not the cache's own: never entered
    except OSError:
        return False


def _size(p: Path) -> int:
    """Bytes under p, links counted as themselves (never followed)."""
    try:
        st = os.lstat(p)
    except OSError:
        return 0
    total = st.st_size
    if not stat.S_ISDIR(st.st_mode):
        return total
    for top, dirs, files in os.walk(p, followlinks=False):
        for n in dirs + files:
            try:
                total += os.lstat(os.path.join(top, n)).st_size
            except OSError:
                pass
    return total


def _mtime(p: Path) -> float:
    try:
        return os.lstat(p).st_mtime
    except OSError:
        return 0.0


def _json(p: Path, key: str) -> str:
    try:
        return str(json.loads(p.read_text()).get(key, ""))
    except (OSError, ValueError, AttributeError):
        return ""


def _group(folder: Path, pattern: str) -> dict[str, list[Path]]:
    """Files/folders directly in `folder` whose name (or whose temp file's name) matches pattern, by key."""
    out: dict[str, list[Path]] = {}
    if not _real_dir(folder):
        return out
    for p in sorted(folder.iterdir()):
        t = _TEMP.match(p.name)
        m = re.fullmatch(pattern, t.group(1) if t else p.name)
        if m:
            out.setdefault(m.group(1), []).append(p)
    return out


def list_cache() -> CacheListing:
    """What kdprobe's cache folder holds: every entry with its source, size and last use."""
    root = cache_dir()
    entries = []
    for key, paths in _group(root / "extracted", rf"({_KEY})(?:\.tmp\d+)?").items():
        done = root / "extracted" / key / ".complete"
        kind = "extracted archive" if done.is_file() else "extraction (unfinished)"
        entries.append(CacheEntry(f"extracted/{key}", kind, _json(done, "source"), sum(map(_size, paths)),
                                  _mtime(done) if done.is_file() else max(map(_mtime, paths)), tuple(paths)))
    for key, paths in _group(root / "imagefolder", rf"({_KEY})\.(?:pt|json)").items():
        pt = root / "imagefolder" / f"{key}.pt"
        entries.append(CacheEntry(f"imagefolder/{key}", "decoded images" if pt.is_file() else "decoded (unfinished)",
                                  _json(root / "imagefolder" / f"{key}.json", "source"), sum(map(_size, paths)),
                                  _mtime(pt) if pt.is_file() else max(map(_mtime, paths)), tuple(paths)))
    for key, paths in _group(root, rf"(arch-signatures-{_KEY})\.json").items():
        entries.append(CacheEntry(key, "architecture signatures", "", sum(map(_size, paths)),
                                  max(map(_mtime, paths)), tuple(paths)))
    return CacheListing(root, tuple(sorted(entries, key=lambda e: (e.last_used, e.name))))


@dataclass(frozen=True)
class ClearResult:
    """What `clear_cache` removed and what it left because another process was using it."""

    removed: tuple[CacheEntry, ...]
    in_use: tuple[CacheEntry, ...]

    @property
    def freed(self) -> int:
        return sum(e.bytes for e in self.removed)


def _remove(p: Path, root: Path) -> None:
    """Remove one path of an entry: a link is unlinked (its target untouched), a folder removed without
    following any link inside it; only paths whose folder lies inside the cache folder `root`."""
    top = os.path.realpath(root)  # entries come from root's own listing: this only guards that rule
    assert os.path.commonpath([os.path.realpath(p.parent), top]) == top, p
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(p)  # removes symlinks inside as links, never what they point at
    else:
        if _TEMP.match(p.name) and fcntl is not None and not _unlocked(p):
            return  # a live writer's temp file (kdprobe.files.io locks its own)
        p.unlink()


def _unlocked(p: Path) -> bool:
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _find(listing: CacheListing, name: str) -> CacheEntry:
    n = name.strip().rstrip("/")
    hits = [e for e in listing.entries if n in (e.name, e.name.split("/")[-1])]
    if len(hits) != 1:
        why = "no cache entry" if not hits else "more than one cache entry"
        raise KdprobeError(f"{why} named {name!r} in {listing.root}; `kdprobe cache list` shows the entries "
                           "(its entry column)")
    return hits[0]


def clear_cache(names: Sequence[str] = (), everything: bool = False) -> ClearResult:
    """Remove cache entries by name (every named one must exist and be free, or nothing is removed), or
    every entry (`everything`: those in use by another process are left and reported)."""
    if bool(names) == everything:
        raise KdprobeError("name the cache entries to remove (see `kdprobe cache list`) or pass --all, not both"
                           if names else "name the cache entries to remove (see `kdprobe cache list`) or pass --all")
    listing = list_cache()
    targets = listing.entries if everything else tuple(dict.fromkeys(_find(listing, n) for n in names))
    removed, in_use = [], []
    with _all_locks(targets) as held:
        busy = [e for e, ok in zip(targets, held) if not ok]
        if busy and not everything:
            raise KdprobeError(f"cache entry {busy[0].name} is in use by another kdprobe process right now; nothing "
                               "was removed: run the same command again when that process has finished")
        for e, ok in zip(targets, held):
            if not ok:
                in_use.append(e)
                continue
            for p in e.paths:
                _remove(p, listing.root)
            lock = listing.root / "locks" / (e.name.replace("/", "-") + ".lock")
            lock.unlink(missing_ok=True)  # while held: a waiter notices (nlink 0) and takes a fresh one
            removed.append(e)
    if everything:
        _drop_orphan_locks(listing.root, {e.name.replace("/", "-") + ".lock" for e in in_use})
    return ClearResult(tuple(removed), tuple(in_use))


def _drop_orphan_locks(root: Path, keep: set[str]) -> None:
    """Lock files left by entries that are gone (a failed extraction), unless someone holds them."""
    folder = root / "locks"
    if not _real_dir(folder):
        return
    for p in folder.iterdir():
        if p.suffix == ".lock" and p.name not in keep and stat.S_ISREG(os.lstat(p).st_mode):
            fd = _lock(p, exclusive=True, wait=False)
            if fd is not None and fd >= 0:
                p.unlink(missing_ok=True)
                os.close(fd)


@contextmanager
def _all_locks(entries: Sequence[CacheEntry]) -> Iterator[list[bool]]:
    from contextlib import ExitStack

    with ExitStack() as stack:
        yield [stack.enter_context(entry_lock(e.name, exclusive=True, wait=False)) for e in entries]


def since(t: float) -> str:
    """'3 h ago' for a POSIX time."""
    d = max(0.0, time.time() - t)
    for unit, s in (("d", 86400), ("h", 3600), ("min", 60)):
        if d >= s:
            return f"{d / s:.0f} {unit} ago"
    return "just now"
