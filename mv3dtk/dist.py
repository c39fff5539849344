"""Where this process sits in a torchrun job, and the process group (DESIGN §6).

Single process by default; under ``torchrun`` (WORLD_SIZE > 1) :func:`init_distributed` creates the
process group (nccl with CUDA, gloo on CPU). Every helper is the identity / a no-op when no process
group exists, so a training loop is written once. The collectives that move tensors (all-gathers
with gradients, means over ranks) live in :mod:`mv3dtk.train.gather`.

The stage runner reads :class:`DistInfo` at CLI start-up, so this module imports ``torch`` inside
the functions that need it: ``mv3d --help`` must not pay for torch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import Mv3dError

__all__ = ["DistInfo", "init_distributed", "is_distributed", "get_world_size", "get_rank", "is_main", "barrier",
           "shutdown", "under_torchrun"]


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in a torchrun job (single process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> "DistInfo":
        env = os.environ
        return cls(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))


def under_torchrun() -> bool:
    """Whether torchrun (or srun with its variables) started this process."""
    return "WORLD_SIZE" in os.environ


def init_distributed(backend: str | None = None) -> DistInfo:
    """Read RANK / WORLD_SIZE / LOCAL_RANK (set by torchrun) and, if WORLD_SIZE > 1 and no process
    group exists yet, create one (``backend`` or nccl with CUDA, else gloo). With CUDA the current
    device is set from LOCAL_RANK. Touches no other global state; returns the :class:`DistInfo`."""
    import torch
    import torch.distributed as dist

    info = DistInfo.from_env()
    cuda = torch.cuda.is_available()
    if cuda and info.world_size > 1:
        torch.cuda.set_device(info.local_rank)
    if info.world_size > 1 and dist.is_available() and not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ and "TORCHELASTIC_RUN_ID" not in os.environ:
            raise Mv3dError("WORLD_SIZE > 1 but no rendezvous address is set; start multi-process runs with "
                            "torchrun (e.g. torchrun --nproc_per_node 2 -m mv3dtk ...)")
        dist.init_process_group(backend or ("nccl" if cuda else "gloo"))
    if is_distributed():
        return DistInfo(dist.get_rank(), dist.get_world_size(), info.local_rank)
    return info


def is_distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if is_distributed() else 1


def get_rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if is_distributed() else 0


def is_main() -> bool:
    """Rank 0 (the only rank that writes files and shows progress)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return DistInfo.from_env().is_main


def barrier() -> None:
    import torch.distributed as dist

    if is_distributed():
        dist.barrier()


def shutdown() -> None:
    """Wait for every rank, then tear the process group down (no-op in a single process)."""
    import torch.distributed as dist

    if is_distributed():
        dist.barrier()
        dist.destroy_process_group()
