"""The project directory: settings, manifest, run records and per-stage locks (DESIGN §4).

```
DIR/
  mv3d.toml        user settings ([stages.<name>] option defaults, [llm], [paths])
  manifest.json    machine-written, atomic: artifacts (key -> path, producer run, fingerprint)
                   and the status of every stage that ran
  runs/<UTC time>-<stage>/run.json, log.txt
  .locks/          one flock file per stage, plus manifest.lock
```
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from .config import load_settings
from .errors import ConfigError, NotAProjectError
from .fs import FileLock, atomic_write_json, atomic_write_text, read_json

MANIFEST_SCHEMA = 1
SETTINGS_FILE = "mv3d.toml"
MANIFEST_FILE = "manifest.json"

SETTINGS_TEMPLATE = """\
# mv3d project settings.
# Option values resolve as: command line > environment (MV3D_<STAGE>_<OPTION>) > this file > default.
# Each [stages.<name>] table sets option defaults for that stage, keyed by the option's long name,
# e.g.
#   [stages.prep]
#   spacing = [3.0, 1.0, 1.0]
#   workers = 8
# Secrets (API keys) never go here: they are read from the environment only.

[project]
name = "{name}"

[paths]
# raw = "/data/CT-RATE"

[llm]
# backend = "ollama"

[stages]
"""


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def fingerprint(path: Path) -> dict[str, int] | None:
    """Cheap content fingerprint: size and mtime (for a folder: file count, total size and the
    newest mtime of the files inside). ``None`` if the path does not exist."""
    if path.is_file():
        st = path.stat()
        return {"files": 1, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if not path.is_dir():
        return None
    files = size = newest = 0
    for root, _dirs, names in os.walk(path):
        for n in names:
            st = os.stat(os.path.join(root, n))
            files, size, newest = files + 1, size + st.st_size, max(newest, st.st_mtime_ns)
    return {"files": files, "size": size, "mtime_ns": newest}


class Project:
    """A project directory. Cheap to construct; nothing is read until asked."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().resolve()

    def __repr__(self) -> str:
        return f"Project({str(self.root)!r})"

    # -- layout ---------------------------------------------------------------------------
    @property
    def settings_path(self) -> Path:
        return self.root / SETTINGS_FILE

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST_FILE

    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    @property
    def locks_dir(self) -> Path:
        return self.root / ".locks"

    def path(self, rel: str) -> Path:
        return self.root / rel

    def exists(self) -> bool:
        return self.settings_path.is_file()

    def require(self) -> "Project":
        if not self.exists():
            what = "does not exist" if not self.root.exists() else "is not an mv3d project (no mv3d.toml)"
            raise NotAProjectError(
                f"project directory {self.root} {what}; create it with: mv3d init {self.root}  "
                "(or point -P/--project / MV3D_PROJECT at an existing project)"
            )
        return self

    def init_in_place(self, given: Iterable[Any] = ()) -> "Project":
        """Create the project here, for the entry stage (``mv3d prep ctrate/`` typed in a new folder): only
        when the directory is missing, empty, or holds nothing but the paths in ``given`` (the stage's path
        arguments; ``None`` and tuples allowed) and folders that contain them. Anything else there is
        refused with :class:`NotAProjectError`, which names it."""
        sources = [Path(v).expanduser().resolve() for v in _flatten(given)]
        if self.root.is_dir():
            others = sorted(e.name for e in self.root.iterdir()
                            if not any(s == e.resolve() or e.resolve() in s.parents for s in sources))
            if others:
                shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
                raise NotAProjectError(
                    f"project directory {self.root} is not an mv3d project (no mv3d.toml), and it holds more "
                    f"than the source ({shown}), so it is not made one; create it with: mv3d init {self.root}  "
                    "(or run in an empty directory, or point -P/--project / MV3D_PROJECT at an existing project)"
                )
        return Project.init(self.root)

    # -- creation -------------------------------------------------------------------------
    @classmethod
    def init(cls, root: str | os.PathLike) -> "Project":
        """Create the skeleton; an existing project is left as it is (idempotent)."""
        p = cls(root)
        if p.root.exists() and not p.root.is_dir():
            raise NotAProjectError(f"{p.root} exists and is a file; choose another project directory")
        p.root.mkdir(parents=True, exist_ok=True)
        p.runs_dir.mkdir(exist_ok=True)
        if not p.settings_path.exists():
            atomic_write_text(p.settings_path, SETTINGS_TEMPLATE.format(name=p.root.name))
        if not p.manifest_path.exists():
            atomic_write_json(p.manifest_path, _empty_manifest())
        return p

    # -- settings -------------------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        return load_settings(self.settings_path)

    # -- manifest -------------------------------------------------------------------------
    def manifest(self) -> dict[str, Any]:
        if not self.manifest_path.exists():
            return _empty_manifest()
        try:
            m = read_json(self.manifest_path)
        except ValueError as e:
            raise ConfigError(
                f"{self.manifest_path} is not valid JSON ({e}); it is machine-written, so restore it "
                "from a backup or delete it and rerun the stages"
            ) from e
        if m.get("schema_version", 0) > MANIFEST_SCHEMA:
            raise ConfigError(f"{self.manifest_path} was written by a newer mv3d; upgrade mv3d")
        m.setdefault("artifacts", {})
        m.setdefault("stages", {})
        return m

    def update_manifest(self, change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        """Read-modify-write the manifest under a lock (concurrent stages each get their turn)."""
        with FileLock(self.locks_dir / "manifest.lock", "the project manifest").acquire(timeout=60):
            m = self.manifest()
            change(m)
            atomic_write_json(self.manifest_path, m)
        return m

    def artifact(self, key: str) -> dict[str, Any] | None:
        """The manifest entry of an artifact whose files still exist, else ``None``."""
        entry = self.manifest()["artifacts"].get(key)
        if entry is None or not (self.root / entry["path"]).exists():
            return None
        return entry

    def artifact_path(self, key: str) -> Path | None:
        entry = self.artifact(key)
        return None if entry is None else self.root / entry["path"]

    def stage_lock(self, stage: str) -> FileLock:
        return FileLock(self.locks_dir / f"{stage}.lock", f"stage {stage!r} in project {self.root}")


def _flatten(values: Iterable[Any]) -> Iterator[str | os.PathLike]:
    for v in values:
        if isinstance(v, (tuple, list)):
            yield from _flatten(v)
        elif v is not None and v != "":
            yield v


def _empty_manifest() -> dict[str, Any]:
    return {"schema_version": MANIFEST_SCHEMA, "artifacts": {}, "stages": {}}


def stage_status(project: Project, name: str, manifest: dict[str, Any] | None = None) -> str:
    """``running`` (a process holds its lock), ``missing`` (never succeeded, or an output was
    deleted), ``done``, ``stale`` (an input was re-made after this stage last ran), ``failed``
    (its last run failed) or ``partial`` (its last run wrote only part, e.g. one shard)."""
    if project.stage_lock(name).is_held():
        return "running"
    m = manifest if manifest is not None else project.manifest()
    rec = m["stages"].get(name)
    if rec is None:
        return "missing"
    if rec.get("status") in ("failed", "partial"):
        return rec["status"]
    if rec.get("status") != "done":
        return "missing"
    for key in rec.get("outputs", []):
        art = m["artifacts"].get(key)
        if art is None or not (project.root / art["path"]).exists():
            return "missing"
    for key, used in rec.get("inputs", {}).items():
        art = m["artifacts"].get(key)
        if art is None or art.get("run") != used.get("run") or art.get("fingerprint") != used.get("fingerprint"):
            return "stale"
    return "done"
