"""Atomic file writing, and one-line errors when the file system says no.

Every file kdprobe writes goes through `atomic_path`: a temporary file next to the target,
renamed over it only when complete, so a reader never sees a half-written file and a kill
never corrupts one. A failed write (full disk, read-only file system, no permission) becomes
a `WriteError` naming the path and the reason, the temporary file is removed, and temporary
files a killed run left behind (`.NAME.XXXXXXXX.tmp`) are removed by the next write of NAME.
"""
from __future__ import annotations

import errno
import hashlib
import io
import os
import re
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from kdprobe.errors import KdprobeError

try:  # advisory locks tell a temp file in use from one a killed run left (POSIX only)
    import fcntl
except ImportError:  # pragma: no cover - Windows: stale temp files are then left alone
    fcntl = None

_NO_SPACE = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


class WriteError(KdprobeError):
    """Writing `path` failed for a reason outside kdprobe (full disk, read-only, permissions)."""

    def __init__(self, path: Path, reason: str, fix: str, code: int | None = None):
        self.path, self.reason, self.fix, self.errno = Path(path), reason, fix, code
        super().__init__(f"{reason}; {fix}")

    @property
    def no_space(self) -> bool:
        return self.errno in _NO_SPACE

    def with_note(self, note: str) -> "WriteError":
        """The same error with a note (e.g. what was kept) between the reason and the fix."""
        return WriteError(self.path, f"{self.reason}; {note}", self.fix, self.errno)


def nearest_existing(path: str | os.PathLike) -> Path:
    """`path` made absolute, or its closest ancestor that exists (what a new file would be created in)."""
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _mount_point(path: Path) -> Path:
    p = nearest_existing(path)
    while not os.path.ismount(p) and p != p.parent:
        p = p.parent
    return p


def _errno_of(exc: BaseException, folder: Path) -> int | None:
    """The OS error behind `exc`: its errno, one named in a library's message (h5py, torch), or the
    state of the file system (full / read-only) when a library lost the errno on the way."""
    code = getattr(exc, "errno", None)
    if isinstance(code, int) and code:
        return code
    m = re.search(r"errno = (\d+)", str(exc))
    if m:
        return int(m.group(1))
    if not isinstance(exc, (OSError, RuntimeError)):
        return None
    try:
        st = os.statvfs(nearest_existing(folder))
    except OSError:
        return None
    if st.f_flag & os.ST_RDONLY:
        return errno.EROFS
    if st.f_bavail * st.f_frsize < (1 << 20):  # under 1 MiB left: that is why the write failed
        return errno.ENOSPC
    return None


def write_error(path: str | os.PathLike, exc: BaseException) -> WriteError | None:
    """A one-line WriteError for a failed write of `path`, or None when `exc` is not a file-system refusal."""
    path = Path(path)
    code = _errno_of(exc, path.parent)
    again = "then run the same command again"
    if code in _NO_SPACE:
        return WriteError(path, f"no space left on {_mount_point(path)} (writing {path})",
                          f"free some space or write elsewhere, {again}", code)
    if code == errno.EROFS:
        return WriteError(path, f"cannot write {path}: read-only file system", f"write elsewhere, {again}", code)
    if code in (errno.EACCES, errno.EPERM):
        return WriteError(path, f"cannot write {path}: permission denied",
                          f"fix the folder's permissions or write elsewhere, {again}", code)
    if code in (errno.ENOTDIR, errno.EEXIST) and not path.parent.is_dir():
        return WriteError(path, f"cannot write {path}: a part of its folder path is a file, not a folder",
                          "choose another path", code)
    if code == errno.EISDIR:
        return WriteError(path, f"cannot write {path}: it is a folder", "choose a file path", code)
    if code in (errno.ENAMETOOLONG, errno.EFBIG, errno.EIO, errno.EMFILE, errno.ENFILE):
        return WriteError(path, f"cannot write {path}: {os.strerror(code).lower()}", f"write elsewhere, {again}", code)
    return None


def _stale_temps(path: Path) -> list[Path]:
    # .NAME.XXXXXXXX.tmp, and the side files a writer library adds to it (.tmp.vts: see locked_side_file)
    pat = re.compile(rf"^\.{re.escape(path.name)}\.[a-z0-9_]{{8}}\.tmp(\.[a-z0-9]{{1,8}})?$")
    try:
        return [p for p in path.parent.iterdir() if pat.match(p.name)]
    except OSError:
        return []


