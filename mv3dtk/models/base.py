"""The contract every 3D image backbone meets, so that the dual pathway works on any of them.

A backbone is split at ``mask_pool_layer`` into an *early* part (patch embedding, positions, and
every block before the split) and a *late* part (the blocks from the split on, then the final
norm). The global pathway runs both on all tokens. The local pathway takes the early tokens
selected by a region's mask (mask average-pooled to the token grid, tokens >= 0.5 kept) and runs
only them through the late part. Late blocks must therefore be plain global self-attention blocks
(positions already added, no spatial reduction, no windowing) that accept a padding mask.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class Backbone(nn.Module):
    """Subclasses set ``embed_dim`` (channels of the late tokens) and implement the three methods."""

    embed_dim: int

    def forward_early(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """x (B, 1, D, H, W) -> tokens (B, N, C) entering the late blocks, and the token grid
        (d, h, w), N = d*h*w in row-major (D, H, W) order."""
        raise NotImplementedError

    def forward_late(self, tokens: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, L, C) -> (B, L, C) through the late blocks and the final norm. ``keep``
        (B, L) bool marks real tokens; False is padding: it is never attended to, and its output is
        undefined (callers ignore it)."""
        raise NotImplementedError

    def token_grid(self, input_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        """The (d, h, w) token grid for an input of (D, H, W) voxels."""
        raise NotImplementedError


class InputWindows(nn.Module):
    """(B, 1, D, H, W) -> (B, K, D, H, W): the volume seen through K intensity windows, each
    ``[lo, hi]`` in input units (prep maps its HU window to [-1, 1]: with the default -1000..1000,
    ``[-1.0, -0.5]`` is the lung window -1000..-500 HU) and mapped back to [-1, 1]. Radiologists read
    lung texture in a lung window: a 100 HU change in the lung parenchyma is 5 % of the input's
    range but 20 % of the lung window's."""

    def __init__(self, windows):
        super().__init__()
        w = torch.as_tensor(windows, dtype=torch.float32).reshape(-1, 2)  # (K, 2)
        if not len(w) or bool((w[:, 1] <= w[:, 0]).any()):
            raise ValueError(f"windows must be a non-empty list of [lo, hi] with lo < hi, not {windows}")
        self.register_buffer("lo", w[:, 0].reshape(1, -1, 1, 1, 1), persistent=False)
        self.register_buffer("hi", w[:, 1].reshape(1, -1, 1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ((x - self.lo) / (self.hi - self.lo)).clamp(0, 1) * 2 - 1  # (B, K, D, H, W)


def padding_attn_mask(keep: torch.Tensor | None) -> torch.Tensor | None:
    """(B, L) bool keep -> a (B, 1, 1, L) boolean mask for ``F.scaled_dot_product_attention``
    (True = may attend)."""
    return None if keep is None else keep[:, None, None, :]


def resize_pos_embed(table: torch.Tensor, src_grid: Sequence[int], dst_grid: Sequence[int], *,
                     num_prefix: int = 0) -> torch.Tensor:
    """Resize a (1, P + d0*h0*w0, C) position table to (1, P + d*h*w, C): the first ``num_prefix``
    rows (class-token positions) are kept; the grid rows are put back on their 3D grid and resized
    trilinearly (``align_corners=False``), never reshaped as if the grid were square."""
    src, dst = tuple(int(v) for v in src_grid), tuple(int(v) for v in dst_grid)
    if src == dst:
        return table
    prefix, grid_rows = table[:, :num_prefix], table[:, num_prefix:]  # (1, P, C), (1, N0, C)
    c = table.shape[-1]
    if grid_rows.shape[1] != math.prod(src):
        raise ValueError(f"position table has {grid_rows.shape[1]} grid rows, not {math.prod(src)} = {src}")
    vol = grid_rows.reshape(1, *src, c).permute(0, 4, 1, 2, 3)  # (1, C, d0, h0, w0)
    vol = F.interpolate(vol.float(), size=dst, mode="trilinear", align_corners=False).to(table.dtype)
    grid_rows = vol.permute(0, 2, 3, 4, 1).reshape(1, math.prod(dst), c)  # (1, N, C)
    return torch.cat([prefix, grid_rows], dim=1)  # (1, P + N, C)


def init_transformer_weights(m: nn.Module) -> None:
    """ViT-style initialisation (``module.apply``): Linear weights truncated-normal (std 0.02) and zero
    biases; affine norms (LayerNorm, InstanceNorm3d) weight 1 and bias 0."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.LayerNorm, nn.InstanceNorm3d)) and m.weight is not None:
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
