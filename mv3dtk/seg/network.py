"""The segmentation network: the MedVista3D-UniMiSS encoder with an STU-Net-B style decoder (issue #19).

nnU-Net builds it from the plans' ``architecture`` (``build_network``); the trainer then copies the pretrained
encoder in (``load_encoder_weights``). Shapes are (B, C, D, H, W) with D the through-plane axis.

The bridge
----------
UniMiSS's ``forward_pyramid`` gives five maps; a new stride-1 residual stem adds the full-resolution skip.
Every level goes through a 1x1x1 conv adapter to STU-Net-B's width (level 0 needs none: the stem is built
at that width); the decoder then climbs from level 5 (the bottleneck) to level 0::

    lvl | from                         | step    | stride     | channels in    | adapter | width | grid at 128^3
    ----+------------------------------+---------+------------+----------------+---------+-------+---------------
     0  | new residual stem (scratch)  | (1,1,1) | (1,1,1)    | 1 (CT)         | none    |   32  | 128x128x128
     1  | UniMiSS stem                 | (1,2,2) | (1,2,2)    | 32 (tiny: 8)   | 1x1x1   |   64  | 128x64x64
     2  | UniMiSS stage 1              | (2,2,2) | (2,4,4)    | 48 (tiny: 16)  | 1x1x1   |  128  | 64x32x32
     3  | UniMiSS stage 2              | (2,2,2) | (4,8,8)    | 128 (tiny: 32) | 1x1x1   |  256  | 32x16x16
     4  | UniMiSS stage 3              | (2,2,2) | (8,16,16)  | 256 (tiny: 48) | 1x1x1   |  512  | 16x8x8
     5  | UniMiSS stage 4 + final norm | (2,2,2) | (16,32,32) | 512 (tiny: 64) | 1x1x1   |  512  | 8x4x4 (bottleneck)

Channels in are ``unimiss-small``'s (``unimiss-tiny``'s in parentheses); the network reads them off the encoder.

"step" is ``SEG_STRIDES`` = the plans' ``pool_op_kernel_sizes``, so nnU-Net's deep-supervision targets
(``1 / cumprod(strides)[:-1]``) have the shapes of the outputs. A patch must be divisible by the total stride
(16, 32, 32), with a bottleneck of more than one voxel (so at least 32x32x32, 16x64x32 or 16x32x64);
:func:`check_patch_size` names the nearest valid size otherwise, and ``forward`` calls it.

Decoder stage k (k = 4 .. 0), STU-Net-B style (all convs with bias, InstanceNorm affine, LeakyReLU 0.01)::

    x (B, W[k+1], level k+1) -> nearest upsampling by step[k+1] + 1x1x1 conv W[k+1]->W[k]
      -> concat the level-k skip (B, 2 W[k], level k)
      -> residual block: conv3 2W[k]->W[k], IN, LReLU, conv3, IN, + 1x1x1 shortcut, LReLU   (B, W[k], level k)
      -> 1x1x1 head W[k] -> classes                                                        (B, K, level k)

Under deep supervision (``network.decoder.deep_supervision``, which nnU-Net's ``set_deep_supervision_enabled``
sets) ``forward`` returns the 5 heads' logits, highest resolution first (strides 1, (1,2,2), (2,4,4), (4,8,8),
(8,16,16)); otherwise only the full-resolution logits. No softmax: nnU-Net applies it. The upsampling layer
runs its 1x1x1 conv before the nearest upsampling: the two commute (same function), at 1/prod(step) the cost.
The heads are named ``decoder.seg_layers`` as in nnU-Net's own networks, so its ``-pretrained_weights``
skips them.

Parameters with ``unimiss-small`` (position tables at 96x320x320) and 105 classes (TotalSegmentator): 75.39 M =
encoder 45.39 M + stem 0.03 M + adapters 0.44 M + decoder with heads 29.53 M, the decoder being STU-Net-B's
(29.53 M in ``shared/reference/unimiss-nnunet.md`` 2.2).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..models.unimiss import UniMiSS

__all__ = [
    "SEG_STRIDES",
    "STU_B_WIDTHS",
    "SegNetwork",
    "build_network",
    "check_patch_size",
    "encoder_config",
    "load_encoder_weights",
    "nearest_valid_patch",
    "total_stride",
]

# Per-level step (D, H, W), finest first: the plans' pool_op_kernel_sizes (see the module docstring).
SEG_STRIDES: list[list[int]] = [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]]
# STU-Net-B's width per level.
STU_B_WIDTHS: tuple[int, ...] = (32, 64, 128, 256, 512, 512)

NOT_UNIMISS = "segmentation needs a UniMiSS model: pretrain with --backbone unimiss"
# Encoder settings that change neither the weights nor the function of forward_pyramid.
_RUNTIME_KEYS = frozenset({"name", "mask_pool_layer", "grad_checkpointing", "drop_path"})

Triple = tuple[int, int, int]


# ---------------------------------------------------------------------------------------------- strides
def _triples(strides: Sequence[Sequence[int]]) -> list[Triple]:
    try:
        out = [tuple(int(v) for v in s) for s in strides]
    except (TypeError, ValueError):
        out = []
    if not out or any(len(s) != 3 for s in out):
        raise ConfigError(f"strides must be a list of (D, H, W) steps, not {strides!r}")
    return out  # type: ignore[return-value]


def total_stride(strides: Sequence[Sequence[int]] = SEG_STRIDES) -> Triple:
    """The product of the per-level steps: (16, 32, 32) for ``SEG_STRIDES``."""
    return tuple(math.prod(axis) for axis in zip(*_triples(strides)))  # type: ignore[return-value]


def nearest_valid_patch(patch_size: Sequence[int], strides: Sequence[Sequence[int]] = SEG_STRIDES) -> Triple:
    """Each axis rounded to the nearest multiple of the total stride (ties up, at least one multiple); a
    one-voxel bottleneck gets a second voxel along D (instance norm cannot normalise a single voxel)."""
    total = total_stride(strides)
    mult = [max(1, int(n / s + 0.5)) for n, s in zip(patch_size, total)]
    if math.prod(mult) == 1:
        mult[0] = 2
    return tuple(m * s for m, s in zip(mult, total))  # type: ignore[return-value]


def check_patch_size(patch_size: Sequence[int], strides: Sequence[Sequence[int]] = SEG_STRIDES) -> None:
    """ConfigError unless every axis of ``patch_size`` (D, H, W) is a multiple of the total stride and the
    bottleneck (patch / total stride) has more than one voxel (the encoder's last instance norm needs two
    while training). The message names the nearest valid patch."""
    patch = tuple(int(v) for v in patch_size)
    if len(patch) != 3:
        raise ConfigError(f"a patch has three sizes (D H W), not {len(patch)}: {' '.join(map(str, patch))}")
    total = total_stride(strides)
    if any(n % s for n, s in zip(patch, total)):
        why = f"is not divisible by the network's total stride {' '.join(map(str, total))}"
    elif math.prod(n // s for n, s in zip(patch, total)) < 2:
        why = (f"gives a 1x1x1 bottleneck at the total stride {' '.join(map(str, total))}, which instance norm "
               "cannot normalise while training")
    else:
        return
    raise ConfigError(f"patch {' '.join(map(str, patch))} (D H W) {why}; the nearest valid patch is "
                      f"{' '.join(map(str, nearest_valid_patch(patch, strides)))} (pass --patch with it)")


def _encoder_strides(encoder: UniMiSS) -> list[Triple]:
    """The steps the network really takes, read off the convs: level 0 (the new stem) is stride 1."""
    convs = [encoder.stem.conv] + [st.embed.conv for st in encoder.stages]
    return [(1, 1, 1)] + [tuple(int(v) for v in c.stride) for c in convs]  # type: ignore[misc]


# ---------------------------------------------------------------------------------------------- blocks
class ResBlock(nn.Module):
    """STU-Net's basic residual block (stride 1): conv3 -> IN -> LReLU -> conv3 -> IN, + shortcut, LReLU.
    The shortcut is a 1x1x1 conv when the channels change, else the identity."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = nn.Conv3d(cin, cout, 3, padding=1)
        self.norm1 = nn.InstanceNorm3d(cout, affine=True)
        self.conv2 = nn.Conv3d(cout, cout, 3, padding=1)
        self.norm2 = nn.InstanceNorm3d(cout, affine=True)
        self.shortcut = nn.Conv3d(cin, cout, 1) if cin != cout else nn.Identity()
        self.act = nn.LeakyReLU(0.01, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (B, cin, d, h, w)
        y = self.act(self.norm1(self.conv1(x)))  # (B, cout, d, h, w)
        y = self.norm2(self.conv2(y))  # (B, cout, d, h, w)
        return self.act(y + self.shortcut(x))  # (B, cout, d, h, w)


class UpConv(nn.Module):
    """Nearest upsampling by ``step`` and a 1x1x1 conv cin -> cout (STU-Net's ``Upsample_Layer_nearest``),
    computed conv first: a 1x1x1 conv commutes with nearest upsampling."""

    def __init__(self, cin: int, cout: int, step: Sequence[int]):
        super().__init__()
        self.step: Triple = tuple(int(v) for v in step)  # type: ignore[assignment]
        self.conv = nn.Conv3d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (B, cin, d, h, w)
        size = [n * s for n, s in zip(x.shape[2:], self.step)]
        return F.interpolate(self.conv(x), size=size, mode="nearest")  # (B, cout, d*sd, h*sh, w*sw)


class Decoder(nn.Module):
    """STU-Net-B's decoder over ``len(widths) - 1`` stages, with a head per stage and the deep-supervision flag.

    Module lists are indexed by the level a stage produces: ``up[k]`` brings level k+1 to level k,
    ``blocks[k]`` fuses it with skip k, ``seg_layers[k]`` is its head."""

    def __init__(self, widths: Sequence[int], steps: Sequence[Triple], num_classes: int, deep_supervision: bool):
        super().__init__()
        self.deep_supervision = bool(deep_supervision)
        n = len(widths) - 1
        self.up = nn.ModuleList(UpConv(widths[k + 1], widths[k], steps[k + 1]) for k in range(n))
        self.blocks = nn.ModuleList(ResBlock(2 * widths[k], widths[k]) for k in range(n))
        self.seg_layers = nn.ModuleList(nn.Conv3d(widths[k], num_classes, 1) for k in range(n))

    def forward(self, skips: Sequence[torch.Tensor]) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """skips[k] (B, W[k], level-k grid), k = 0..5 (skips[5] is the bottleneck) -> logits."""
        x = skips[-1]  # (B, W5, D/16, H/32, W/32)
        outs: list[torch.Tensor] = []  # coarsest first
        for k in reversed(range(len(self.blocks))):
            x = torch.cat([self.up[k](x), skips[k]], dim=1)  # (B, 2 W[k], level k)
            x = self.blocks[k](x)  # (B, W[k], level k)
            if self.deep_supervision or k == 0:
                outs.append(self.seg_layers[k](x))  # (B, K, level k)
        if not self.deep_supervision:
            return outs[-1]  # (B, K, D, H, W)
        return tuple(reversed(outs))  # highest resolution first: (B, K, D, H, W), (B, K, D, H/2, W/2), ...


# ---------------------------------------------------------------------------------------------- network
class SegNetwork(nn.Module):
    """UniMiSS encoder + stride-1 stem + 1x1x1 adapters + STU-Net-B decoder (see the module docstring).

    The constructor takes the plans' ``arch_kwargs`` as keywords (``encoder``, ``strides``, ``widths``,
    ``n_stages``) plus ``input_channels``, ``num_classes`` and ``deep_supervision``: the form nnU-Net's
    ``get_network_from_plans`` calls. Submodules: ``stem`` (new), ``encoder`` (a ``UniMiSS``: its state-dict
    keys are ``encoder.<UniMiSS key>``), ``adapters`` (``adapters[0]`` is the identity), ``decoder``."""

    def __init__(self, input_channels: int, num_classes: int, encoder: dict[str, Any],
                 strides: Sequence[Sequence[int]] = SEG_STRIDES, widths: Sequence[int] = STU_B_WIDTHS,
                 n_stages: int = 6, deep_supervision: bool = True):
        super().__init__()
        self.encoder = _build_encoder(encoder)
        self.encoder_cfg: dict[str, Any] = json.loads(json.dumps(encoder))  # as the plans carry it
        self.strides = _encoder_strides(self.encoder)  # 6 levels: what the network really does
        widths = tuple(int(w) for w in widths)
        _check_arch(self.strides, strides, widths, n_stages)
        if int(input_channels) != self.encoder.in_chans:
            raise ConfigError(
                f"the dataset has {input_channels} input channels but the UniMiSS encoder takes "
                f"{self.encoder.in_chans} (CT is one channel): export the dataset with one channel, "
                "channel_names {'0': ...} in dataset.json")
        self.widths = widths
        chans = [self.encoder.stem.conv.out_channels] + list(self.encoder.dims)  # levels 1-5, from the module
        self.stem = ResBlock(self.encoder.in_chans, widths[0])  # level 0: (B, W0, D, H, W)
        self.adapters = nn.ModuleList([nn.Identity()] + [nn.Conv3d(c, w, 1) for c, w in zip(chans, widths[1:])])
        self.decoder = Decoder(widths, self.strides, int(num_classes), deep_supervision)
        for part in (self.stem, self.adapters, self.decoder):
            part.apply(_init_he)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """x (B, 1, D, H, W), D H W multiples of (16, 32, 32) -> logits (B, K, D, H, W), or under deep
        supervision a tuple of 5, highest resolution first (strides 1, (1,2,2), (2,4,4), (4,8,8), (8,16,16))."""
        if x.ndim != 5:
            raise ValueError(f"SegNetwork expects (B, C, D, H, W), got {tuple(x.shape)}")
        check_patch_size(x.shape[2:], self.strides)
        maps = self.encoder.forward_pyramid(x)  # 5 maps: (B, C_l, level l grid), l = 1..5
        skips = [self.stem(x)] + maps  # level 0: (B, W0, D, H, W)
        skips = [a(m) for a, m in zip(self.adapters, skips)]  # (B, W[l], level l grid), l = 0..5
        return self.decoder(skips)


def _check_arch(real: list[Triple], strides: Sequence[Sequence[int]], widths: tuple[int, ...], n_stages: int) -> None:
    if _triples(strides) != real:
        raise ConfigError(
            f"the plans' strides {[list(s) for s in _triples(strides)]} are not what the network does "
            f"{[list(s) for s in real]}: nnU-Net's deep-supervision targets would not line up with the outputs; "
            "rewrite the plans variant (mv3dtk.seg.plans) so that pool_op_kernel_sizes are SEG_STRIDES")
    if int(n_stages) != len(real) or len(widths) != len(real) or min(widths) < 1:
        raise ConfigError(f"the network has {len(real)} levels: n_stages must be {len(real)} and widths "
                          f"{len(real)} positive numbers, got n_stages={n_stages}, widths={list(widths)}")


def _build_encoder(cfg: dict[str, Any]) -> UniMiSS:
    if not isinstance(cfg, dict):
        raise ConfigError(f"arch_kwargs 'encoder' must be the UniMiSS config dict (encoder_config(model_dir)), "
                          f"not {cfg!r}")
    if cfg.get("backbone") != "unimiss":
        raise ConfigError(f"{NOT_UNIMISS} (the encoder config has backbone {cfg.get('backbone')!r})")
    try:
        return UniMiSS(**cfg)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"the encoder config does not build a UniMiSS ({e}); rewrite it with "
                          "encoder_config(model_dir)") from e


