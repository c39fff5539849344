"""Running a stage inside a project: input checks, lock, run record, manifest update (DESIGN §3).

The root group wraps every stage command with :func:`wrap_stage`. Stage code receives a
:class:`StageContext` through ``@pass_stage_context`` and never deals with any of this itself.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import os
import platform
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import click

from .config import check_stage_settings, redact_argv, resolved_config
from .dist import DistInfo
from .errors import MissingInputError, MissingOutputError
from .fs import atomic_write_json, clean_temporaries
from .launch import PARENT_ENV
from .log import add_file_handler, get_logger, remove_handler
from .project import Project, fingerprint, utc_now
from .registry import Registry, Stage
from .version import __version__

RECORDED_PACKAGES = ("click", "numpy", "torch", "monai", "transformers", "peft", "duckdb", "polars",
                     "nibabel", "nnunetv2")


@dataclass
class StageContext:
    """What a running stage gets: the project, its run folder, resolved config, a logger."""

    stage: Stage
    project: Project | None
    config: dict[str, dict[str, Any]]
    dist: DistInfo = field(default_factory=DistInfo)
    run_id: str | None = None
    run_dir: Path | None = None
    extra_outputs: dict[str, str] = field(default_factory=dict)
    partial: str | None = None  # set by a run that wrote only part of its outputs (e.g. one shard)
    root_args: tuple[str, ...] = ()  # mv3d's own flags as given (-v, -q, --debug): a launcher repeats them

    @property
    def params(self) -> dict[str, Any]:
        return {k: v["value"] for k, v in self.config.items()}

    def mark_partial(self, reason: str) -> None:
        """This run wrote only part of the stage's outputs: record it as ``partial`` and leave the
        artifacts of the last complete run in the manifest."""
        self.partial = reason

    @property
    def log(self):
        return get_logger(self.stage.name)

    def output_path(self, key: str) -> Path:
        """Absolute path of one of the stage's declared outputs."""
        for a in self.stage.outputs:
            if a.key == key:
                return self.project.root / a.path
        raise KeyError(f"stage {self.stage.name!r} declares no output {key!r}")

    def input_path(self, key: str) -> Path:
        path = self.project.artifact_path(key)
        if path is None:  # checked before the run; only reachable for undeclared inputs
            raise MissingInputError(f"artifact {key!r} does not exist in {self.project.root}")
        return path

    def record_output(self, key: str, path: str | os.PathLike) -> None:
        """Register an output whose location is only known at run time (e.g. ``pretrain/<run>``)."""
        rel = os.path.relpath(Path(path).resolve(), self.project.root)
        self.extra_outputs[key] = rel


pass_stage_context = click.make_pass_decorator(StageContext)


def new_run_dir(project: Project, stage: str) -> tuple[str, Path]:
    now = dt.datetime.now(dt.timezone.utc)
    base = now.strftime("%Y%m%dT%H%M%S.") + f"{now.microsecond // 1000:03d}Z-{stage}"
    for i in range(1, 1000):
        run_id = base if i == 1 else f"{base}-{i}"
        run_dir = project.runs_dir / run_id
        try:
            run_dir.mkdir(parents=True)
            return run_id, run_dir
        except FileExistsError:
            continue
    raise RuntimeError(f"could not create a run folder under {project.runs_dir}")


def check_inputs(stage: Stage, project: Project, registry: Registry) -> dict[str, dict]:
    """Every declared input must exist; returns what was used (producer run and fingerprint)."""
    artifacts = project.manifest()["artifacts"]
    used = {}
    for key in stage.inputs:
        entry = artifacts.get(key)
        if entry is None or not (project.root / entry["path"]).exists():
            producer = registry.producer_of(key)
            how = (f"(made by '{producer.name}'); run: mv3d -P {project.root} {producer.name} ..."
                   if producer else "and no installed stage makes it; install the plugin that does")
            raise MissingInputError(f"stage '{stage.name}' needs '{key}' {how}")
        used[key] = {"run": entry.get("run"), "fingerprint": entry.get("fingerprint")}
    return used


