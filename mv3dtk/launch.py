"""The one launcher of every training stage: run names, and the torchrun re-exec for ``--nproc N``.

A training stage calls :func:`run_name` for its folder, then either its library entry point (one
process, or a process that torchrun started) or :func:`torchrun`, which starts
``torchrun --standalone --nproc_per_node N -m mv3dtk -P PROJECT <stage> <options>``: the same stage with
the same options (:func:`mv3dtk.options.to_argv`), in N processes. The launching process keeps the run
record; its children see ``MV3D_PARENT_RUN`` and leave the record to it (:mod:`mv3dtk.runs`).
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .dist import under_torchrun
from .errors import ConfigError, Mv3dError
from .options import to_argv
from .procs import die_with_parent

PARENT_ENV = "MV3D_PARENT_RUN"  # set for the processes a launcher started: they leave the run record to it


def run_name(given: str | None, prefix: str) -> str:
    """``--run NAME`` checked, or ``<prefix>-<UTC time>``. Under torchrun every process must be given the
    same name (the launcher passes it)."""
    if given:
        if "/" in given or given.startswith("."):
            raise ConfigError(f"--run {given!r}: use a plain folder name (no '/', not starting with '.')")
        return given
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise ConfigError("under torchrun every process must agree on the run folder: pass --run NAME")
    return f"{prefix}-{dt.datetime.now(dt.timezone.utc).strftime('%Y%m%dT%H%M%SZ')}"


def needs_launch(nproc: int) -> bool:
    """Whether this process must start ``nproc`` processes itself (it is not one of them already)."""
    return nproc > 1 and not under_torchrun()


def run_name_env(stage: str) -> str:
    """The variable that carries the run name to the children: Click reads it as the stage's ``--run``
    (``auto_envvar_prefix``). On the command line torchrun's own parser would take ``--run`` for its
    ``--run-path``."""
    return f"MV3D_{stage.upper().replace('-', '_')}_RUN_NAME"


def torchrun(stage: str, options: Any, *, project: Path, nproc: int, run: str, parent_run: str | None, log,
             root_args: Sequence[str] = ()) -> None:
    """Run ``mv3d -P project <stage> <options>`` in ``nproc`` processes under ``torchrun --standalone``
    and wait for them. ``options`` is the stage's options dataclass; ``root_args`` are mv3d's own flags
    (``-v``, ``--debug``) to repeat."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m",
           "mv3dtk", *root_args, "-P", str(project), stage, *to_argv(options)]
    log.info("launching %d processes (run %s): %s", nproc, run, " ".join(cmd))
    env = {**os.environ, PARENT_ENV: parent_run or "", run_name_env(stage): run,
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    launcher = os.getpid()  # torchrun and its workers die with this process (a SIGKILL leaves no orphans)
    code = subprocess.call(cmd, env=env, preexec_fn=lambda: die_with_parent(launcher))
    if code != 0:
        raise Mv3dError(f"torchrun exited with code {code}; see the messages above (and {stage}/{run}/)")
