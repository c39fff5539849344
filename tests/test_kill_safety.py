"""SIGKILL of a stage's main process: no worker outlives it, and `--resume` (or a rerun) starts.

Before workers died with their parent, a DataLoader worker orphaned by a SIGKILL could live on and
keep the stage lock it inherited, so every `--resume` was refused as "in use by pid <dead pid>".
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import make_pretrain_project, run_mv3d
from mv3dtk import Project
from mv3dtk.data.synth import make_synthetic_dataset
from mv3dtk.fs import FileLock

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="reads /proc; workers die with their parent through PR_SET_PDEATHSIG (Linux)")

GRACE_S = 10.0  # a worker may take this long to go after its parent was killed
SMALL = ["--backbone", "vit", "--model-config", "vit-tiny", "--batch-size", "2", "--workers", "1", "--lr", "1e-3",
         "--warmup-steps", "2", "--rsmb-size", "64", "--checkpoint-every", "1"]


# -- processes, through /proc ------------------------------------------------------------------------

def _start_time(pid: int) -> str | None:
    """The process's start time (field 22 of /proc/PID/stat): with the pid, it names one process even if
    the pid is reused. ``None`` if it is gone or a zombie (dead, waiting to be reaped)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def _descendants(pid: int) -> set[tuple[int, str]]:
    """(pid, start time) of every living descendant of ``pid``."""
    found: set[tuple[int, str]] = set()
    todo = [pid]
    while todo:
        parent = todo.pop()
        for f in Path(f"/proc/{parent}/task").glob("*/children"):
            try:
                kids = [int(x) for x in f.read_text().split()]
            except OSError:
                continue
            for kid in kids:
                started = _start_time(kid)
                if started is not None and (kid, started) not in found:
                    found.add((kid, started))
                    todo.append(kid)
    return found


def _survivors(procs: set[tuple[int, str]], grace: float = GRACE_S) -> set[tuple[int, str]]:
    """The processes of ``procs`` still alive after up to ``grace`` seconds."""
    deadline = time.monotonic() + grace
    alive = procs
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = {(pid, t) for pid, t in alive if _start_time(pid) == t}
    return alive


def _start(cmd: list[str], log: Path) -> subprocess.Popen:
    with open(log, "w") as fh:  # a file, not a pipe: a full pipe would stall the run
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=fh)


def _kill_when(proc: subprocess.Popen, log: Path, ready, what: str, timeout: float = 240) -> set[tuple[int, str]]:
    """Poll until ``ready()``, collecting ``proc``'s descendants all along; then SIGKILL ``proc`` and
    return every descendant seen (the ones to check on)."""
    seen: set[tuple[int, str]] = set()
    deadline = time.monotonic() + timeout
    for i in itertools.count():
        if ready():
            break
        if proc.poll() is not None:
            pytest.fail(f"the process ended (exit {proc.returncode}) before {what}:\n{log.read_text()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no {what} within {timeout} s")
        if i % 10 == 0:  # a walk of /proc costs CPU that the run needs
            seen |= _descendants(proc.pid)
        time.sleep(0.02)
    seen |= _descendants(proc.pid)
    proc.kill()
    proc.wait()
    return seen


def _clean_up(procs: set[tuple[int, str]]) -> None:
    for pid, t in procs:
        if _start_time(pid) == t:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


# -- the mechanism -----------------------------------------------------------------------------------

