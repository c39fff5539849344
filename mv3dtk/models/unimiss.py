"""UniMiSS-Small (Xie et al., ECCV 2022) as an mv3d ``Backbone``: the 3D path of the official ``MiT_encoder``.

Re-implemented from the facts in ``shared/reference/unimiss-nnunet.md`` section 1; module and checkpoint key
names were checked against YtongXie/UniMiSS-code (``UniMiSS/models/MiT_encoder.py``, ``Pacth_embeds.py``,
``main.py``). No official code is copied.

Architecture (``unimiss-small``)
--------------------------------
A 4-stage pyramid vision transformer with PVT-style spatial-reduction (SR) attention::

    stem     Conv3d(1->32, k7, stride (1,2,2), pad 3, no bias) + InstanceNorm3d(affine) + LeakyReLU(0.01)
    stage i  Conv3d(C_{i-1}->C_i, k3, stride 2, pad 1, no bias) + InstanceNorm3d(affine) + LeakyReLU(0.01)
             -> tokens, [class token], + learned absolute position table, blocks

    stage | dim | blocks | heads | SR | cumulative stride | grid at 96x320x320
    stem  |  32 |   -    |   -   | -  | (1,2,2)           | 96x160x160
      1   |  48 |   2    |   1   | 6  | (2,4,4)           | 48x80x80   (SR keys 8x13x13)
      2   | 128 |   3    |   2   | 4  | (4,8,8)           | 24x40x40   (SR keys 6x10x10)
      3   | 256 |   4    |   4   | 2  | (8,16,16)         | 12x20x20   (SR keys 6x10x10)
      4   | 512 |   3    |   8   | 1  | (16,32,32)        | 6x10x10 = 600 tokens

Blocks are pre-norm (``LayerNorm(eps=1e-6)``): ``x + Attn(LN(x))``, ``x + MLP(LN(x))`` with MLP = Linear, GELU,
Linear (hidden 4C); q/kv have biases. With SR > 1 the keys/values come from the patch tokens put back on the
(d, h, w) grid, through ``Conv3d(C, C, k=sr, stride=sr)`` (bias, no padding: border rows that do not fill a
window are dropped, as in the official code), the class token concatenated back unreduced, then
``LayerNorm(C)`` (eps 1e-5). Attention is ``F.scaled_dot_product_attention`` (scale head_dim**-0.5).

Class tokens: stage 1 has a learned class token; stages 2-3 project the previous stage's class token with a
Linear. The class token takes part in every attention of stages 1-3 (exactly as the official encoder).

**Deliberate differences from the official encoder** (the dual pathway needs them, see ``base.py``):

1. *Stage 4 has no class token.* ``forward_early`` must hand over exactly ``d*h*w`` grid tokens, and the
   late blocks must compute the same function whatever ``mask_pool_layer`` is (early+late == full). So the
   official ``cls_tokens4`` Linear and the class row of ``pos_embed3D4`` are not part of this model (an
   official checkpoint reports ``cls_tokens4.*`` as unexpected). Stage 4 is plain global MHSA over the 512-d
   grid tokens, which is what section 1.6 of the reference relies on for mask pooling.
2. *A final ``LayerNorm(512, eps=1e-6)``* (``norm``) closes ``forward_late`` as the backbone contract asks.
   The official ``forward3D`` has ``# x = self.norm(x)`` commented out and its encoder has no such parameter
   (24,644,064 encoder parameters = the reference's 24.64 M; one more LayerNorm would round to 24.65 M).
   Loading an official checkpoint therefore reports ``norm.weight``/``norm.bias`` as missing: they stay at
   their identity-affine initialisation.
3. *Position tables are resized on the 3D grid.* The official ``interpolate_pos_encoding3D`` reshapes the
   stored table with the *new* depth, ``reshape(1, d, sqrt(N/d), sqrt(N/d), C)``: it crashes whenever the
   depth differs from the build-time one and assumes H == W (the BCV fine-tuning code instead zooms the
   flattened 1D sequence, ignoring the 3D layout). Here the patch part of each table is reshaped to its
   build-time grid ``(d0, h0, w0)`` and resized trilinearly (``align_corners=False``) to the input's grid;
   the class-token position is kept apart, unresized. See :func:`resize_pos_embed`.
4. Grid sizes come from the real conv output (``ceil`` for odd sizes); the official code derives them with
   ``D // 2`` and breaks on odd sizes.

Parameter counts (``unimiss-small``)
------------------------------------
====================================  ===========  =====================================================
model                                 params        note
====================================  ===========  =====================================================
official 3D encoder, img 16x96x96     24,644,064   reference 1.3: 24.64 M (pos-embeds 318,896 = 0.32 M)
this model, input_size 16x96x96       24,512,992   = official - cls_tokens4 (131,584) - stage-4 class
                                                   position (512) + final norm (1,024)
official 3D encoder, img 96x320x320   45,522,912   reference: 45.52 M, pos-embeds 21,197,744 (21.20 M)
this model, input_size 96x320x320     45,391,840   same three differences
====================================  ===========  =====================================================

Per part (both): blocks 1,052,160 / 3,741,696 / 5,259,264 / 9,457,152; stem and patch embeddings
11,040 / 41,568 / 166,144 / 885,248 / 3,539,968.

Dual pathway split
------------------
``mask_pool_layer`` indexes the blocks of stage 4 (SR 1, global attention): ``-1`` (default) makes only the
last block late, ``0`` all of stage 4, ``k`` the blocks ``[k:]``. Earlier stages use spatial-reduction
attention (a strided conv over the full token grid) and cannot run on a token subset, so any index outside
stage 4 is a ``ValueError``.

Official checkpoints load through :mod:`mv3dtk.models.unimiss_weights` (the key mapping is documented there).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import Mv3dError
from .base import Backbone, init_transformer_weights, padding_attn_mask, resize_pos_embed
from .factory import get_model_config

__all__ = [
    "PRESETS",
    "UniMiSS",
    "build_unimiss",
    "resize_pos_embed",
]

Grid = tuple[int, int, int]

def _config_preset(name: str) -> dict[str, Any]:
    """The image section of ``models/configs/<name>.json`` as constructor kwargs (one source of truth)."""
    cfg = dict(get_model_config(name)["image"])
    cfg.pop("backbone")
    cfg.pop("mask_pool_layer", None)
    return cfg


PRESETS: dict[str, dict[str, Any]] = {
    # UniMiSS-Small exactly (reference 1.2), position tables at MedVista3D's 96x320x320 input.
    "unimiss-small": _config_preset("unimiss-small"),
    # A CPU-test/demo size (NOT the official "UniMiss_tiny", which is unimiss-tiny-paper below).
    "unimiss-tiny": _config_preset("unimiss-tiny"),
    # The official encoder_tiny: small's widths, one block per stage (for the "UniMiss_tiny" weights).
    "unimiss-tiny-paper": {**_config_preset("unimiss-small"), "depths": [1, 1, 1, 1]},
}

_ACCEPTED_UNUSED = frozenset({"name", "backbone"})


def _conv_out(n: int, k: int, s: int, p: int) -> int:
    return (n + 2 * p - k) // s + 1


def _stage_grids(input_size: Sequence[int], n_stages: int = 4) -> list[Grid]:
    """Grids of the stem and every stage for an input of (D, H, W) voxels (real conv arithmetic)."""
    d, h, w = (int(v) for v in input_size)
    grid: Grid = (_conv_out(d, 7, 1, 3), _conv_out(h, 7, 2, 3), _conv_out(w, 7, 2, 3))  # stem (1,2,2)
    grids = [grid]
    for _ in range(n_stages):
        grid = tuple(_conv_out(n, 3, 2, 1) for n in grid)  # type: ignore[assignment]
        grids.append(grid)
    return grids


class ConvNormAct(nn.Module):
    """Conv3d (no bias) + InstanceNorm3d (affine) + LeakyReLU(0.01): the official "Conv3dBlock" as
    configured for pre-training (``norm3D='IN3'``, ``act='LeakyReLU'``)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int | tuple[int, int, int], padding: int):
        super().__init__()
        self.conv = nn.Conv3d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.norm = nn.InstanceNorm3d(cout, affine=True)
        self.act = nn.LeakyReLU(0.01, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))  # (B, Cout, d, h, w)


