"""Collectives for the training loop: all-gathers with and without gradients, means over ranks.

Contrastive negatives span the global batch: each rank gathers the embeddings of all ranks with
:func:`gather_with_grad` and computes the **same** loss on the same global batch. The backward
of the gather sums the incoming gradients over ranks (``all_reduce(SUM)``) and keeps this rank's
slice, so a rank's input gradient is ``world_size ×`` the single-process gradient of the loss on
the concatenated batch; DDP's mean over ranks of the parameter gradients then gives exactly the
single-process parameter gradients (tested in ``tests/test_dist.py``). Integer/bool tensors and
bank updates go through :func:`gather_nograd`. Every helper is the identity when no process group
exists (rank and process-group helpers: :mod:`mv3dtk.dist`).

:class:`GlobalBatchNorm` gives a BatchNorm the global batch's statistics on the CPU (gloo), where
``torch.nn.SyncBatchNorm`` does not run.

Equal per-rank batch sizes are required (use ``drop_last=True`` in the DataLoader / sampler):
the gathers check this with an all-gather of the shapes and raise :class:`UnequalBatchError`
on every rank otherwise (no hang).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.distributed as dist
from torch import Tensor

from ..dist import is_distributed
from ..errors import Mv3dError

__all__ = ["UnequalBatchError", "AllGatherGrad", "gather_with_grad", "gather_nograd", "gather_batch", "all_reduce_mean",
           "GlobalBatchNorm", "global_batchnorm"]

_MAX_DIMS = 8


class UnequalBatchError(Mv3dError, ValueError):
    """Ranks hold tensors of different shapes where an all-gather needs equal ones."""


def _check_equal_shapes(t: Tensor) -> None:
    """All-gather the shape of t and raise UnequalBatchError (on every rank) if any differs."""
    if t.dim() > _MAX_DIMS:
        raise ValueError(f"gather supports tensors of up to {_MAX_DIMS} dims, got {t.dim()}")
    code = torch.full((_MAX_DIMS + 1,), -1, dtype=torch.long, device=t.device)
    code[0] = t.dim()
    code[1:t.dim() + 1] = torch.tensor(t.shape, dtype=torch.long)
    shapes = [torch.empty_like(code) for _ in range(dist.get_world_size())]
    dist.all_gather(shapes, code)
    if any(not torch.equal(s, shapes[0]) for s in shapes):
        desc = ", ".join(f"rank {r}: {tuple(s[1:int(s[0]) + 1].tolist())}" for r, s in enumerate(shapes))
        raise UnequalBatchError(
            f"all-gather needs the same tensor shape on every rank, got {desc}; use equal per-rank batch "
            "sizes (DataLoader(..., drop_last=True) with a DistributedSampler(drop_last=True))")


class AllGatherGrad(torch.autograd.Function):
    """Concatenate t (n, ...) from every rank along dim 0 -> (world·n, ...), with gradients.

    Backward: ``all_reduce(SUM)`` of the incoming gradient, then this rank's slice (the recipe of
    reference/env-and-perf.md §6). Shapes must be equal on every rank (see :func:`gather_with_grad`).
    """

    @staticmethod
    def forward(ctx: Any, t: Tensor) -> Tensor:
        world = dist.get_world_size()
        out = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(out, t.contiguous())
        return torch.cat(out, 0)  # (world·n, ...)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> Tensor:
        g = g.contiguous().clone()
        dist.all_reduce(g, op=dist.ReduceOp.SUM)
        return g.chunk(dist.get_world_size(), 0)[dist.get_rank()]  # (n, ...)


def gather_with_grad(t: Tensor) -> Tensor:
    """All-gather along dim 0 keeping gradients (identity when not distributed)."""
    if not is_distributed():
        return t
    _check_equal_shapes(t)
    return AllGatherGrad.apply(t)


@torch.no_grad()
def gather_nograd(t: Tensor) -> Tensor:
    """All-gather along dim 0 without gradients (detached; identity when not distributed).
    Bool tensors are sent as uint8 (gloo has no bool all-gather)."""
    if not is_distributed():
        return t.detach()
    _check_equal_shapes(t)
    src = t.detach().contiguous()
    send = src.to(torch.uint8) if src.dtype == torch.bool else src
    out = [torch.empty_like(send) for _ in range(dist.get_world_size())]
    dist.all_gather(out, send)
    res = torch.cat(out, 0)
    return res.bool() if src.dtype == torch.bool else res


def gather_batch(out: Mapping[str, Any]) -> dict[str, Any]:
    """Gather every batch tensor of a model-output dict along dim 0: floating tensors that need
    gradients through :func:`gather_with_grad`, others through :func:`gather_nograd`; scalars
    (e.g. ``logit_scale``) and non-tensors pass through. Identity when not distributed."""
    if not is_distributed():
        return dict(out)
    res: dict[str, Any] = {}
    for k, v in out.items():
        if not isinstance(v, Tensor) or v.dim() == 0:
            res[k] = v
        elif v.is_floating_point() and v.requires_grad:
            res[k] = gather_with_grad(v)
        else:
            res[k] = gather_nograd(v)
    return res


@torch.no_grad()
def all_reduce_mean(t: Tensor) -> Tensor:
    """Mean over ranks of t (a new, detached tensor; integer input gives a float result).
    Identity (detached) when not distributed."""
    r = t.detach().clone()
    if not r.is_floating_point():
        r = r.float()
    if is_distributed():
        dist.all_reduce(r, op=dist.ReduceOp.SUM)
        r /= dist.get_world_size()
    return r


class GlobalBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    """A BatchNorm whose training statistics span the global batch of a multi-process run: what
    ``torch.nn.SyncBatchNorm`` does on GPUs, for the CPU (gloo), which it does not support. Per-rank
    sums are all-gathered with gradients (:class:`AllGatherGrad`), so the forward and, after DDP's mean,
    the parameter gradients are the single process's on the concatenated batch. Same parameters,
    buffers and state-dict keys as the BatchNorm it replaces."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected an input of at least 2 dims (N, C, ...), got {x.dim()}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not is_distributed():
            return super().forward(x)
        C, dims = x.shape[1], [0, *range(2, x.dim())]
        shape = (1, C) + (1,) * (x.dim() - 2)
        n = x.numel() // C * dist.get_world_size()  # values per channel in the global batch (equal per-rank batches)
        xf = x.float()
        mean = AllGatherGrad.apply(xf.sum(dims)[None]).sum(0) / n  # (C,)
        centred = xf - mean.view(shape)
        var = AllGatherGrad.apply(centred.square().sum(dims)[None]).sum(0) / n  # (C,) biased, as BatchNorm
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                f = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.mul_(1 - f).add_(mean, alpha=f)
                self.running_var.mul_(1 - f).add_(var * n / max(n - 1, 1), alpha=f)  # unbiased, as BatchNorm
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def global_batchnorm(module: torch.nn.Module) -> torch.nn.Module:
    """Replace every BatchNorm below ``module`` by a :class:`GlobalBatchNorm` holding the same parameters
    and buffers (the optimizer's parameters stay valid); returns ``module``."""
    for name, child in module.named_children():
        if isinstance(child, torch.nn.modules.batchnorm._BatchNorm) and not isinstance(child, GlobalBatchNorm):
            bn = GlobalBatchNorm(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
            if child.affine:
                bn.weight, bn.bias = child.weight, child.bias
            if child.track_running_stats:
                bn.running_mean, bn.running_var = child.running_mean, child.running_var
                bn.num_batches_tracked = child.num_batches_tracked
            setattr(module, name, bn.train(child.training))
        else:
            global_batchnorm(child)
    return module
