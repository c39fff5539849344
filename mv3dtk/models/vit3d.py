"""A plain 3D ViT: Conv3d patch embedding, learned position embeddings (resized trilinearly when the
token grid changes), pre-norm blocks on ``F.scaled_dot_product_attention``. No CLS token: the
global embedding is the mean of the final tokens, the same pooling the local pathway uses."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .base import (Backbone, InputWindows, init_transformer_weights, padding_attn_mask,  # noqa: F401 (re-exported)
                   resize_pos_embed)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % heads:
            raise ValueError(f"embed dim {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)  # (3, B, h, N, c)
        x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=mask)  # (B, h, N, c)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))  # (B, N, C)


class Block(nn.Module):
    """Pre-norm transformer block; ``mask`` (B, 1, 1, N) bool keeps padding out of attention."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), mask)
        return x + self.mlp(self.norm2(x))


class ViT3D(Backbone):
    def __init__(self, *, in_chans: int = 1, embed_dim: int = 768, depth: int = 12, heads: int = 12,
                 mlp_ratio: float = 4.0, patch_size=(16, 16, 16), input_size=(96, 320, 320), qkv_bias: bool = True,
                 mask_pool_layer: int = -1, grad_checkpointing: bool = False, stem: list[int] | None = None,
                 windows: list[list[float]] | None = None):
        super().__init__()
        self.embed_dim = embed_dim
        self.patch_size = tuple(patch_size)
        self.input_size = tuple(input_size)
        self.grid = self.token_grid(self.input_size)
        self.windows = InputWindows(windows) if windows else None  # (B, 1, ...) -> (B, K, ...)
        if self.windows is not None:
            if in_chans != 1:
                raise ValueError(f"windows read a one-channel volume, not {in_chans} channels")
            in_chans = self.windows.lo.shape[1]
        self.patch_embed = patch_embedding(in_chans, embed_dim, self.patch_size, stem)
        self.pos_embed = nn.Parameter(torch.zeros(1, math.prod(self.grid), embed_dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.ModuleList(Block(embed_dim, heads, mlp_ratio, qkv_bias) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim)
        self.split = mask_pool_layer % depth if -depth <= mask_pool_layer < depth else None
        if self.split is None:
            raise ValueError(f"mask_pool_layer {mask_pool_layer} is outside the {depth} blocks (use -{depth}..{depth - 1})")
        self.grad_checkpointing = grad_checkpointing
        self.apply(init_transformer_weights)

    def token_grid(self, input_size) -> tuple[int, int, int]:
        bad = [n for n, p in zip(input_size, self.patch_size) if n % p]
        if bad:
            raise ValueError(f"input {tuple(input_size)} is not a multiple of the patch size {self.patch_size}")
        return tuple(n // p for n, p in zip(input_size, self.patch_size))

    def _run(self, blocks, x, mask=None):
        for blk in blocks:
            x = checkpoint(blk, x, mask, use_reentrant=False) if self.grad_checkpointing and self.training else blk(x, mask)
        return x

    def forward_early(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        grid = self.token_grid(x.shape[-3:])
        if self.windows is not None:
            x = self.windows(x)  # (B, K, D, H, W)
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, N, C)
        x = x + resize_pos_embed(self.pos_embed, self.grid, grid)
        return self._run(self.blocks[: self.split], x), grid

    def forward_late(self, tokens: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        return self.norm(self._run(self.blocks[self.split:], tokens, padding_attn_mask(keep)))  # (B, L, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_late(self.forward_early(x)[0])


def patch_embedding(in_chans: int, embed_dim: int, patch_size: tuple[int, ...], stem: list[int] | None) -> nn.Module:
    """(B, in_chans, D, H, W) -> (B, embed_dim, D/pd, H/ph, W/pw).

    No ``stem``: the paper's linear patch projection. ``stem`` = channel widths of convolutional stages
    (3x3x3 conv, BatchNorm, ReLU), each halving every axis the patch size still divides, then a linear
    projection of what is left of the patch (a hybrid ViT). A tiny ViT trained from scratch on a few
    hundred volumes learns far more from such early convolutions than from a linear projection
    (benchmarks/image_probe.py)."""
    if not stem:
        return nn.Conv3d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
    layers: list[nn.Module] = []
    rest, width = list(patch_size), in_chans
    for out in stem:
        stride = tuple(2 if r % 2 == 0 and r > 1 else 1 for r in rest)
        rest = [r // s for r, s in zip(rest, stride)]
        layers += [nn.Conv3d(width, int(out), 3, stride=stride, padding=1, bias=False), nn.BatchNorm3d(int(out)),
                   nn.ReLU(inplace=True)]
        width = int(out)
    layers.append(nn.Conv3d(width, embed_dim, kernel_size=tuple(rest), stride=tuple(rest)))
    return nn.Sequential(*layers)


