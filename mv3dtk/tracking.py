"""``--report-to none|tensorboard|wandb``: where a training stage also sends its metrics.

``metrics.jsonl`` and ``loss.png`` are always written; a tracker adds the place users already watch.
Both back-ends are optional dependencies, imported only when asked for. Only rank 0 reports.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

from .errors import ConfigError

INSTALL = {"tensorboard": "pip install tensorboard", "wandb": "pip install wandb"}


class Tracker:
    """The no-op tracker (``--report-to none``), and the interface of the others."""

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardTracker(Tracker):
    """Scalars under ``<run>/tensorboard/`` (``tensorboard --logdir <run>/tensorboard``)."""

    def __init__(self, log_dir: Path, prefix: str):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ConfigError(f"--report-to tensorboard needs the tensorboard package ({e}); install it with: "
                              f"{INSTALL['tensorboard']} (or `make install`, which includes it)") from None
        self.writer, self.prefix = SummaryWriter(log_dir=str(log_dir)), prefix

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        for key, value in _scalars(metrics).items():
            self.writer.add_scalar(f"{self.prefix}/{key}", value, step)

    def close(self) -> None:
        self.writer.close()


class WandbTracker(Tracker):
    """A Weights & Biases run named after the mv3d run (project ``mv3d``; ``WANDB_PROJECT``,
    ``WANDB_MODE=offline`` and the API key come from the environment, never from mv3d)."""

    def __init__(self, run_dir: Path, name: str, config: Mapping[str, Any]):
        try:
            import wandb
        except ImportError as e:
            raise ConfigError(f"--report-to wandb needs the wandb package ({e}); install it with: "
                              f"{INSTALL['wandb']}") from None
        self.run = wandb.init(project="mv3d", name=name, dir=str(run_dir), config=dict(config), resume="allow",
                              id=name)

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        self.run.log(_scalars(metrics), step=step)

    def close(self) -> None:
        self.run.finish()


def make_tracker(kind: str, run_dir: Path, stage: str, config: Mapping[str, Any]) -> Tracker:
    """The tracker for ``--report-to kind`` of the run in ``run_dir``."""
    if kind == "none":
        return Tracker()
    if kind == "tensorboard":
        return TensorBoardTracker(run_dir / "tensorboard", stage)
    if kind == "wandb":
        return WandbTracker(run_dir, f"{stage}-{run_dir.name}", config)
    raise ConfigError(f"--report-to {kind!r}: choose from none, tensorboard, wandb")


def _scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of a metrics row (step and epoch are the x axis, not curves)."""
    return {k: float(v) for k, v in metrics.items()
            if k not in ("step", "epoch") and isinstance(v, (int, float)) and math.isfinite(v)}