def _init_he(m: nn.Module) -> None:
    """nnU-Net's He initialisation (LeakyReLU slope 0.01) for the parts trained from scratch."""
    if isinstance(m, nn.Conv3d):
        nn.init.kaiming_normal_(m.weight, a=0.01)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def build_network(arch_kwargs: dict[str, Any], num_input_channels: int, num_output_channels: int,
                  enable_deep_supervision: bool = True) -> SegNetwork:
    """The network the plans' ``arch_kwargs`` (``encoder``, ``strides``, ``widths``, ``n_stages``) describe; what
    the trainer's ``build_network_architecture`` calls. ConfigError if the strides are not the network's."""
    known = {"encoder", "strides", "widths", "n_stages"}
    unknown, missing = sorted(set(arch_kwargs) - known), sorted({"encoder", "strides"} - set(arch_kwargs))
    if unknown or missing:
        raise ConfigError(f"the plans' arch_kwargs for SegNetwork take {sorted(known)}: missing {missing}, "
                          f"unknown {unknown}; rewrite the plans variant (mv3dtk.seg.plans)")
    return SegNetwork(input_channels=num_input_channels, num_classes=num_output_channels,
                      deep_supervision=enable_deep_supervision, **arch_kwargs)


# ---------------------------------------------------------------------------------------------- weights
def encoder_config(model_dir: str | Path) -> dict[str, Any]:
    """The JSON-able config (``{"backbone": "unimiss", ...}``, the ``image`` section of the model's
    config.json) that rebuilds the model's UniMiSS. ConfigError for anything but a saved UniMiSS mv3d model."""
    path = Path(model_dir) / "config.json"
    try:
        config = json.loads(path.read_text())
    except OSError:
        raise ConfigError(f"{model_dir} is not a saved mv3d model (no config.json); point --model at "
                          "pretrain/<run>/model/") from None
    except ValueError as e:
        raise ConfigError(f"{path} is not valid JSON ({e}); point --model at pretrain/<run>/model/") from None
    image = config.get("image") if isinstance(config, dict) else None
    if not isinstance(image, dict) or image.get("backbone") != "unimiss":
        kind = image.get("backbone") if isinstance(image, dict) else None
        raise ConfigError(f"{NOT_UNIMISS} ({model_dir} has a {kind!r} image encoder)")
    return json.loads(json.dumps(image))  # a deep, JSON-clean copy


