"""What the evaluation stages share around a run: the model to evaluate, the run folder and its
``latest`` link, option lists, and strict JSON."""

from __future__ import annotations

import datetime as dt
import math
import os
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import ConfigError, MissingInputError
from ..project import Project


def parse_choices(values: Sequence[str] | str, allowed: Sequence[str], option: str) -> list[str]:
    """``"a,b"`` or ``["a", "b"]`` -> the distinct names in order; an unknown or empty list is an error."""
    names = [s.strip() for s in values.split(",")] if isinstance(values, str) else list(values)
    names = [n for n in names if n]
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        raise ConfigError(f"{option} {','.join(names) or '(empty)'}: choose from {', '.join(allowed)}")
    return list(dict.fromkeys(names))


def clean_json(obj):
    """NaN/inf -> None, numpy scalars -> Python, recursively (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): clean_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean_json(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def default_run_name(model_dir: str | Path, split: str) -> str:
    """``<pretrain run>-<split>-<UTC time>`` (the model dir's parent name when it is ``.../model``)."""
    p = Path(model_dir).resolve()
    base = p.parent.name if p.name == "model" and p.parent.name else p.name
    return f"{base}-{split}-{dt.datetime.now(dt.timezone.utc).strftime('%Y%m%dT%H%M%SZ')}"


def resolve_model_dir(project_root: str | Path, model: str | Path | None) -> Path:
    """``--model`` as given (or relative to the project), else the project's latest ``pretrain.model``."""
    root = Path(project_root)
    if model is None:
        found = Project(root).artifact_path("pretrain.model")
        if found is None or not found.is_dir():
            raise MissingInputError("no --model given and the project has no pretrained model; pass --model "
                                    "pretrain/<run>/model (or any saved model directory), or run: mv3d pretrain")
        return found
    for cand in (Path(model), root / model):
        if (cand / "config.json").is_file():
            return cand.resolve()
    raise ConfigError(f"--model {model}: not a saved mv3d model directory (no config.json there or under "
                      f"{root}); point at pretrain/<run>/model")


def run_folder(project_root: str | Path, task: str, run_name: str | None, model_dir: Path, split: str) -> Path:
    """``<project>/<task>/<run>`` (the default name from :func:`default_run_name`)."""
    name = run_name or default_run_name(model_dir, split)
    if "/" in name or name.startswith(".") or name == "latest":
        raise ConfigError(f"--run {name!r}: use a plain folder name other than 'latest'")
    return Path(project_root) / task / name


def point_latest(run_dir: Path, link: Path | None = None) -> Path:
    """Make ``link`` (default ``<task>/latest``) a relative symlink to ``run_dir`` (replaced atomically)."""
    link = link or run_dir.parent / "latest"
    tmp = link.parent / f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}-{link.name}"
    try:
        os.symlink(os.path.relpath(run_dir, link.parent), tmp)
        os.replace(tmp, link)
    except OSError:  # no symlinks on this file system: the manifest still records the run
        tmp.unlink(missing_ok=True)
    return link
