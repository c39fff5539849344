"""Stages and their discovery through the ``mv3d.stages`` entry-point group.

The core stages are registered in mv3d's own ``pyproject.toml`` exactly like third-party ones, so
the plugin contract is exercised by every core test. A plugin that fails to import, does not
export a :class:`Stage`, or reuses a core stage name is recorded in :func:`plugin_report` and
skipped; the CLI keeps working. ``MV3D_LOAD_PLUGINS`` (comma list of distribution names; empty =
none) limits which third-party distributions load. This module imports only the standard
library and Click: loading every stage must stay cheap because ``mv3d --help`` does it.
"""

from __future__ import annotations

import importlib
import os
import re
from dataclasses import dataclass, field, replace
from importlib import metadata
from typing import Callable

import click

STAGES_GROUP = "mv3d.stages"
CORE_DISTRIBUTION = "mv3d"
LOAD_PLUGINS_ENV = "MV3D_LOAD_PLUGINS"


@dataclass(frozen=True)
class Artifact:
    """A named output of a stage: ``key`` (e.g. ``"prep.volumes"``) at ``path`` relative to the
    project (default: the key with dots as folders, ``prep/volumes``)."""

    key: str
    path: str = ""
    description: str = ""
    optional: bool = False  # written only by some runs (e.g. depending on an option)

    def __post_init__(self):
        if not re.fullmatch(r"[a-z0-9_-]+(\.[a-z0-9_.-]+)+", self.key):
            raise ValueError(f"artifact key {self.key!r} must look like '<stage>.<name>'")
        if not self.path:
            object.__setattr__(self, "path", self.key.replace(".", "/", 1))
        if os.path.isabs(self.path) or ".." in self.path.split("/"):
            raise ValueError(f"artifact {self.key!r}: path {self.path!r} must stay inside the project")


def _as_artifact(x: "Artifact | str") -> Artifact:
    return x if isinstance(x, Artifact) else Artifact(x)


@dataclass(frozen=True)
class Stage:
    """What an entry point in ``mv3d.stages`` must name.

    ``inputs`` are artifact keys that must exist in the project before the stage runs (the root
    group checks them and names the stage that makes a missing one). ``outputs`` are the artifacts
    the stage promises to write; they are fingerprinted into ``manifest.json`` after a successful
    run. A stage with ``project=False`` (e.g. ``synth``) works outside any project and leaves no
    run record. ``lock`` lets runs that write disjoint parts (``prep --shard I/N``) run at once:
    it maps the option values to the name of the lock a run takes. ``creates_project`` marks the
    entry stage (``prep``): run in a directory that is not a project yet but is empty or holds
    only the paths given to it, it creates the project there instead of refusing.
    """

    name: str
    command: click.Command
    summary: str = ""
    inputs: tuple[str, ...] = ()
    outputs: tuple[Artifact | str, ...] = ()
    project: bool = True
    lock: Callable[[dict], str] | None = None  # option values -> lock name (default: the stage name)
    creates_project: bool = False  # the entry stage: creates the project in a bare directory
    distribution: str = field(default=CORE_DISTRIBUTION, compare=False)

    def __post_init__(self):
        if not re.fullmatch(r"[a-z][a-z0-9-]*", self.name):
            raise ValueError(f"stage name {self.name!r} must be lowercase letters, digits and '-'")
        if not isinstance(self.command, click.Command):
            raise TypeError(f"stage {self.name!r}: command must be a click.Command, got {type(self.command)!r}")
        object.__setattr__(self, "outputs", tuple(_as_artifact(o) for o in self.outputs))
        object.__setattr__(self, "inputs", tuple(self.inputs))
        if not self.summary:
            object.__setattr__(self, "summary", self.command.get_short_help_str(limit=80))

    @property
    def output_keys(self) -> tuple[str, ...]:
        return tuple(a.key for a in self.outputs)


@dataclass
class PluginInfo:
    distribution: str
    version: str
    stages: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"distribution": self.distribution, "version": self.version,
                "stages": sorted(self.stages), "errors": self.errors}


@dataclass
class Registry:
    stages: dict[str, Stage]
    plugins: dict[str, PluginInfo]  # distribution -> info, core included

    def producer_of(self, key: str) -> Stage | None:
        for stage in self.stages.values():
            if key in stage.output_keys:
                return stage
        return None


def normalize_dist(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _allowed_plugins() -> set[str] | None:
    raw = os.environ.get(LOAD_PLUGINS_ENV)
    if raw is None:
        return None
    return {normalize_dist(x.strip()) for x in raw.split(",") if x.strip()}


def _dist_of(ep: metadata.EntryPoint) -> tuple[str, str]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return "unknown", "unknown"
    return dist.metadata["Name"] or "unknown", dist.version or "unknown"


def _load_one(ep: metadata.EntryPoint, dist: str) -> Stage:
    try:
        obj = ep.load()
    except (Exception, SystemExit) as e:  # a broken plugin must never break the CLI (sys.exit() at import too)
        raise RuntimeError(f"import failed: {type(e).__name__}: {e}") from e
    if not isinstance(obj, Stage):
        raise RuntimeError(f"entry point {ep.value!r} is a {type(obj).__name__}, not an mv3dtk.Stage")
    if obj.name != ep.name:
        raise RuntimeError(f"entry point {ep.name!r} names a Stage called {obj.name!r}; use the same name")
    return replace(obj, distribution=dist)


def _entry_points() -> list[metadata.EntryPoint]:
    eps = metadata.entry_points(group=STAGES_GROUP)
    # Core first so that clashes are always resolved in favour of the core stage; dedupe
    # (an editable install can list a distribution twice on sys.path).
    seen, out = set(), []
    for ep in sorted(eps, key=lambda e: (normalize_dist(_dist_of(e)[0]) != CORE_DISTRIBUTION, e.name)):
        ident = (_dist_of(ep)[0], ep.name, ep.value)
        if ident not in seen:
            seen.add(ident)
            out.append(ep)
    return out


def discover() -> Registry:
    """Load every stage entry point (uncached; see :func:`get_registry`)."""
    allowed = _allowed_plugins()
    stages: dict[str, Stage] = {}
    plugins: dict[str, PluginInfo] = {}
    for ep in _entry_points():
        dist, version = _dist_of(ep)
        core = normalize_dist(dist) == CORE_DISTRIBUTION
        if not core and allowed is not None and normalize_dist(dist) not in allowed:
            continue
        info = plugins.setdefault(dist, PluginInfo(dist, version))
        try:
            stage = _load_one(ep, dist)
        except RuntimeError as e:
            info.errors.append(f"stage {ep.name!r} ({ep.value}): {e}")
            continue
        if stage.name in stages:
            owner = stages[stage.name].distribution
            info.errors.append(f"stage {stage.name!r} clashes with the stage of the same name from "
                               f"{owner!r}; skipped (rename it in the plugin's entry points)")
            continue
        stages[stage.name] = stage
        info.stages.append(stage.name)
    return Registry(stages=stages, plugins=plugins)


_CACHE: Registry | None = None


def get_registry(refresh: bool = False) -> Registry:
    global _CACHE
    if _CACHE is None or refresh:
        _CACHE = discover()
    return _CACHE


def clear_cache() -> None:
    """Forget discovered stages (tests that change ``sys.path`` or ``MV3D_LOAD_PLUGINS``)."""
    global _CACHE
    _CACHE = None
    importlib.invalidate_caches()
