"""The contract every 3D image backbone meets, so that the dual pathway works on any of them.

A backbone is split at ``mask_pool_layer`` into an *early* part (patch embedding, positions, and
every block before the split) and a *late* part (the blocks from the split on, then the final
norm). The global pathway runs both on all tokens. The local pathway takes the early tokens
selected by a region's mask (mask average-pooled to the token grid, tokens >= 0.5 kept) and runs
only them through the late part. Late blocks must therefore be plain global self-attention blocks
(positions already added, no spatial reduction, no windowing) that accept a padding mask.
"""

from __future__ import annotations

import torch
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


def padding_attn_mask(keep: torch.Tensor | None) -> torch.Tensor | None:
    """(B, L) bool keep -> a (B, 1, 1, L) boolean mask for ``F.scaled_dot_product_attention``
    (True = may attend)."""
    return None if keep is None else keep[:, None, None, :]