def _remove_stale_temps(path: Path) -> None:
    """Remove temporary files of `path` that a killed run left: a live writer holds a lock on its own."""
    if fcntl is None:
        return
    for p in _stale_temps(path):
        try:
            fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # another process is writing it right now
            p.unlink(missing_ok=True)
        except OSError:
            pass
        finally:
            os.close(fd)


def _locked_temp(path: Path) -> tuple[int, Path]:
    """mkstemp next to `path`, locked so that no other process takes it for a stale one."""
    for _ in range(10):
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        if fcntl is None:
            return fd, Path(tmp)
        fcntl.flock(fd, fcntl.LOCK_EX)
        if os.fstat(fd).st_nlink > 0:  # not removed by a cleaner between mkstemp and flock
            return fd, Path(tmp)
        os.close(fd)
    raise OSError(errno.EEXIST, f"could not create a temporary file next to {path}")


@contextmanager
def locked_side_file(tmp: Path, suffix: str) -> Iterator[Path]:
    """`tmp` + suffix, created and locked now, for a library that insists on naming its own output
    (pyevtk appends ".vts"): a kill leaves a file that the next run's stale cleanup recognizes and,
    unlike a live writer's, can lock. Removed on the way out."""
    side = Path(str(tmp) + suffix)
    fd = os.open(side, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)  # the library reopens the same inode: the lock stays on it
        yield side
    finally:
        os.close(fd)
        side.unlink(missing_ok=True)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success rename it over `path`.

    A file-system refusal (full disk, read-only, permissions) becomes a one-line WriteError;
    the temporary file is removed whatever happens."""
    path = Path(path)
    fd, tmp = -1, None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(path)
        fd, tmp = _locked_temp(path)
        yield tmp
        # mkstemp creates 0600; give the file the permissions a plain open() would have
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)  # atomic on POSIX and Windows for same-filesystem paths
    except KdprobeError:
        raise
    except Exception as e:
        err = write_error(path, e)
        if err is None:
            raise
        raise err from None
    finally:
        if tmp is not None:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass  # a read-only or vanished folder: nothing more to clean
        if fd >= 0:
            os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    # one function for every byte write, so tests can simulate a full disk here
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())  # a full disk may only show when the data reaches it


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write a binary file atomically."""
    with atomic_path(path) as tmp:
        _write_file(tmp, data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file atomically (UTF-8)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def torch_bytes(obj) -> bytes:
    """torch.save into memory: a full disk then fails in our write (a clear errno), not inside torch's
    zip writer ('unexpected pos ...'); and the zip's record names do not depend on a temp file name."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def save_torch(obj, path: str | os.PathLike) -> None:
    """torch.save atomically."""
    atomic_write_bytes(path, torch_bytes(obj))


def require_regular_file(path: str | os.PathLike, what: str = "file") -> Path:
    """`path` as a Path if it is an existing regular file; a one-line error otherwise (a FIFO or a
    device would block or stream forever when opened, so they are refused before any open)."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise KdprobeError(f"{what} {path} does not exist; check the path") from None
    except NotADirectoryError:
        raise KdprobeError(f"{what} {path} does not exist (a part of its folder path is a file); check the path") from None
    except PermissionError:
        raise KdprobeError(f"cannot read {what} {path}: permission denied; fix its permissions") from None
    except OSError as e:
        raise KdprobeError(f"cannot read {what} {path}: {e.strerror or e}; check the path") from None
    if stat.S_ISDIR(st.st_mode):
        raise KdprobeError(f"{what} {path} is a folder, expected a file; name the file inside it")
    if not stat.S_ISREG(st.st_mode):
        kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode)
                else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "not a regular file")
        raise KdprobeError(f"{what} {path} is {kind}, expected a regular file; save it to a file first")
    if not os.access(path, os.R_OK):
        raise KdprobeError(f"cannot read {what} {path}: permission denied; fix its permissions")
    return path


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes (teacher provenance, cache keys)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_text(path: str | os.PathLike, what: str = "file") -> str:
    """A text file decoded as UTF-8 (a leading byte-order mark is dropped); any other encoding is a
    one-line KdprobeError naming the file, the line and the offending byte."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        hint = " (it looks like UTF-16)" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
        raise KdprobeError(f"{path}:{line}: expected a UTF-8 {what}, got byte 0x{data[e.start]:02x} at offset "
                           f"{e.start} that is not UTF-8{hint}; save the file as UTF-8 and run again") from None
