"""``mv3d.toml`` -> Click ``default_map``, and the resolved configuration saved with every run.

Precedence is Click's own: command line > environment (``MV3D_<STAGE>_<OPTION>``, via
``auto_envvar_prefix``) > ``mv3d.toml`` ``[stages.<name>]`` (the default map) > built-in default.
"""

from __future__ import annotations

import difflib
import re
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ConfigError

if TYPE_CHECKING:  # the functions read Click objects they are given; this module never imports Click
    import click

SECRET_NAME = re.compile(r"(api[_-]?key|token|secret|password|passwd|credential)", re.I)
REDACTED = "***"


def load_settings(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML: {e}; fix that line (see the comments at the top of the file)") from e
    stages = data.get("stages", {})
    if not isinstance(stages, dict) or any(not isinstance(v, dict) for v in stages.values()):
        raise ConfigError(f"{path}: [stages] must hold one table per stage, e.g. [stages.prep] workers = 4")
    for stage, table in stages.items():
        for key in table:
            if SECRET_NAME.search(key):
                raise ConfigError(
                    f"{path}: [stages.{stage}] {key} looks like a secret; secrets must not be stored in "
                    "the project. Remove it and set it in the environment instead"
                )
    return data


def default_map(settings: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{"stages": {"prep": {"max-workers": 2}}}`` -> ``{"prep": {"max_workers": 2}}``."""
    return {
        stage: {key.replace("-", "_"): value for key, value in table.items()}
        for stage, table in settings.get("stages", {}).items()
    }


def check_stage_settings(stage: str, command: click.Command, table: dict[str, Any], source: Path) -> None:
    """Refuse keys in ``[stages.<stage>]`` that are not options of the stage (typos otherwise
    pass silently, because Click ignores unknown default-map keys)."""
    names = {p.name for p in command.params if p.name}
    for key in table:
        if key not in names:
            close = difflib.get_close_matches(key, sorted(names), n=1)
            hint = f"did you mean {close[0].replace('_', '-')!r}? " if close else ""
            valid = ", ".join(sorted(n.replace("_", "-") for n in names)) or "(none)"
            raise ConfigError(
                f"{source}: [stages.{stage}] has no option {key.replace('_', '-')!r}; {hint}"
                f"valid options: {valid}"
            )


def resolved_config(ctx: click.Context) -> dict[str, dict[str, Any]]:
    """Every parameter's final value and where it came from (commandline, environment,
    default_map, default). Secret-looking parameters are redacted."""
    out = {}
    for name, value in ctx.params.items():
        source = ctx.get_parameter_source(name)
        if SECRET_NAME.search(name) and value is not None:
            value = REDACTED
        out[name] = {"value": _jsonable(value), "source": source.name.lower() if source else None}
    return out


def redact_argv(argv: list[str]) -> list[str]:
    """``["--api-key", "sk-1"]`` / ``["--api-key=sk-1"]`` -> the value replaced by ``***``."""
    out, hide_next = [], False
    for arg in argv:
        if hide_next:
            out.append(REDACTED)
            hide_next = False
        elif arg.startswith("-") and SECRET_NAME.search(arg.split("=", 1)[0]):
            out.append(arg.split("=", 1)[0] + "=" + REDACTED if "=" in arg else arg)
            hide_next = "=" not in arg
        else:
            out.append(arg)
    return out


def _jsonable(v: Any) -> Any:
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    return str(v)