class Attention(nn.Module):
    """Multi-head self-attention with optional spatial reduction of keys/values (PVT/MiT style).

    With ``sr > 1`` the input must be ``[class token, grid tokens in (d, h, w) row-major order]`` and ``grid``
    given. With ``sr == 1`` it is plain global attention over whatever tokens come in, optionally with a
    boolean ``attn_mask`` (B, 1, 1, L) (True = may attend).
    """

    def __init__(self, dim: int, heads: int, sr: int, qkv_bias: bool = True):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.sr_ratio = sr
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        if sr > 1:
            self.sr = nn.Conv3d(dim, dim, kernel_size=sr, stride=sr)
            self.sr_norm = nn.LayerNorm(dim)  # default eps 1e-5, as the official SR norm
        else:
            self.sr = None
            self.sr_norm = None

    def forward(self, x: torch.Tensor, grid: Grid | None = None,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, c = x.shape  # (B, N, C)
        hd = c // self.heads
        q = self.q(x).reshape(b, n, self.heads, hd).transpose(1, 2)  # (B, heads, N, hd)
        if self.sr is not None:
            if grid is None or attn_mask is not None:
                raise ValueError("spatial-reduction attention needs the full token grid and takes no mask")
            cls, rows = x[:, :1], x[:, 1:]  # (B, 1, C), (B, d*h*w, C)
            vol = rows.transpose(1, 2).reshape(b, c, *grid)  # (B, C, d, h, w)
            red = self.sr(vol).flatten(2).transpose(1, 2)  # (B, d'*h'*w', C)
            kv_in = self.sr_norm(torch.cat([cls, red], dim=1))  # (B, 1+d'*h'*w', C)
        else:
            kv_in = x  # (B, N, C)
        kv = self.kv(kv_in).reshape(b, kv_in.shape[1], 2, self.heads, hd).permute(2, 0, 3, 1, 4)  # (2, B, heads, M, hd)
        k, v = kv.unbind(0)  # (B, heads, M, hd) each
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, heads, N, hd)
        out = out.transpose(1, 2).reshape(b, n, c)  # (B, N, C)
        return self.proj(out)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))  # (B, N, C)


