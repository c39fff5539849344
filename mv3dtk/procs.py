"""Child processes that never outlive the process that started them.

A worker process (a DataLoader worker, a prep worker) whose parent is killed with SIGKILL would
otherwise live on as an orphan of init: it keeps its memory, and whatever it inherited (a stage
lock, see :class:`mv3dtk.fs.FileLock`). :func:`die_with_parent`, called first thing in the child,
asks the kernel to SIGKILL it when its parent dies (Linux ``PR_SET_PDEATHSIG``; elsewhere nothing).

The kernel sends the signal when the *thread* that forked the child exits, so children must be
started from the parent's main thread (DataLoader iterators and ``ProcessPoolExecutor.submit`` in
mv3d are).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from typing import Callable

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _set_parent_death_signal(sig: int) -> bool:
    """``prctl(PR_SET_PDEATHSIG, sig)``; whether it took effect (False off Linux or if it failed)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def die_with_parent(parent_pid: int) -> None:
    """Make this process get SIGKILL when ``parent_pid`` (its parent) dies; exit now if it already has.

    The check after the request closes the race where the parent died between the fork and the
    ``prctl`` call: the child was then already re-parented, and no signal would ever come.
    """
    _set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != parent_pid:
        os._exit(1)


class WorkerInit:
    """A picklable ``worker_init_fn`` for DataLoaders: :func:`die_with_parent`, then ``then(worker_id)``
    (a dataset's own worker set-up, e.g. seeding) if given. Create it in the process that will start the
    workers: it records that process's pid."""

    def __init__(self, then: Callable[[int], None] | None = None):
        self.parent_pid = os.getpid()
        self.then = then

    def __call__(self, worker_id: int) -> None:
        die_with_parent(self.parent_pid)
        if self.then is not None:
            self.then(worker_id)