def load_encoder_weights(network: SegNetwork, model_dir: str | Path) -> int:
    """Copy ``load_model(model_dir).image``'s tensors into ``network.encoder`` (safetensors, no unpickling).

    Strict: every encoder tensor must match in name and shape, and the model's encoder config must be the
    one the network was built from; ConfigError otherwise, naming what differs. Returns the tensor count."""
    from ..models.medvista3d import load_model

    cfg = encoder_config(model_dir)  # a ViT model fails here, before any weight is read
    src = load_model(model_dir).image.state_dict()
    dst = network.encoder.state_dict()
    missing = sorted(set(dst) - set(src))
    unexpected = sorted(set(src) - set(dst))
    shapes = sorted(f"{k} {tuple(src[k].shape)} vs {tuple(dst[k].shape)}" for k in set(src) & set(dst)
                    if src[k].shape != dst[k].shape)
    if missing or unexpected or shapes:
        raise ConfigError(f"{model_dir}: its encoder weights do not fit the network (missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]}, shape mismatches {shapes[:5]}); plan again with this "
                          "--model, so that the plans' encoder config is its own")
    arch = lambda c: {k: v for k, v in c.items() if k not in _RUNTIME_KEYS}  # noqa: E731
    if arch(cfg) != arch(network.encoder_cfg):  # same shapes, another function (e.g. heads, sr_ratios)
        diff = sorted(k for k in arch(cfg).keys() | arch(network.encoder_cfg).keys()
                      if cfg.get(k) != network.encoder_cfg.get(k))
        raise ConfigError(f"{model_dir} has another UniMiSS than the network was built for (differs in {diff}): "
                          "plan again with this --model, so that the plans' encoder config is its own")
    network.encoder.load_state_dict(src, strict=True)
    return len(src)