class DropPath(nn.Module):
    """Stochastic depth per sample (identity at eval or p == 0)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)  # (B, 1, 1)
        return x * mask / keep


class Block(nn.Module):
    """Pre-norm transformer block: ``x + Attn(LN(x))``, ``x + MLP(LN(x))``."""

    def __init__(self, dim: int, heads: int, sr: int, mlp_ratio: float, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads, sr)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, grid: Grid | None = None,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), grid, attn_mask))  # (B, N, C)
        return x + self.drop_path(self.mlp(self.norm2(x)))  # (B, N, C)


class Stage(nn.Module):
    """Patch embedding (stride-2 conv), class token (learned or projected), position table, blocks."""

    def __init__(self, cin: int, dim: int, depth: int, heads: int, sr: int, mlp_ratio: float,
                 grid: Grid, drop_paths: Sequence[float], cls: str | None, cls_in: int = 0):
        super().__init__()
        self.embed = ConvNormAct(cin, dim, 3, 2, 1)
        self.cls_token: nn.Parameter | None = None
        self.cls_proj: nn.Linear | None = None
        if cls == "learned":
            self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        elif cls == "proj":
            self.cls_proj = nn.Linear(cls_in, dim)
        self.num_prefix = 0 if cls is None else 1
        self.pos_grid: Grid = tuple(grid)  # type: ignore[assignment]
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_prefix + math.prod(grid), dim))
        self.sr_ratio = sr
        self.blocks = nn.ModuleList(Block(dim, heads, sr, mlp_ratio, dp) for dp in drop_paths)

    def pos_for(self, grid: Grid) -> torch.Tensor:
        """(1, P + d*h*w, C) position table for the grid of this input (resized when it differs)."""
        return resize_pos_embed(self.pos_embed, self.pos_grid, grid, num_prefix=self.num_prefix)


class UniMiSS(Backbone):
    """UniMiSS encoder (3D path) split into early/late parts for MedVista3D's dual pathway.

    ``forward_early`` = stem + stages 1-3 + stage-4 patch embedding + position table + stage-4 blocks before
    ``mask_pool_layer``; ``forward_late`` = stage-4 blocks from the split (padding-masked) + final norm.
    """

    def __init__(self, *, in_chans: int = 1, stem_dim: int = 32, dims: Sequence[int] = (48, 128, 256, 512),
                 depths: Sequence[int] = (2, 3, 4, 3), heads: Sequence[int] = (1, 2, 4, 8),
                 sr_ratios: Sequence[int] = (6, 4, 2, 1), mlp_ratio: float = 4.0,
                 input_size: Sequence[int] = (96, 320, 320), drop_path: float = 0.0, mask_pool_layer: int = -1,
                 grad_checkpointing: bool = False, **unused: Any):
        super().__init__()
        bad = sorted(set(unused) - _ACCEPTED_UNUSED)
        if bad:
            raise TypeError(f"UniMiSS() got unexpected keyword argument(s) {bad}; "
                            f"it accepts (and ignores) only {sorted(_ACCEPTED_UNUSED)} besides its own")
        dims, depths, heads, sr_ratios = (tuple(int(v) for v in t) for t in (dims, depths, heads, sr_ratios))
        if not (len(dims) == len(depths) == len(heads) == len(sr_ratios) == 4):
            raise ValueError("UniMiSS has exactly 4 stages: dims, depths, heads and sr_ratios need 4 entries each")
        if sr_ratios[3] != 1:
            raise ValueError("stage 4 must have sr_ratio 1 (plain global attention) for the dual pathway")
        if min(depths) < 1:
            raise ValueError(f"every stage needs at least one block, got depths={depths}")
        input_size = tuple(int(v) for v in input_size)
        if len(input_size) != 3:
            raise ValueError(f"input_size must be (D, H, W), got {input_size}")
        d4 = depths[3]
        if not -d4 <= int(mask_pool_layer) < d4:
            raise ValueError(
                f"mask_pool_layer={mask_pool_layer} is outside stage 4: it must index one of the {d4} stage-4 "
                f"blocks ({-d4}..{d4 - 1}; -1 = only the last block is late, 0 = all of stage 4). Stages 1-3 use "
                f"spatial-reduction attention (a strided conv over the full token grid) and cannot run on a "
                f"token subset, so the split cannot be placed there")
        self.in_chans = int(in_chans)
        self.dims, self.depths, self.heads, self.sr_ratios = dims, depths, heads, sr_ratios
        self.mlp_ratio = float(mlp_ratio)
        self.input_size: Grid = input_size  # type: ignore[assignment]
        self.mask_pool_layer = int(mask_pool_layer)
        self.split = self.mask_pool_layer % d4  # first late block of stage 4
        self.grad_checkpointing = bool(grad_checkpointing)
        self.embed_dim = dims[3]

        grids = _stage_grids(input_size)
        self._check_grids(grids, input_size)
        n_blocks = sum(depths)
        dpr = [float(drop_path) * i / max(n_blocks - 1, 1) for i in range(n_blocks)]  # linear stochastic depth
        self.stem = ConvNormAct(self.in_chans, int(stem_dim), 7, (1, 2, 2), 3)
        stages, cin, cur = [], int(stem_dim), 0
        for i in range(4):
            cls = "learned" if i == 0 else ("proj" if i < 3 else None)
            stages.append(Stage(cin, dims[i], depths[i], heads[i], sr_ratios[i], self.mlp_ratio, grids[i + 1],
                                dpr[cur:cur + depths[i]], cls, cls_in=dims[i - 1] if i else 0))
            cin, cur = dims[i], cur + depths[i]
        self.stages = nn.ModuleList(stages)
        self.norm = nn.LayerNorm(dims[3], eps=1e-6)  # mv3d's final norm (the official one is commented out)
        self.apply(self._init_weights)
        for st in self.stages:
            nn.init.trunc_normal_(st.pos_embed, std=0.02)
            if st.cls_token is not None:
                nn.init.trunc_normal_(st.cls_token, std=0.02)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Conv3d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        else:
            init_transformer_weights(m)

    # ------------------------------------------------------------------ grids
    def _check_grids(self, grids: list[Grid], input_size: Sequence[int]) -> None:
        for i, sr in enumerate(self.sr_ratios):
            g = grids[i + 1]
            if min(g) < max(sr, 1):
                raise ValueError(
                    f"input {tuple(input_size)} is too small for UniMiSS: stage {i + 1} has a {g} token grid, "
                    f"smaller than its spatial-reduction ratio {sr}; use an input of at least "
                    f"{sr * 2 ** (i + 1)} voxels in depth and {sr * 2 ** (i + 2)} in-plane")

    def stage_grids(self, input_shape: Sequence[int]) -> list[Grid]:
        """Grids of [stem, stage 1, ..., stage 4] for an input of (D, H, W) voxels."""
        return _stage_grids(input_shape)

    def token_grid(self, input_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        """Stage-4 grid: stride (16, 32, 32); 96x320x320 -> (6, 10, 10) (ceil for odd sizes)."""
        return _stage_grids(input_shape)[-1]

    # ------------------------------------------------------------------ blocks
    def _block(self, blk: Block, x: torch.Tensor, grid: Grid | None, mask: torch.Tensor | None) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(blk, x, grid, mask, use_reentrant=False)
        return blk(x, grid, mask)

    def _early(self, x: torch.Tensor, maps: list[torch.Tensor] | None = None
               ) -> tuple[torch.Tensor, Grid]:
        if x.ndim != 5 or x.shape[1] != self.in_chans:
            raise ValueError(f"UniMiSS expects (B, {self.in_chans}, D, H, W), got {tuple(x.shape)}")
        b = x.shape[0]
        self._check_grids(_stage_grids(x.shape[2:]), x.shape[2:])
        x = self.stem(x)  # (B, stem_dim, D, H/2, W/2)
        if maps is not None:
            maps.append(x)
        cls: torch.Tensor | None = None
        for i, st in enumerate(self.stages):
            vol = st.embed(x)  # (B, C, d, h, w)
            grid: Grid = tuple(vol.shape[2:])  # type: ignore[assignment]
            tokens = vol.flatten(2).transpose(1, 2)  # (B, N, C), N = d*h*w row-major
            if i == 3:
                break
            if st.cls_token is not None:
                cls = st.cls_token.expand(b, -1, -1)  # (B, 1, C)
            else:
                cls = st.cls_proj(cls)  # (B, 1, C)
            t = torch.cat([cls, tokens], dim=1) + st.pos_for(grid)  # (B, 1+N, C)
            for blk in st.blocks:
                t = self._block(blk, t, grid, None)  # (B, 1+N, C)
            cls = t[:, :1]  # (B, 1, C)
            x = t[:, 1:].transpose(1, 2).reshape(b, -1, *grid)  # (B, C, d, h, w)
            if maps is not None:
                maps.append(x)
        st = self.stages[3]
        tokens = tokens + st.pos_for(grid)  # (B, N, C); stage 4 has no class token
        for blk in st.blocks[: self.split]:
            tokens = self._block(blk, tokens, None, None)  # (B, N, C)
        return tokens, grid

    # ------------------------------------------------------------------ Backbone contract
    def forward_early(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """x (B, 1, D, H, W) -> stage-4 tokens (B, d*h*w, 512) before the split, and (d, h, w)."""
        return self._early(x)

    def forward_late(self, tokens: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, L, C) -> (B, L, C) through stage-4 blocks [split:] and the final norm.

        ``keep`` (B, L) bool: False tokens are never attended to. A row with no True at all is treated as
        all-True (its outputs are undefined for the caller anyway) so that no NaN can arise.
        """
        mask = None
        if keep is not None:
            keep = keep.to(torch.bool)
            keep = keep | ~keep.any(dim=1, keepdim=True)  # (B, L)
            mask = padding_attn_mask(keep)  # (B, 1, 1, L)
        for blk in self.stages[3].blocks[self.split:]:
            tokens = self._block(blk, tokens, None, mask)  # (B, L, C)
        return self.norm(tokens)  # (B, L, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Convenience: the global pathway, late(early(x)) -> (B, d*h*w, C)."""
        return self.forward_late(self.forward_early(x)[0])

    def forward_pyramid(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The public way to get skip features (a U-Net decoder, segmentation): five maps, finest first.

        x (B, 1, D, H, W) -> [stem (B, 32, D, H/2, W/2) at stride (1, 2, 2),
        stage 1 (B, 48, ...) at (2, 4, 4), stage 2 (B, 128, ...) at (4, 8, 8), stage 3 (B, 256, ...) at (8, 16, 16),
        stage 4 after all blocks and the final norm (B, 512, d, h, w) at (16, 32, 32)]; channels are
        UniMiSS-Small's (``unimiss-tiny`` is narrower). The last map is ``MedVista3D.image_tokens`` on its grid.
        Position tables are resized to any input (:meth:`Stage.pos_for`)."""
        maps: list[torch.Tensor] = []
        tokens, grid = self._early(x, maps)
        out = self.forward_late(tokens)  # (B, N, C)
        maps.append(out.transpose(1, 2).reshape(out.shape[0], -1, *grid))  # (B, C, d, h, w)
        return maps


def build_unimiss(preset: str = "unimiss-small", **overrides: Any) -> UniMiSS:
    """Build a preset (see ``PRESETS``), with keyword overrides (e.g. ``mask_pool_layer=0``)."""
    if preset not in PRESETS:
        raise Mv3dError(f"unknown UniMiSS preset {preset!r}; choose one of {sorted(PRESETS)}")
    return UniMiSS(**{**PRESETS[preset], **overrides})
