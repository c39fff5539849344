"""Atomic file writes and inter-process locks.

Every file mv3d writes goes through :func:`atomic_path`: the content is written to a temporary
name in the same folder and renamed over the target only when complete, so an interrupted
process (exception, Ctrl-C, SIGKILL) leaves either the old file or the new one, never a torn one.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import time
import uuid
import weakref
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .errors import StageLockedError

TMP_PREFIX = ".tmp-"


def _tmp_sibling(path: Path) -> Path:
    # Keep the full name as the suffix so that writers that look at the extension
    # (".nii.gz", ".npy", ".parquet") still do the right thing.
    return path.with_name(f"{TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}-{path.name}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def atomic_path(path: str | os.PathLike, *, fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` if the block succeeds.

    The block may write a file or a whole directory at the yielded path. On any exception the
    temporary is removed and ``path`` is left untouched. A directory target that already exists is
    replaced (old copy removed after the rename of the new one).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path)
    try:
        yield tmp
        if fsync and tmp.is_file():
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        if tmp.is_dir() and path.is_dir():
            old = _tmp_sibling(path)
            os.replace(path, old)
            os.replace(tmp, path)
            _remove(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, fsync: bool = True) -> Path:
    with atomic_path(path, fsync=fsync) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, *, fsync: bool = True) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"), fsync=fsync)


def atomic_write_json(path: str | os.PathLike, obj: Any, *, fsync: bool = True) -> Path:
    text = json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n"
    return atomic_write_text(path, text, fsync=fsync)


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def clean_temporaries(folder: str | os.PathLike) -> int:
    """Remove temporaries left in ``folder`` by a killed process; returns how many were removed."""
    n = 0
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    for p in folder.glob(f"{TMP_PREFIX}*"):
        pid = p.name[len(TMP_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and _pid_alive(int(pid)):
            continue
        _remove(p)
        n += 1
    return n


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as e:
        return e.errno == errno.EPERM
    return True


_HELD: "weakref.WeakSet[FileLock]" = weakref.WeakSet()  # the locks this process holds


def _drop_held_locks_in_child() -> None:
    """After a fork, in the child: close the inherited handles of the parent's locks. An ``flock``
    belongs to the open file: a child that kept the handle would keep the lock after the parent
    died (a DataLoader worker orphaned by a SIGKILL refusing every ``--resume``). Closing only
    drops the child's reference; the parent's lock is untouched (no ``LOCK_UN`` here)."""
    for lock in list(_HELD):
        fh, lock._fh = lock._fh, None
        if fh is not None:
            try:
                fh.close()
            except OSError:
                pass
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_drop_held_locks_in_child)


class FileLock:
    """An ``flock`` on a lock file. Released by the kernel when the process dies, so a crashed
    run never leaves a stale lock behind. ``holder`` (a short text) is written into the file so
    that the process that is refused can say who holds it.

    A child process never holds it: the file is opened close-on-exec (Python's default), and a
    forked child closes its copy right after the fork (:func:`_drop_held_locks_in_child`)."""

    def __init__(self, path: str | os.PathLike, what: str):
        self.path = Path(path)
        self.what = what
        self._fh = None

    def acquire(self, *, holder: str = "", timeout: float = 0.0) -> "FileLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+", encoding="utf-8")
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    fh.seek(0)
                    who = fh.read().strip() or "another process"
                    fh.close()
                    raise StageLockedError(
                        f"{self.what} is in use by {who}; wait for that process to finish "
                        f"(the lock {self.path} is released automatically when it exits)"
                    ) from None
                time.sleep(0.02)
        fh.seek(0)
        fh.truncate()
        fh.write(holder or f"pid {os.getpid()}")
        fh.flush()
        self._fh = fh
        _HELD.add(self)
        return self

    def is_held(self) -> bool:
        """Whether some process holds the lock right now (probes without keeping it)."""
        if not self.path.exists():
            return False
        with open(self.path, "a+", encoding="utf-8") as fh:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
        return False

    def release(self) -> None:
        _HELD.discard(self)
        if self._fh is not None:
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None

    def __enter__(self) -> "FileLock":
        return self.acquire() if self._fh is None else self

    def __exit__(self, *exc) -> None:
        self.release()
