"""Files that are whole or absent: atomic writes, a lock between processes, cleaning up after dead writers.

A writer can die at any moment (kill -9, a preempted job, a power cut). So nothing is written in place:
the bytes go to a temporary name beside the target, and only a complete file (or folder) is renamed over
it with `os.replace`, which is atomic on one file system. The temporary name records its writer,

    .<name>.tmp-<random>-<pid>@<host>

so a later process can tell a dead writer's leftovers from a live writer's work in progress, and
`clean_stale_temps` removes only the former. `FileLock` keeps two writers of the same thing apart (two
processes building one cache): a lock on a lock file that the kernel releases when its holder dies, so a
crashed holder never leaves a lock behind.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
import socket
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Self

try:
    import fcntl
except ImportError:  # Windows: no POSIX locks; FileLock then warns and does not lock
    fcntl = None

HOST = socket.gethostname().replace("@", "_").replace(os.sep, "_")
_WRITER = re.compile(r"-(?P<pid>\d+)(@(?P<host>[^@]+))?$")  # a name without @host: an older one, this host


def temp_path(path: str | Path, kind: str = "tmp") -> Path:
    """A new name beside `path` recording this process as writer: `.<name>.<kind>-<rand>-<pid>@<host>`."""
    path = Path(path)
    return path.parent / f".{path.name}.{kind}-{secrets.token_hex(4)}-{os.getpid()}@{HOST}"


def writer_alive(temp: str | Path) -> bool:
    """Whether the process that named `temp` may still be writing it.

    True unless the name records a process of this host that no longer exists: a writer on another host
    (a shared file system) or a name without a record cannot be checked, so it counts as alive.
    """
    found = _WRITER.search(Path(temp).name)
    # On Windows os.kill(pid, 0) would terminate the process: there, nothing counts as dead.
    if found is None or (found["host"] or HOST) != HOST or os.name == "nt":
        return True
    try:
        os.kill(int(found["pid"]), 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def clean_stale_temps(folder: str | Path, pattern: str) -> list[Path]:
    """Remove what in `folder` matches the glob `pattern` and was written by a dead process; returns it.

    E.g. `clean_stale_temps(run_dir, ".last.pt.tmp-*")` after a kill -9 during a checkpoint save. What a
    live writer (or one that cannot be checked) is writing is left alone.
    """
    removed = []
    for temp in sorted(Path(folder).glob(pattern)):
        if writer_alive(temp):
            continue
        if temp.is_dir() and not temp.is_symlink():
            shutil.rmtree(temp, ignore_errors=True)
        else:
            temp.unlink(missing_ok=True)
        removed.append(temp)
    return removed


def fsync_dir(folder: str | Path) -> None:
    """Make a rename in `folder` durable (POSIX); not possible, nor needed, on Windows."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_write(path: str | Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """Write a file that is either its old self or complete: `with atomic_write(p) as f: f.write(...)`.

    The bytes go to a `temp_path`, are flushed to disk, and replace `path` only when the block ends
    without an error; on an error the temporary file is removed and `path` is untouched.
    """
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Build a folder that appears whole or not at all: `with atomic_dir(out) as tmp: <write into tmp>`.

    When the block ends without an error, `tmp` takes the place of `path` (a previous `path` is moved
    aside first, then removed: `os.replace` cannot overwrite a non-empty folder). On an error `tmp` is
    removed and `path` is untouched.
    """
    path = Path(path)
    tmp = temp_path(path)
    tmp.mkdir()
    try:
        yield tmp
        old = temp_path(path, "old")
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        fsync_dir(path.parent)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


_BUSY = (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK)


class FileLock:
    """An exclusive lock between processes: `with FileLock(folder / ".name.lock", "building name"): ...`.

    A second process waits, saying once on stderr who holds the lock and for what (the holder writes its
    `<pid>@<host>` into the lock file), or raises `TimeoutError` after `timeout` seconds. The holder
    removes the lock file as it lets go, so none is left beside the files it guards; a process that
    locked a file just removed by its holder sees that and locks the new one instead. A killed holder
    leaves its lock file, but not its lock. On a file system without locks (some network file systems;
    Windows) it warns and does not lock. The lock belongs to the process: take it once per process (a
    nested `FileLock` on the same file would share it, and release it on exit).
    """

    def __init__(self, path: str | Path, purpose: str = "", timeout: float | None = None) -> None:
        self.path, self.purpose, self.timeout = Path(path), purpose, timeout
        self._fd: int | None = None

    @classmethod
    def beside(cls, path: str | Path, purpose: str = "", suffix: str = ".lock") -> Self:
        """The lock of the file or folder `path`, kept beside it: `.<name><suffix>` in its folder (created).

        Different suffixes give different locks of one path (one process can hold both).
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        return cls(path.parent / f".{path.name}{suffix}", purpose)

    def holder(self) -> str:
        """Who holds the lock, as written by the holder: "PID 123 on host h" (or "another process")."""
        try:
            found = _WRITER.search("-" + self.path.read_text().strip())
        except OSError:
            found = None
        return f"PID {found['pid']} on host {found['host'] or HOST}" if found else "another process"

    def _try_lock(self, fd: int) -> bool:
        """True when this process now holds the lock (or locks are not available here)."""
        if fcntl is None:
            warnings.warn(
                f"{self.path}: no file locks on this platform; concurrent writers are not kept apart"
            )
            return True
        try:
            # A POSIX record lock (lockf), not flock: worker processes forked while it is held do not
            # inherit it, so orphaned workers of a killed holder cannot keep it. It also works over NFS.
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in _BUSY:
                return False
            warnings.warn(f"{self.path}: this file system does not support locks ({e.strerror}); "
                          "concurrent writers are not kept apart")
        return True

    def _is_current(self, fd: int) -> bool:
        """Whether `fd` is still the file at `path` (not one its last holder removed)."""
        try:
            now = os.stat(self.path)
        except FileNotFoundError:
            return False
        was = os.fstat(fd)
        return (now.st_dev, now.st_ino) == (was.st_dev, was.st_ino)

    def __enter__(self) -> Self:
        start, doing, told = time.monotonic(), f" {self.purpose}" if self.purpose else "", False
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            if self._try_lock(fd) and self._is_current(fd):
                break
            os.close(fd)
            if not told and self.timeout != 0:  # timeout 0 refuses at once: nothing to wait for
                print(f"waiting for {self.holder()}{doing} (lock file {self.path})", file=sys.stderr)
                told = True
            if self.timeout is not None and time.monotonic() - start > self.timeout:
                raise TimeoutError(
                    f"{self.path}: still held by {self.holder()}{doing} after {self.timeout:g} s"
                )
            time.sleep(0.02)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}@{HOST}\n".encode())
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            self.path.unlink(missing_ok=True)  # while still locked: a waiter then sees it is gone
            os.close(fd)  # releases the lock
