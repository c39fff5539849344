"""Logging: human logs to stderr (and to the run's ``log.txt``); stdout is kept for ``--json``."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

LOGGER = "mv3d"
_FMT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def get_logger(name: str = "") -> logging.Logger:
    return logging.getLogger(f"{LOGGER}.{name}" if name else LOGGER)


def level_for(verbosity: int, rank: int = 0) -> int:
    """-q -> WARNING, default INFO, -v -> DEBUG; ranks other than 0 only say warnings."""
    if rank != 0:
        return logging.WARNING
    return {-1: logging.WARNING, 0: logging.INFO}.get(verbosity, logging.DEBUG if verbosity > 0 else logging.ERROR)


def setup_console(verbosity: int, rank: int = 0) -> None:
    root = get_logger()
    root.setLevel(logging.DEBUG)
    root.propagate = False
    for h in [h for h in root.handlers if getattr(h, "_mv3d_console", False)]:
        root.removeHandler(h)
    h = logging.StreamHandler(sys.stderr)
    h.setLevel(level_for(verbosity, rank))
    h.setFormatter(logging.Formatter("%(levelname)s %(message)s" if verbosity <= 0 else _FMT))
    h._mv3d_console = True  # type: ignore[attr-defined]
    root.addHandler(h)


def add_file_handler(path: Path) -> logging.Handler:
    h = logging.FileHandler(path, encoding="utf-8")
    h.setLevel(logging.DEBUG)
    h.setFormatter(logging.Formatter(_FMT))
    get_logger().addHandler(h)
    return h


def remove_handler(h: logging.Handler) -> None:
    get_logger().removeHandler(h)
    h.close()
