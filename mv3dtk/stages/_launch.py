"""What every training stage does with ``--nproc``: start N processes of itself, or train here."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..runs import StageContext


def launch_or_run(sctx: StageContext, stage: str, opts: Any, run: str, train: Callable[[], Any]) -> None:
    """With ``--nproc N`` outside torchrun: run ``mv3d <stage>`` with the same ``opts`` in N processes
    (:func:`mv3dtk.launch.torchrun`, the run name passed on); otherwise (one process, or one of the N)
    call ``train()`` here."""
    from ..launch import needs_launch, torchrun

    if needs_launch(opts.nproc):
        torchrun(stage, opts, project=sctx.project.root, nproc=opts.nproc, run=run, parent_run=sctx.run_id,
                 log=sctx.log, root_args=sctx.root_args)
    else:
        train()