def _versions() -> dict[str, str]:
    out = {"mv3d": __version__, "python": platform.python_version()}
    for pkg in RECORDED_PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def _git_rev() -> str | None:
    src = Path(__file__).resolve().parent.parent
    if not (src / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


class RunRecord:
    """``runs/<id>/run.json`` (rewritten atomically at start and end) and ``log.txt``."""

    def __init__(self, sctx: StageContext, inputs: dict[str, dict], lock_name: str):
        self.sctx = sctx
        self.started = time.time()
        self.data: dict[str, Any] = {
            "run_id": sctx.run_id, "stage": sctx.stage.name, "distribution": sctx.stage.distribution,
            "status": "running", "lock": lock_name, "argv": redact_argv(sys.argv), "cwd": os.getcwd(), "project": str(sctx.project.root),
            "config": sctx.config, "inputs": inputs, "outputs": {}, "versions": _versions(),
            "git_rev": _git_rev(), "host": socket.gethostname(), "pid": os.getpid(),
            "world_size": sctx.dist.world_size, "started": utc_now(), "finished": None,
            "duration_s": None, "error": None,
        }
        self.path = sctx.run_dir / "run.json"
        self.write()
        self.handler = add_file_handler(sctx.run_dir / "log.txt")

    def write(self) -> None:
        atomic_write_json(self.path, self.data)

    def finish(self, status: str, error: str | None = None, outputs: dict | None = None) -> None:
        self.data.update(status=status, error=error, finished=utc_now(), outputs=outputs or {},
                         duration_s=round(time.time() - self.started, 3))
        self.write()
        remove_handler(self.handler)


def _collect_outputs(sctx: StageContext) -> dict[str, dict]:
    project, outputs = sctx.project, {}
    declared = {a.key: a.path for a in sctx.stage.outputs}
    optional = {a.key for a in sctx.stage.outputs if a.optional}
    for key, rel in {**declared, **sctx.extra_outputs}.items():
        fp = fingerprint(project.root / rel)
        if fp is None and key in optional:
            continue
        if fp is None:
            raise MissingOutputError(
                f"stage '{sctx.stage.name}' finished without writing its output '{key}' ({rel}); "
                "this is a bug in the stage, please report it with the run's log.txt"
            )
        outputs[key] = {"path": rel, "fingerprint": fp}
    return outputs


def _record_in_manifest(sctx: StageContext, status: str, inputs: dict, outputs: dict, error: str | None):
    def change(m: dict) -> None:
        now = utc_now()
        for key, out in outputs.items():
            m["artifacts"][key] = {**out, "stage": sctx.stage.name, "run": sctx.run_id, "created": now}
        prev = m["stages"].get(sctx.stage.name, {})
        rec = {"status": status, "last_run": sctx.run_id, "finished": now, "error": error}
        if status == "done":
            rec.update(inputs=inputs, outputs=sorted(outputs))
        else:  # failed or partial: keep what the last complete run made
            rec.update(inputs=prev.get("inputs", {}), outputs=prev.get("outputs", []))
        m["stages"][sctx.stage.name] = rec

    sctx.project.update_manifest(change)


def mark_killed_runs(project: Project, stage: str, lock_name: str) -> None:
    """Runs of ``stage`` under the lock we now hold that are still marked ``running`` died without
    a word (SIGKILL, power loss): say so in their records."""
    for run_json in project.runs_dir.glob(f"*-{stage}*/run.json"):
        try:
            rec = json.loads(run_json.read_text())
        except (OSError, ValueError):
            continue
        if rec.get("stage") == stage and rec.get("lock", stage) == lock_name and rec.get("status") == "running":
            rec.update(status="killed", error="the process ended without finishing (killed or crashed)")
            atomic_write_json(run_json, rec)


def run_stage(sctx: StageContext, registry: Registry, body: Callable[[], Any]) -> Any:
    """Run ``body`` as one recorded stage run inside ``sctx.project`` (rank 0 records)."""
    stage, project = sctx.stage, sctx.project
    inputs = check_inputs(stage, project, registry)
    if not sctx.dist.is_main or os.environ.get(PARENT_ENV):  # a launcher's child: the launcher records
        return body()
    lock_name = stage.lock(sctx.params) if stage.lock else stage.name
    with project.stage_lock(lock_name).acquire(holder=f"pid {os.getpid()} on {socket.gethostname()}"):
        for a in stage.outputs:  # temporaries of a run that was killed
            clean_temporaries((project.root / a.path).parent)
        mark_killed_runs(project, stage.name, lock_name)
        sctx.run_id, sctx.run_dir = new_run_dir(project, stage.name)
        record = RunRecord(sctx, inputs, lock_name)
        sctx.log.info("run %s started (log: %s)", sctx.run_id, sctx.run_dir / "log.txt")
        try:
            result = body()
            outputs = {} if sctx.partial else _collect_outputs(sctx)
        except BaseException as e:
            msg = f"{type(e).__name__}: {e}" if not isinstance(e, KeyboardInterrupt) else "interrupted"
            sctx.log.debug("run %s failed", sctx.run_id, exc_info=True)
            record.finish("failed", error=msg)
            _record_in_manifest(sctx, "failed", inputs, {}, msg)
            raise
        status = "partial" if sctx.partial else "done"
        record.finish(status, error=sctx.partial, outputs=outputs)
        _record_in_manifest(sctx, status, inputs, outputs, sctx.partial)
        sctx.log.info("run %s %s in %.1f s", sctx.run_id, status, record.data["duration_s"])
        return result


def _root_args(root: Any) -> tuple[str, ...]:
    """``mv3d``'s own flags of this invocation, as a child process would need them."""
    verbosity = getattr(root, "verbosity", 0)
    flags = ("--debug",) if getattr(root, "debug", False) else ()
    return flags + ("-v",) * max(verbosity, 0) + ("-q",) * max(-verbosity, 0)


def _refuse_group_options(ctx: click.Context) -> None:
    """The group's own options configure its run; with a subcommand that run does not happen."""
    given = [p.opts[-1] for p in ctx.command.params
             if p.name and ctx.get_parameter_source(p.name) == click.core.ParameterSource.COMMANDLINE]
    if given:
        raise click.UsageError(f"{', '.join(given)}: options of '{ctx.info_name}' itself (its run) do nothing with a "
                               f"subcommand; put the subcommand's options after it, e.g. mv3d {ctx.info_name} "
                               f"{ctx.invoked_subcommand} ... {given[0]} ...", ctx)


def wrap_stage(stage: Stage, registry: Registry) -> click.Command:
    """Make ``stage.command`` run through :func:`run_stage` (idempotent)."""
    cmd = stage.command
    if getattr(cmd, "_mv3d_wrapped", False) or cmd.callback is None:
        return cmd
    inner = cmd.callback

    @functools.wraps(inner)
    def callback(*args, **kwargs):
        ctx = click.get_current_context()
        if ctx.invoked_subcommand is not None:  # a group stage's query (index-texts search): read-only, no run
            _refuse_group_options(ctx)
            return None
        root = ctx.find_root().obj
        project = Project(root.project) if stage.project else None
        sctx = StageContext(stage=stage, project=project, config=resolved_config(ctx), dist=DistInfo.from_env(),
                            root_args=_root_args(root))
        ctx.obj = sctx
        if project is None:
            return inner(*args, **kwargs)
        if stage.creates_project and not project.exists():  # the entry stage, e.g. `mv3d prep ctrate/`
            project.init_in_place(ctx.params.get(p.name) for p in cmd.params if isinstance(p.type, click.Path))
            click.echo(f"created an mv3d project in {project.root}", err=True)
        project.require()
        table = (project.settings().get("stages", {}) or {}).get(stage.name, {})
        check_stage_settings(stage.name, cmd, {k.replace("-", "_"): v for k, v in table.items()},
                             project.settings_path)
        return run_stage(sctx, registry, lambda: inner(*args, **kwargs))

    cmd.callback = callback
    cmd._mv3d_wrapped = True  # type: ignore[attr-defined]
    if not cmd.short_help:
        cmd.short_help = stage.summary
    return cmd
