"""Tar archives of image folders, extracted into kdprobe's cache once per content and under a cap.

An archive's cache entry is named by the sha256 of its bytes (kdprobe.data.cache describes the layout), so an
archive replaced by another, even one of the same size with the old modification time restored, is
extracted anew and never served from the old copy. Hashing costs about 15 ms for CIFAR-10's 19 MB.

The cap (extract_limit, $KDPROBE_EXTRACT_LIMIT, default 8 GiB): the member headers are summed before
anything is written (a tar.gz that would expand a megabyte into gigabytes is refused with nothing on
disk), the files really written are counted again while extracting, and the cache's disk must keep
FREE_MARGIN free, checked before and every 64 MiB during extraction.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tarfile
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from kdprobe.data.cache import cache_dir, entry_lock, human, touch
from kdprobe.errors import KdprobeError
from kdprobe.files.io import nearest_existing, sha256_stream, write_error

EXTRACT_LIMIT = 8 << 30  # bytes an archive may extract by default (CIFAR-10 as JPEGs: 0.25 GiB)
EXTRACT_LIMIT_ENV = "KDPROBE_EXTRACT_LIMIT"
BLOCK = 4096  # every extracted file or folder is counted as at least one disk block (bytes)
FREE_MARGIN = 256 << 20  # bytes left free on the cache's disk after an extraction
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


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
    # counting stops at the first entry past the cap: a bomb is not decompressed to the end to report its size
    suggest = -(-max(2 * need, 2 * limit) // (1 << 30))
    return KdprobeError(
        f"archive {archive} ({human(archive.stat().st_size)}) would extract more than the extraction cap of "
        f"{human(limit)}: {human(need)} in its first {entries:,} entries ({when}); if you trust it, raise the cap "
        f"with {EXTRACT_LIMIT_ENV}=SIZE (e.g. {EXTRACT_LIMIT_ENV}={suggest}G) and run again")


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
    for i, m in enumerate(members):
        if prev is not None:
            try:
                written += _blocks(os.lstat(tmp / prev.name.lstrip("/")).st_size if prev.isreg() else 0)
            except OSError:
                written += _charge(prev)
        if written > limit:
            raise _over_cap(archive, written, i, limit, "counted from the files written")
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
    with open(archive, "rb") as f:
        before = os.fstat(f.fileno())
        sha = sha256_stream(f)  # the bytes of this open file, whose identity is checked again below
        name = f"extracted/{sha[:16]}"
        dest = cache_dir() / name
        while True:
            with entry_lock(name):
                if (dest / ".complete").is_file():
                    touch(dest / ".complete")
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
