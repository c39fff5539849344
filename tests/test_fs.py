"""Atomic writes: an interrupted write (exception or SIGKILL) leaves the old file, never a torn one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import types

import pytest

from mv3dtk import fs
from mv3dtk.fs import FileLock, atomic_path, atomic_write_json, atomic_write_text, clean_temporaries, read_json
from mv3dtk.errors import StageLockedError


def test_exception_during_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "a.json"
    atomic_write_json(target, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text('{"v": 2, "torn')
            raise RuntimeError("boom")
    assert read_json(target) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_temporary_keeps_the_extension(tmp_path):
    with atomic_path(tmp_path / "x.nii.gz") as tmp:
        assert tmp.name.endswith("x.nii.gz") and tmp.parent == tmp_path
        tmp.write_bytes(b"1")
    assert (tmp_path / "x.nii.gz").read_bytes() == b"1"


def test_directory_is_replaced_whole(tmp_path):
    target = tmp_path / "model"
    for version in ("old", "new"):
        with atomic_path(target) as tmp:
            tmp.mkdir()
            (tmp / "weights").write_text(version)
    assert (target / "weights").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_sigkill_mid_write_leaves_old_file_and_cleanable_temporary(tmp_path):
    target = tmp_path / "big.bin"
    atomic_write_text(target, "old")
    code = (
        "import sys, time\n"
        "from mv3dtk.fs import atomic_path\n"
        f"with atomic_path({str(target)!r}) as tmp:\n"
        "    fh = open(tmp, 'wb')\n"
        "    fh.write(b'x' * 1000); fh.flush()\n"
        "    print('writing', flush=True)\n"
        "    time.sleep(60)\n"
    )
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "writing"
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert target.read_text() == "old"
    leftovers = [x for x in tmp_path.iterdir() if x.name != "big.bin"]
    assert len(leftovers) == 1  # the dead writer's temporary ...
    assert clean_temporaries(tmp_path) == 1  # ... is recognised as orphaned and removed
    assert [x.name for x in tmp_path.iterdir()] == ["big.bin"]


def test_clean_temporaries_spares_live_writers(tmp_path):
    with atomic_path(tmp_path / "f") as tmp:
        tmp.write_text("in progress")
        assert clean_temporaries(tmp_path) == 0 and tmp.exists()


def test_lock_refuses_a_second_holder_and_names_the_first(tmp_path, monkeypatch):
    code = (
        "import sys\n"
        "from mv3dtk.fs import FileLock\n"
        f"lock = FileLock({str(tmp_path / 'l.lock')!r}, 'thing').acquire(holder='pid 4242 on box')\n"
        "print('held', flush=True)\n"
        "sys.stdin.readline()\n"
        "lock.release()\n"
        "print('released', flush=True)\n"
        "sys.stdin.readline()\n"
    )
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "held"
        with pytest.raises(StageLockedError, match="thing is in use by pid 4242 on box"):
            FileLock(tmp_path / "l.lock", "thing").acquire()
        # a waiter with a timeout keeps retrying: the holder lets go while it waits, and it gets the lock
        retrying = threading.Event()  # set once the waiter has found the lock taken and sleeps to retry
        monkeypatch.setattr(fs, "time", types.SimpleNamespace(
            monotonic=time.monotonic, sleep=lambda s: (retrying.set(), time.sleep(s))))
        got: list = []
        waiter = threading.Thread(target=lambda: got.append(FileLock(tmp_path / "l.lock", "thing").acquire(timeout=120)))
        waiter.start()
        assert retrying.wait(120)
        p.stdin.write("go\n")
        p.stdin.flush()
        assert p.stdout.readline().strip() == "released"
        waiter.join(120)
        assert len(got) == 1 and got[0].path.read_text() == f"pid {os.getpid()}"
        got[0].release()
    finally:
        p.kill()
        p.wait()
    with FileLock(tmp_path / "l.lock", "thing"):  # free again once the holder is gone
        pass


# Each child reports on a pipe once it runs Python again, i.e. after the fork hooks ran: the parent
# waits for that before it prints the pid, so a SIGKILL never lands while the child is still between
# fork() and its hook (the race that once failed CI: the child had not been scheduled yet).
FORKS = {
    "os.fork": ("r, w = os.pipe()\npid = os.fork()\nif pid == 0:\n    os.write(w, b'x')\n"
                "    time.sleep(60)\n    os._exit(0)\nassert os.read(r, 1) == b'x'\n"),
    "multiprocessing": ("ctx = multiprocessing.get_context('fork')\nready = ctx.Event()\n"
                        "child = ctx.Process(target=lambda: (ready.set(), time.sleep(60)))\nchild.start()\n"
                        "assert ready.wait(30)\npid = child.pid\n"),
}


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.parametrize("fork", sorted(FORKS))
@pytest.mark.parametrize("end", ["release", "sigkill"])
def test_a_forked_child_never_keeps_the_lock(tmp_path, fork, end):
    """A child forked while the lock is held (a DataLoader worker) must not keep it once its parent
    releases it or is killed: the child outlives both here, as an orphaned worker would."""
    path = tmp_path / "l.lock"
    code = (
        "import multiprocessing, os, sys, time\n"
        "from mv3dtk.fs import FileLock\n"
        f"lock = FileLock({str(path)!r}, 'thing').acquire()\n"
        "assert not os.get_inheritable(lock._fh.fileno())  # close-on-exec\n"
        + FORKS[fork] +
        "print(pid, flush=True)\n"
        "sys.stdin.readline()\n"
        "lock.release()\n"
        "print('released', flush=True)\n"
        "time.sleep(60)\n"
    )
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    child = int(p.stdout.readline())
    try:
        assert FileLock(path, "thing").is_held()  # the parent holds it
        if end == "release":
            p.stdin.write("go\n")
            p.stdin.flush()
            assert p.stdout.readline().strip() == "released"
        else:
            p.send_signal(signal.SIGKILL)
            p.wait()
        os.kill(child, 0)  # the child lives on ...
        assert not FileLock(path, "thing").is_held()  # ... without the lock
        with FileLock(path, "thing"):
            pass
    finally:
        p.kill()
        p.wait()
        os.kill(child, signal.SIGKILL)
