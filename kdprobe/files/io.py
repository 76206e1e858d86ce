"""Atomic file writing, and one-line errors when the file system says no.

Every file kdprobe writes goes through `atomic_path`: a temporary file next to the target,
renamed over it only when complete, so a reader never sees a half-written file and a kill
never corrupts one. A failed write (full disk, read-only file system, no permission) becomes
a `WriteError` naming the path and the reason, the temporary file is removed, and temporary
files a killed run left behind (`.NAME.XXXXXXXX.tmp`) are removed by the next write of NAME.

One writer per output: `output_lock` / `hold_output_locks` hold an exclusive advisory lock on each
output for a whole run, so a second run to the same output fails at once with one line, and the
final rename of a locked output never replaces a file that another program put there meanwhile.
"""
from __future__ import annotations

import errno
import hashlib
import io
import os
import re
import socket
import stat
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
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


def _publish(tmp: Path, path: Path) -> None:
    """Rename `tmp` over `path` (atomic on POSIX and Windows for same-filesystem paths). For an output
    this process holds a lock on, never over a file that another program put there meanwhile: only
    over the file the run's checks approved or its own last write (same device and inode)."""
    held = _held_for(path)
    if held is None:
        os.replace(tmp, path)
        return
    now = _identity(path)
    if now is not None and now != held.seen:
        raise _appeared(path)
    if now is None:
        try:
            os.link(tmp, path)  # fails if a file appeared since the stat: no rename replaces it
        except FileExistsError:
            raise _appeared(path) from None
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.EXDEV, errno.EMLINK, errno.ENOSYS,
                               getattr(errno, "ENOTSUP", errno.EPERM), getattr(errno, "EOPNOTSUPP", errno.EPERM)):
                raise
            os.replace(tmp, path)  # no hard links on this file system: the stat above is the check
    else:
        os.replace(tmp, path)
    held.seen = _identity(path)


def _appeared(path: Path) -> KdprobeError:
    return KdprobeError(f"{path} was created or replaced by another program while this run was writing it, so "
                        "this run's result was not saved over it; move that file away or choose another path, "
                        "then run the same command again")


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
        _publish(tmp, path)
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


