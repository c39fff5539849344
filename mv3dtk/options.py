"""A stage's options, written once: dataclass fields that carry their command-line spelling.

A training stage describes its options as a dataclass whose fields are made with :func:`option`.
The same fields then give

* the Click options of the stage (``mv3dtk.stages._config.click_options``, on the CLI side),
* the argument list that the launcher passes to the processes it starts (:func:`to_argv`),
* the defaults, in one place (the field defaults).

This module is library code: it never imports Click. ::

    @dataclass(kw_only=True)
    class FitOptions(LaunchOptions):
        lr: float = option(1e-4, "Peak learning rate.")
        epochs: int = option(10, "Passes over the data.", min=1)
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Opt", "option", "options_of", "to_argv", "LaunchOptions", "REPORT_TO"]

REPORT_TO = ("none", "tensorboard", "wandb")


@dataclass(frozen=True)
class Opt:
    """How one field is spelled on the command line."""

    help: str
    flags: tuple[str, ...] = ()  # default: --field-name
    choices: tuple[str, ...] | None = None
    min: int | float | None = None
    is_flag: bool = False
    show_default: bool = True
    forward: bool = True  # passed on to the processes a launcher starts
    path: str | None = None  # "dir" or "file": a filesystem path (Click checks its kind, not its existence)
    nargs: int = 1  # values per use (e.g. 3 for ``--token-pool D H W``): the field holds a tuple
    multiple: bool = False  # the option may be repeated: the field holds a tuple of the values

    def flag(self, name: str) -> str:
        return self.flags[0] if self.flags else "--" + name.replace("_", "-")


def option(default: Any, help: str, **spec: Any) -> Any:
    """A dataclass field with a default and its command-line spelling (see :class:`Opt`)."""
    return field(default=default, metadata={"mv3d": Opt(help, **spec)})


def options_of(cls: type) -> list[tuple[dataclasses.Field, Opt, type]]:
    """``(field, Opt, value type)`` of every option of ``cls``: the class's own fields first, then those
    of its bases (so that shared options such as ``--nproc`` come last in ``--help``). The value type is
    the annotation without ``| None``."""
    hints = typing.get_type_hints(cls)
    depth = {}
    for level, klass in enumerate(cls.__mro__):
        for name in getattr(klass, "__annotations__", {}):
            depth.setdefault(name, level)
    rows = []
    for f in dataclasses.fields(cls):
        spec = f.metadata.get("mv3d")
        if spec is not None:
            kind = hints[f.name]
            args = [a for a in typing.get_args(kind) if a is not type(None)]
            kind = args[0] if args and typing.get_origin(kind) is not tuple else kind
            if (spec.multiple or spec.nargs > 1) and typing.get_origin(kind) is tuple:
                kind = typing.get_args(kind)[0]  # tuple[int, ...] -> int: the type of one value
            rows.append((f, spec, kind))
    order = {f.name: i for i, f in enumerate(dataclasses.fields(cls))}
    return sorted(rows, key=lambda r: (depth[r[0].name], order[r[0].name]))


def to_argv(opts: Any) -> list[str]:
    """The command-line arguments that reproduce ``opts`` (forwarded fields only; ``None`` is left out,
    so the child falls back to the same default)."""
    argv: list[str] = []
    for f, spec, _ in options_of(type(opts)):
        value = getattr(opts, f.name)
        if not spec.forward or value is None:
            continue
        if spec.is_flag:
            argv += [spec.flag(f.name)] if value else []
        elif spec.multiple:
            for v in value:
                argv += [spec.flag(f.name), str(v)]
        elif spec.nargs > 1:
            argv += [spec.flag(f.name), *map(str, value)]
        else:
            argv += [spec.flag(f.name), str(value)]
    return argv


@dataclass(kw_only=True)
class LaunchOptions:
    """What every training stage offers besides its own options: processes, run folder, resume and
    where to report metrics. The launcher (:mod:`mv3dtk.launch`) reads these."""

    nproc: int = option(1, "Processes on this node: launches torchrun --standalone (use torchrun yourself for "
                           "multi-node).", min=1, forward=False)
    resume: bool = option(False, "Continue the run from its latest checkpoint.", is_flag=True)
    run_name: str | None = option(None, "Run name (the folder of the run) [default: <backbone>-<time>].",
                                  flags=("--run",), forward=False)
    report_to: str = option("none", "Also log the metrics to TensorBoard (<run>/tensorboard/) or Weights & Biases "
                                    "(needs `pip install tensorboard` / `pip install wandb`; W&B sends the metrics "
                                    "and options to its server unless WANDB_MODE=offline).", choices=REPORT_TO)
