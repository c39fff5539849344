"""Logging: human logs to stderr (and to the run's ``log.txt``); stdout is kept for ``--json``."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Callable

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


def progress(total: int, label: str, log: logging.Logger) -> tuple[Callable[[], None], Callable[[], None]]:
    """``(tick, close)``: a rich bar with count, rate and ETA on stderr when it is a terminal, else
    a log line every 5 %. Stdout stays free for machine-readable output."""
    seen, t0 = [0], time.monotonic()

    def rate() -> float:
        return seen[0] / max(time.monotonic() - t0, 1e-9)

    if sys.stderr.isatty() and total:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        bar = Progress(label, BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                       TimeRemainingColumn(), transient=True, console=Console(stderr=True))
        task = bar.add_task(label, total=total, rate="")

        def tick_bar() -> None:
            seen[0] += 1
            bar.update(task, advance=1, rate=f"{rate():.1f}/s")

        bar.start()
        return tick_bar, bar.stop
    step = max(1, total // 20)

    def tick() -> None:
        seen[0] += 1
        if seen[0] % step == 0 or seen[0] == total:
            log.info("%s: %d/%d, %.1f/s, ETA %.0f s", label, seen[0], total, rate(), (total - seen[0]) / rate())

    return tick, lambda: None