def test_a_worker_dies_with_its_parent_and_at_once_if_it_is_already_gone():
    code = (
        "import multiprocessing, os, time\n"
        "from mv3dtk.procs import die_with_parent\n"
        "def work(parent):\n"
        "    die_with_parent(parent)\n"
        "    time.sleep(60)\n"
        "ctx = multiprocessing.get_context('fork')\n"
        "late = ctx.Process(target=work, args=(os.getpid() + 10**6,))  # as if the parent died before prctl\n"
        "late.start(); late.join(30)\n"
        "child = ctx.Process(target=work, args=(os.getpid(),))\n"
        "child.start()\n"
        "print(late.exitcode, child.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    late_exit, child = (int(x) for x in proc.stdout.readline().split())
    assert late_exit == 1
    started = _start_time(child)
    assert started is not None  # alive while its parent is
    proc.kill()
    proc.wait()
    survivors = _survivors({(child, started)})
    _clean_up(survivors)
    assert not survivors


# -- pretrain ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pretrain_project(tmp_path_factory):
    return make_pretrain_project(tmp_path_factory.mktemp("kill"))


def _last_step(metrics: Path) -> int:
    lines = metrics.read_text().splitlines() if metrics.exists() else []
    try:
        return json.loads(lines[-1])["step"] if lines else 0
    except (ValueError, KeyError):  # a line being written
        return 0


def _resumable(run: Path) -> bool:
    """A finished checkpoint exists (a run killed before its first one cannot be resumed)."""
    return any((c / "trainer.json").is_file() for c in (run / "checkpoints").glob("step-*"))


def test_sigkill_mid_epoch_leaves_no_worker_and_resume_starts(pretrain_project, tmp_path):
    p, bert = pretrain_project
    max_steps = 9  # 11 train volumes, batch 2: 5 batches an epoch
    cmd = [sys.executable, "-m", "mv3dtk", "-P", str(p.root), "pretrain", *SMALL, "--text-encoder", str(bert),
           "--max-steps", str(max_steps), "--run", "killed"]
    metrics = p.root / "pretrain" / "killed" / "metrics.jsonl"
    with_workers = 0
    for n, k in enumerate((1, 3, 7)):  # start of epoch 0, mid epoch 0, mid epoch 1
        log = tmp_path / f"kill-{k}.txt"
        proc = _start(cmd + (["--resume"] if n else []), log)
        children = _kill_when(proc, log, lambda: _last_step(metrics) >= k and _resumable(metrics.parent),
                              f"step {k} and a checkpoint in {metrics.parent}")
        held = [f.name for f in p.locks_dir.glob("pretrain*.lock") if FileLock(f, f.name).is_held()]
        assert not held, f"killed at step {k}: the lock {held} is still held (by a worker that inherited it?)"
        survivors = _survivors(children)
        _clean_up(survivors)
        assert not survivors, f"killed at step {k}: children {sorted(survivors)} outlived pretrain by {GRACE_S} s"
        with_workers += bool(children)
        assert _last_step(metrics) < max_steps  # really interrupted
    assert with_workers  # the kills did catch DataLoader workers alive
    proc = run_mv3d("-P", str(p.root), "pretrain", *SMALL, "--text-encoder", str(bert), "--max-steps",
                    str(max_steps), "--run", "killed", "--resume", timeout=300)
    assert "in use by" not in proc.stderr
    assert _last_step(metrics) == max_steps and (p.root / "pretrain" / "killed" / "model").is_dir()


# -- prep --------------------------------------------------------------------------------------------

def test_sigkill_of_prep_leaves_no_worker_and_a_rerun_resumes(tmp_path):
    data = make_synthetic_dataset(tmp_path / "data", n_train=6, n_valid=3, seed=0).root  # (64, 128, 128) volumes
    project = Project.init(tmp_path / "project")
    records = project.root / "prep" / "records"
    cmd = [sys.executable, "-m", "mv3dtk", "-P", str(project.root), "prep", str(data), "--workers", "2",
           "--spacing", "1.5", "0.5", "0.5", "--size", "64", "192", "192"]

    def done() -> int:
        return len(list(records.glob("[!.]*.json")))  # not the temporaries of atomic writes

    for more in (1, 3):  # right after the first volume, then a few volumes into the rerun
        target = done() + more
        log = tmp_path / f"kill-{target}.txt"
        proc = _start(cmd, log)
        children = _kill_when(proc, log, lambda: done() >= target, f"{target} prepped volumes")
        survivors = _survivors(children)
        _clean_up(survivors)
        assert not survivors, f"killed after {done()} volumes: workers {sorted(survivors)} outlived prep"
        assert len(children) >= 2  # the two workers (and multiprocessing's resource tracker) were seen
    killed_at = done()
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    ok, total, processed, skipped = map(int, re.search(
        r"(\d+) of (\d+) volumes ok \((\d+) processed, (\d+) already done\)", rerun.stderr).groups())
    assert ok == total and skipped == killed_at and processed == total - killed_at > 0  # resumed, not redone