def sha256_stream(f) -> str:
    """Hex sha256 of what is left to read in a binary file object, read 1 MiB at a time."""
    h = hashlib.sha256()
    for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
    return h.hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes (teacher provenance, cache keys)."""
    with open(path, "rb") as f:
        return sha256_stream(f)


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


# ---- one writer per output: exclusive advisory locks held for a whole run ---------------------------
#
# Every output of a run is locked (fcntl.flock, non-blocking) from its checks to its end, so a second
# kdprobe run to the same output fails at once instead of racing the first to the final rename. The
# lock file is `.NAME.lock` next to a file output and `.kdprobe.lock` inside a folder output; it holds
# "pid=... started=... command=..." for the message, and it is removed when the run ends. A killed
# run's lock is released by the kernel: the file it leaves is taken over (and removed) by the next
# run, so resuming works as before. Locks are per process and reentrant (the CLI locks OUT, then the
# trainer it calls locks it again); under torchrun only rank 0, the rank that writes, takes them.

FOLDER_LOCK = ".kdprobe.lock"
_LOCK_NOTE_MIN_FREE = 1 << 20  # bytes free below which the lock file is left empty


@dataclass
class _Held:
    fd: int
    lock: Path | None
    made: list  # folders created to hold the lock file: removed again when left empty
    seen: tuple | None  # (device, inode) of the output as checked, then as this run last wrote it
    count: int
    pid: int


_HELD: dict[str, _Held] = {}
_SCOPES: list[list[str]] = []


def lock_path(path: str | os.PathLike, folder: bool = False) -> Path:
    """The lock file of an output: `.NAME.lock` next to a file, `.kdprobe.lock` inside a folder."""
    path = Path(path)
    return path / FOLDER_LOCK if folder else path.with_name(f".{path.name}.lock")


def _key(path: str | os.PathLike) -> str:
    return os.path.realpath(os.path.abspath(path))


def _identity(path: str | os.PathLike) -> tuple | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _held_for(path: Path) -> _Held | None:
    if not _HELD:
        return None
    held = _HELD.get(_key(path))
    return held if held is not None and held.pid == os.getpid() else None  # a forked child holds nothing


def _make_folders(folder: Path) -> list[Path]:
    """mkdir -p `folder`; returns the folders it created, outermost first."""
    missing, p = [], folder
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    made = []
    for d in reversed(missing):
        try:
            d.mkdir()
            made.append(d)
        except FileExistsError:
            pass
    return made


def _remove_folders(made: list[Path]) -> None:
    for d in reversed(made):
        try:
            d.rmdir()
        except OSError:
            return  # not empty (outputs, another run's lock): kept, and so are the folders above it


def _holder(lock: Path) -> str:
    """'pid N, started T, kdprobe CMD' of the run holding `lock` (read off the file it wrote)."""
    info = {}
    for _ in range(10):  # the holder writes it right after taking the lock
        try:
            info = dict(kv.split("=", 1) for kv in lock.read_text(errors="replace").split() if "=" in kv)
        except OSError:
            pass
        if "pid" in info:
            break
        time.sleep(0.05)
    if "pid" not in info:
        return "pid unknown"
    host = f" on {info['host']}" if info.get("host", socket.gethostname()) != socket.gethostname() else ""
    when = info.get("started", "?").replace("T", " ")
    return f"pid {info['pid']}{host}, started {when}, kdprobe {info.get('command', '?')}"


def _acquire(path: Path, folder: bool, command: str, flag: str) -> str | None:
    """Lock one output for this process (again, if it already holds it); the key to release, or None
    where no lock is taken (a torchrun rank other than 0)."""
    if os.environ.get("RANK", "0") not in ("", "0"):
        return None
    key = _key(path)
    held = _HELD.get(key)
    if held is not None and held.pid == os.getpid():
        held.count += 1
        return key
    if fcntl is None:  # no advisory locks here: the final rename still refuses a file that appeared
        _HELD[key] = _Held(-1, None, [], None if folder else _identity(path), 1, os.getpid())
        return key
    lock = lock_path(path, folder)
    made: list[Path] = []
    try:
        for _ in range(50):
            made += _make_folders(lock.parent)
            try:
                fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0),
                             0o644)
            except FileNotFoundError:  # a run that just failed removed the folder it had made
                continue
            except OSError as e:  # checked writable before; a read-only remount, a folder named like the lock
                raise write_error(lock, e) or e from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise KdprobeError(f"another kdprobe run ({_holder(lock)}) is writing {path}; wait for it to "
                                   f"finish or choose another {flag}") from None
            except BaseException:
                os.close(fd)
                raise
            st = os.fstat(fd)
            if _identity(lock) == (st.st_dev, st.st_ino):
                break  # not a file that its last holder removed between our open and our lock
            os.close(fd)
        else:
            raise OSError(errno.EAGAIN, f"could not lock {lock}")
    except BaseException:
        _remove_folders(made)
        raise
    try:
        os.ftruncate(fd, 0)
        st = os.statvfs(lock.parent)
        # who holds it, for the other run's message; an empty file takes no space, so on a nearly full
        # disk (where a page or block for these bytes could cost the run its own output) it stays empty
        if st.f_bavail * st.f_frsize >= _LOCK_NOTE_MIN_FREE:
            note = (f"pid={os.getpid()} host={socket.gethostname()} started={time.strftime('%Y-%m-%dT%H:%M:%S')} "
                    f"command={command.replace(' ', '_')}\n")
            os.pwrite(fd, note.encode(), 0)
    except OSError:
        pass  # the lock holds all the same; the other run's message then says "pid unknown"
    # what the run's checks see now (under the lock) is what its final rename may replace
    _HELD[key] = _Held(fd, lock, made, None if folder else _identity(path), 1, os.getpid())
    return key


def _release(key: str | None) -> None:
    held = _HELD.get(key) if key is not None else None
    if held is None or held.pid != os.getpid():
        return
    held.count -= 1
    if held.count > 0:
        return
    del _HELD[key]
    if held.lock is not None:
        try:
            held.lock.unlink()  # while still locked: a run that opened the old file sees it is gone
        except OSError:
            pass
    if held.fd >= 0:
        os.close(held.fd)
    _remove_folders(held.made)


def _acquire_all(outputs) -> list:
    """Lock every (path, folder, flag, command) of `outputs` in the caller's order (the main output first,
    so a second run of the same command is told about that one); all or nothing."""
    keys: list = []
    try:
        for path, folder, flag, command in outputs:
            keys.append(_acquire(Path(path), folder, command, flag))
    except BaseException:
        for k in reversed(keys):
            _release(k)
        raise
    return keys


def _outputs(files, folders, command: str, flag: str) -> list:
    return ([(p, False, flag, command) for p in files if p is not None]
            + [(p, True, flag, command) for p in folders if p is not None])


@contextmanager
def output_lock(files=(), folders=(), *, command: str, flag: str = "--out") -> Iterator[None]:
    """Hold exclusive locks on output files and folders for the block; another run holding one is a
    one-line KdprobeError naming its pid and start time (`flag` is the option the message suggests changing)."""
    keys = _acquire_all(_outputs(files, folders, command, flag))
    try:
        yield
    finally:
        for k in reversed(keys):
            _release(k)


@contextmanager
def run_scope() -> Iterator[None]:
    """One command's run: the locks `hold_output_locks` takes inside it are released when it ends."""
    _SCOPES.append([])
    try:
        yield
    finally:
        for k in reversed(_SCOPES.pop()):
            _release(k)


def hold_output_locks(outputs) -> bool:
    """Lock (path, folder, flag, command) outputs until the enclosing `run_scope` ends (every CLI command
    runs in one); outside a scope nothing is locked and False is returned."""
    if not _SCOPES:
        return False
    _SCOPES[-1].extend(_acquire_all(outputs))
    return True
