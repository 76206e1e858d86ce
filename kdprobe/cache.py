"""kdprobe's cache folder: archives extracted under a cap, what the cache holds, and clearing it.

Layout under cache_dir() ($KDPROBE_CACHE or ~/.cache/kdprobe); an entry's name is what
`kdprobe cache list` shows and `kdprobe cache clear` takes:
  extracted/<key>/            an extracted archive; <key> = the first 16 hex digits of the sha256 of the
                              archive's bytes, so an archive replaced by another (even one of the same size
                              with the old modification time restored) is a new entry, never the old copy.
                              <key>/.complete holds {"source", "sha256"} once the copy is whole.
  extracted/<key>.tmp<pid>    an extraction in progress, or one a killed run left (same entry)
  imagefolder/<key>.pt        decoded uint8 tensors of an image folder, <key>.json names the folder
  arch-signatures-<h>.json    kdprobe.foreign's table of architecture signatures
  locks/<entry>.lock          advisory locks: whoever extracts, reads or writes an entry holds one
                              (shared to read, exclusive to extract or remove), so `clear` never removes
                              an entry another process is using; it skips it and says so.
Extraction is capped (extract_limit): the member headers are summed before anything is written,
and free space is checked again while extracting.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import stat
import tarfile
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from kdprobe.errors import KdprobeError
from kdprobe.io import nearest_existing, write_error

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks, clear then trusts the user
    fcntl = None

EXTRACT_LIMIT = 8 << 30  # bytes an archive may extract by default (CIFAR-10 as JPEGs: 0.25 GiB)
EXTRACT_LIMIT_ENV = "KDPROBE_EXTRACT_LIMIT"
BLOCK = 4096  # every extracted file or folder is counted as at least one disk block (bytes)
FREE_MARGIN = 256 << 20  # bytes left free on the cache's disk after an extraction
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


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


# ---- extraction ----

def extract_limit() -> int:
    """Bytes one archive may extract: $KDPROBE_EXTRACT_LIMIT (e.g. 20G) or EXTRACT_LIMIT."""
    text = os.environ.get(EXTRACT_LIMIT_ENV, "").strip()
    if not text:
        return EXTRACT_LIMIT
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?", text, re.IGNORECASE)
    if not m or float(m.group(1)) <= 0:
        raise KdprobeError(f"expected {EXTRACT_LIMIT_ENV} to be a size in bytes such as 20G or 500M, got {text!r}; "
                           "fix or unset it")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def _blocks(size: int) -> int:
    return max(BLOCK, -(-size // BLOCK) * BLOCK)


def _charge(m: tarfile.TarInfo) -> int:
    """Disk bytes an archive member takes once extracted (file data rounded up to blocks, at least one block)."""
    return _blocks(m.size if m.isreg() else 0)


def _free(folder: Path) -> int:
    st = os.statvfs(nearest_existing(folder))
    return st.f_bavail * st.f_frsize


def _over_cap(archive: Path, need: int, entries: int, limit: int, when: str) -> KdprobeError:
    return KdprobeError(
        f"archive {archive} would extract {human(need)} ({entries:,} entries; {when}) from a "
        f"{human(archive.stat().st_size)} file, more than the extraction cap of {human(limit)}; if you trust it, "
        f"raise the cap, e.g. {EXTRACT_LIMIT_ENV}={-(-need // (1 << 30)) + 1}G, and run again")


def _check_free(archive: Path, need: int, folder: Path, when: str) -> None:
    free = _free(folder)
    if need > free - FREE_MARGIN:
        raise KdprobeError(f"extracting {archive} needs {human(need)} more but {nearest_existing(folder)} has "
                           f"{human(free)} free ({when}); free some space (kdprobe cache clear) or point "
                           "KDPROBE_CACHE at a bigger disk, then run again")


def _metered(tf: tarfile.TarFile, archive: Path, limit: int, tmp: Path) -> Iterator[tarfile.TarInfo]:
    """The members one at a time, for extractall. Before each: the bytes really written so far (the files on
    disk, not their headers) against the cap, and, every 64 MiB, the free space against what is still to come
    (another process may be filling the same disk)."""
    members = tf.getmembers()
    need = sum(map(_charge, members))
    written = checked = 0
    prev = None
    for m in members:
        if prev is not None:
            try:
                written += _blocks(os.lstat(tmp / prev.name.lstrip("/")).st_size if prev.isreg() else 0)
            except OSError:
                written += _charge(prev)
        if written > limit:
            raise _over_cap(archive, written, len(members), limit, "counted from the files written")
        if written - checked >= 64 << 20:
            _check_free(archive, need - written, tmp, "while extracting")
            checked = written
        prev = m
        yield m


def _bad_archive(archive: Path, e: BaseException) -> KdprobeError:
    if isinstance(e, OSError) and not isinstance(e, tarfile.TarError):
        err = write_error(cache_dir() / "extracted" / "x", e)
        if err is not None:
            return err
    why = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
    return KdprobeError(f"imagefolder:{archive} is a file but not a readable tar archive ({why}); pass a folder "
                        "ROOT/train/<class>/*.jpg or a .tar/.tar.gz of one")


def publish_extracted(tmp: Path, dest: Path) -> None:
    """Move a finished extraction into place. Another process may have finished the same archive first
    and be reading it now: then keep its copy and drop ours, never delete a complete one."""
    if (dest / ".complete").exists():
        shutil.rmtree(tmp, ignore_errors=True)
        return
    if dest.exists():  # a killed run's incomplete copy
        shutil.rmtree(dest, ignore_errors=True)
    try:
        os.replace(tmp, dest)
    except OSError:
        if not (dest / ".complete").exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # lost the race to an equal copy


def _extract(f, archive: Path, sha: str, dest: Path) -> None:
    limit = extract_limit()
    tmp = dest.with_name(f"{dest.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # this process id's leftover from an earlier, killed run
    try:
        tmp.mkdir(parents=True)
        f.seek(0)
        with tarfile.open(fileobj=f) as tf:
            need = n = 0
            for m in tf:  # headers only (a .gz is decompressed as a stream, never held): refuse before writing
                need, n = need + _charge(m), n + 1
                if need > limit:
                    raise _over_cap(archive, need, n, limit, "counted from its headers, before extracting")
            _check_free(archive, need, tmp, "before extracting")
            # 'data' filter: no absolute paths, no links out of the folder, no devices
            tf.extractall(tmp, members=_metered(tf, archive, limit, tmp), filter="data")
        (tmp / ".complete").write_text(json.dumps({"source": str(archive.resolve()), "sha256": sha}) + "\n")
        publish_extracted(tmp, dest)
    except KdprobeError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except tarfile.FilterError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise KdprobeError(f"archive {archive} holds an unsafe member ({e}); kdprobe extracts only files and "
                           "folders that stay inside the archive's own folder: repack it without that member") from None
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _bad_archive(archive, e) from None


@contextmanager
def extracted(archive: Path) -> Iterator[tuple[Path, str]]:
    """Extract a tar archive into the cache (once per content) and yield (its folder, the archive's sha256),
    holding the entry's shared lock so that `kdprobe cache clear` leaves it alone while it is read."""
    import hashlib

    with open(archive, "rb") as f:
        before = os.fstat(f.fileno())
        h = hashlib.sha256()
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
        sha = h.hexdigest()
        name = f"extracted/{sha[:16]}"
        dest = cache_dir() / name
        while True:
            with entry_lock(name):
                if (dest / ".complete").is_file():
                    _touch(dest / ".complete")
                    yield dest, sha
                    return
            with entry_lock(name, exclusive=True):  # one extractor per archive; readers wait for it
                if not (dest / ".complete").is_file():
                    _extract(f, archive, sha, dest)
                    after = os.fstat(f.fileno())
                    if (after.st_size, after.st_mtime_ns, after.st_ctime_ns) != (
                            before.st_size, before.st_mtime_ns, before.st_ctime_ns):
                        shutil.rmtree(dest, ignore_errors=True)
                        raise KdprobeError(f"archive {archive} changed while it was being extracted; "
                                           "let whatever writes it finish, then run again")


def _touch(path: Path) -> None:
    """Mark an entry as used now (what `cache list` shows as last used); a read-only cache stays as it is."""
    try:
        os.utime(path)
    except OSError:
        pass


# ---- listing and clearing ----

_KEY = r"[0-9a-f]{16,64}"
_TEMP = re.compile(r"^\.(.+)\.[a-z0-9_]{8}\.tmp(\.[a-z0-9]{1,8})?$")  # kdprobe.io's temp files of NAME


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
    assert os.path.realpath(p.parent).startswith(os.path.realpath(root)), p  # entries come from root's listing
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(p)  # removes symlinks inside as links, never what they point at
    else:
        if _TEMP.match(p.name) and fcntl is not None and not _unlocked(p):
            return  # a live writer's temp file (kdprobe.io locks its own)
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
                           "(pass a NAME from its first column)")
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
    return ClearResult(tuple(removed), tuple(in_use))


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
