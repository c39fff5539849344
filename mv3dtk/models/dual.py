"""The dual-pathway encoder: one pass of the early blocks, then the late blocks on all tokens
(global) and, batched over every (sample, region) pair, on each region's tokens only (local).

Region masks arrive as the uint16 bitmask of ``prep/masks`` (bit k = region k). A region's
binary mask is average-pooled to the token grid; tokens with a pooled value >= ``threshold`` are
the region's; a present region too small to cover any token to that degree keeps its single
highest-scoring token. No Python loop over samples or regions: the selected tokens of all pairs
are gathered into one padded batch with a padding mask.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .base import Backbone


def region_weights(masks: torch.Tensor, n_regions: int, grid: tuple[int, int, int]) -> torch.Tensor:
    """masks (B, D, H, W) integer bitmask -> (B, R, N) fraction of each token covered by each region.

    One region at a time: expanding every bit at once into a (B, R, D, H, W) tensor gives the same
    numbers 4-5x slower (memory traffic: 0.3 s a step of the CPU demo; benchmarks/region_weights.py)."""
    m = masks.to(torch.int32)  # (B, D, H, W); int32 holds all 16 bits of the uint16 masks
    pooled = [F.adaptive_avg_pool3d(((m >> r) & 1).float()[:, None], grid) for r in range(n_regions)]  # (B, 1, d, h, w)
    return torch.cat(pooled, 1).flatten(2) if pooled else m.new_zeros(len(m), 0, math.prod(grid)).float()  # (B, R, N)


def select_tokens(weights: torch.Tensor, threshold: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, R, N) -> keep (B, R, N) bool, present (B, R) bool."""
    present = weights.amax(-1) > 0  # (B, R)
    keep = weights >= threshold
    best = F.one_hot(weights.argmax(-1), weights.shape[-1]).bool()  # (B, R, N)
    lonely = present & ~keep.any(-1)
    keep = keep | (best & lonely[..., None])
    return keep & present[..., None], present


def pack(tokens: torch.Tensor, keep: torch.Tensor, present: torch.Tensor):
    """tokens (B, N, C), keep (B, R, N) -> padded (P, L, C), valid (P, L), and the (b, r) of each of
    the P present pairs."""
    B, N, C = tokens.shape
    b_idx, r_idx = present.nonzero(as_tuple=True)  # (P,), (P,)
    sel = keep[b_idx, r_idx]  # (P, N)
    counts = sel.sum(-1)  # (P,)
    L = int(counts.max()) if counts.numel() else 0
    order = torch.argsort((~sel).to(torch.int8), dim=-1, stable=True)[:, :L]  # selected token indices first
    valid = torch.arange(L, device=tokens.device)[None, :] < counts[:, None]  # (P, L)
    flat = tokens.reshape(B * N, C)[(b_idx[:, None] * N + order).reshape(-1)]  # (P*L, C)
    return flat.reshape(-1, L, C), valid, b_idx, r_idx


POOLS = ("mean", "max", "meanmax")


def pool_width(how: str) -> int:
    """How many token widths :func:`pool_tokens` returns: 2 for ``meanmax``, else 1."""
    return 2 if how == "meanmax" else 1


def pool_tokens(tokens: torch.Tensor, valid: torch.Tensor | None = None, how: str = "mean") -> torch.Tensor:
    """tokens (B, L, C), valid (B, L) bool | None -> (B, C), or (B, 2C) for ``meanmax``. ``max`` keeps a
    small finding (a few tokens) from being averaged away by hundreds of normal ones; ``mean`` is the
    paper's and sees diffuse change; ``meanmax`` concatenates both."""
    if how == "meanmax":
        return torch.cat([pool_tokens(tokens, valid, "mean"), pool_tokens(tokens, valid, "max")], dim=-1)
    if how == "max":
        if valid is not None:
            tokens = tokens.masked_fill(~valid[..., None], float("-inf"))
        return tokens.amax(1)
    if how != "mean":
        raise ValueError(f"pool must be one of {POOLS}, got {how!r}")
    if valid is None:
        return tokens.mean(1)
    return (tokens * valid[..., None]).sum(1) / valid.sum(1, keepdim=True)


def encode_dual(backbone: Backbone, x: torch.Tensor, masks: torch.Tensor | None, n_regions: int,
                threshold: float = 0.5, pool: str = "mean") -> dict[str, torch.Tensor]:
    """x (B, 1, D, H, W), masks (B, D, H, W) | None -> pooled features (not projected):
    ``global`` (B, C'), ``local`` (B, R, C') (zeros where absent), ``present`` (B, R) bool, where
    C' = C * pool_width(pool).
    ``pool``: how tokens become one feature, in both pathways (:func:`pool_tokens`)."""
    early, grid = backbone.forward_early(x)  # (B, N, C)
    out = {"global": pool_tokens(backbone.forward_late(early), None, pool)}  # (B, C)
    B, _, C = early.shape
    local = early.new_zeros(B, n_regions, C * pool_width(pool))
    present = torch.zeros(B, n_regions, dtype=torch.bool, device=x.device)
    if masks is not None:
        keep, present = select_tokens(region_weights(masks, n_regions, grid), threshold)
        if present.any():
            packed, valid, b_idx, r_idx = pack(early, keep, present)
            late = backbone.forward_late(packed, valid)  # (P, L, C)
            pooled = pool_tokens(late, valid, pool)  # (P, C)
            local = local.index_put((b_idx, r_idx), pooled)
    out.update(local=local, present=present)
    return out
