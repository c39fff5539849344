"""What the evaluation stages share around a run: option lists and publishing the result."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from ..errors import ConfigError


def parse_choices(values: Sequence[str] | str, allowed: Sequence[str], option: str) -> list[str]:
    """``"a,b"`` or ``["a", "b"]`` -> the distinct names in order; an unknown or empty list is an error."""
    names = [s.strip() for s in values.split(",")] if isinstance(values, str) else list(values)
    names = [n for n in names if n]
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        raise ConfigError(f"{option} {','.join(names) or '(empty)'}: choose from {', '.join(allowed)}")
    return list(dict.fromkeys(names))


def publish(sctx, artifact: str, run_dir: Path, summary: dict, table: str, as_json: bool) -> None:
    """Record the run as the stage's artifact, point ``<stage>/latest`` at it, and print the table
    (stderr when ``--json`` puts the summary on stdout)."""
    import click

    from .zeroshot import point_latest

    sctx.record_output(artifact, run_dir)
    point_latest(run_dir)
    click.echo(table, err=as_json)
    if as_json:
        click.echo(json.dumps({**summary, "run_dir": str(run_dir)}))
