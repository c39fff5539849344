"""Click options generated from an options dataclass (:mod:`mv3dtk.options`): a stage's options are
written once, as fields, and this turns them into its command line."""

from __future__ import annotations

from typing import Any, Callable

import click

from ..options import options_of


def _click_type(kind: type, spec) -> Any:
    if spec.choices:
        return click.Choice(list(spec.choices))
    if spec.path:
        return click.Path(file_okay=spec.path != "dir", dir_okay=spec.path != "file")
    if kind in (int, float) and spec.min is not None:
        return (click.IntRange if kind is int else click.FloatRange)(min=spec.min)
    return kind


def click_options(cls: type) -> Callable[[Callable], Callable]:
    """Decorate a command with one Click option per field of ``cls``; the callback receives the field
    names as keyword arguments, so ``cls(**kwargs)`` rebuilds the options."""
    def decorate(f: Callable) -> Callable:
        for fld, spec, kind in reversed(options_of(cls)):
            decls = [spec.flag(fld.name), fld.name]
            if spec.is_flag:
                f = click.option(*decls, is_flag=True, default=fld.default, help=spec.help)(f)
                continue
            shown = spec.show_default and fld.default not in (None, ())
            f = click.option(*decls, type=_click_type(kind, spec), default=fld.default, show_default=shown,
                             nargs=spec.nargs, multiple=spec.multiple, help=spec.help)(f)
        return f

    return decorate
