"""The frozen encoder's token cache: every volume is encoded once, and the LLM stages never read voxels.

``vqa/features/<image identity>[-pool<d>x<h>x<w>]/<volume_id>.safetensors`` holds ``tokens``, fp16
(N, C): the backbone's final tokens (:meth:`MedVista3D.image_tokens`, after every block and the final
norm, before any pooling), optionally average-pooled on their 3D grid to ``pool`` = (d, h, w) tokens.
Its metadata records the grid, the layer, the identity and the pooling. The folder is keyed by the
image tower's identity (config + every weight), so a retrained encoder never reads stale tokens.

By default every final token is kept, as LLaVA-1.5 feeds every patch token: ViT-B at 96x320x320 gives
2,400 x 768 (3.7 MB fp16 per volume; 2,400 positions of the LLM's context per image). ``--token-pool
3 10 10`` keeps 300 (0.46 MB, 8x fewer LLM positions).

The cache is sharded over ranks (volume i goes to rank i % world) and resumable: a volume whose file is
there and readable is skipped; files are written atomically. A volume that cannot be read is logged,
counted and skipped: one bad volume does not sink the run.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..data.store import VolumeStore
from ..errors import ConfigError, DataError, Mv3dError
from ..fs import atomic_path

LAYER = "final"  # the tokens after the last block and the final norm


def pool_name(pool: Sequence[int] | None) -> str:
    return "" if not pool else "-pool" + "x".join(str(int(p)) for p in pool)


def cache_dir(project_root: str | Path, identity: str, pool: Sequence[int] | None = None) -> Path:
    """``<project>/vqa/features/<identity>[-pool<d>x<h>x<w>]`` (':' of the identity becomes '-')."""
    return Path(project_root) / "vqa" / "features" / (identity.replace(":", "-") + pool_name(pool))


def pool_tokens(tokens: torch.Tensor, grid: Sequence[int], pool: Sequence[int] | None
                ) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """tokens (B, N, C) on ``grid`` (d, h, w) -> average-pooled (B, d'*h'*w', C) on ``pool``
    (adaptive average pooling: every token lands in exactly one cell); ``None`` keeps them all."""
    grid = tuple(int(g) for g in grid)
    if not pool:
        return tokens, grid  # type: ignore[return-value]
    pool = tuple(int(p) for p in pool)
    if len(pool) != 3 or any(p < 1 for p in pool):
        raise ConfigError(f"--token-pool {pool}: give three positive sizes D H W, e.g. --token-pool 3 10 10")
    if any(p > g for p, g in zip(pool, grid)):
        raise ConfigError(f"--token-pool {' '.join(map(str, pool))} is finer than the encoder's token grid "
                          f"{'x'.join(map(str, grid))}; pick sizes <= the grid")
    b, n, c = tokens.shape
    vol = tokens.transpose(1, 2).reshape(b, c, *grid)  # (B, C, d, h, w)
    vol = F.adaptive_avg_pool3d(vol.float(), pool).to(tokens.dtype)  # (B, C, d', h', w')
    return vol.reshape(b, c, math.prod(pool)).transpose(1, 2), pool  # (B, N', C)


@dataclass
class FeatureCache:
    """Read access to one cache folder."""

    directory: Path
    failed: dict[str, str] = field(default_factory=dict)  # volume_id -> why it has no tokens

    def path(self, volume_id: str) -> Path:
        return self.directory / f"{volume_id}.safetensors"

    def has(self, volume_id: str) -> bool:
        return _readable(self.path(volume_id))

    def read(self, volume_id: str) -> torch.Tensor:
        """-> (N, C) float32."""
        try:
            with safe_open(str(self.path(volume_id)), framework="pt") as f:
                return f.get_tensor("tokens").float()
        except (SafetensorError, OSError, KeyError) as e:
            raise DataError(f"{self.path(volume_id)}: no readable token file ({e}); delete it and rerun to encode "
                            "the volume again") from None

    def meta(self, volume_id: str) -> dict[str, str]:
        with safe_open(str(self.path(volume_id)), framework="pt") as f:
            return dict(f.metadata() or {})


def _readable(path: Path) -> bool:
    try:
        with safe_open(str(path), framework="pt") as f:
            return "tokens" in f.keys()
    except (SafetensorError, OSError):
        return False


def build_cache(model, project_root: str | Path, volume_ids: Sequence[str], *, pool: Sequence[int] | None = None,
                batch_size: int = 2, device: str | torch.device = "cpu", precision: str = "bf16", rank: int = 0,
                world_size: int = 1, log: logging.Logger | None = None) -> FeatureCache:
    """Encode this rank's share of ``volume_ids`` that the cache lacks; -> the cache (all ranks' files,
    once every rank is done: the caller synchronises). ``model`` is a :class:`MedVista3D` (frozen here)."""
    log = log or logging.getLogger("mv3d")
    device = torch.device(device)
    cache = FeatureCache(cache_dir(project_root, model.image_identity, pool))
    store = VolumeStore(project_root)
    todo = [v for i, v in enumerate(volume_ids) if i % world_size == rank and not cache.has(v)]
    if not todo:
        return cache
    log.info("vqa: encoding %d volumes into %s", len(todo), cache.directory)
    model = model.to(device).eval()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" and precision == "bf16")
    identity = model.image_identity
    for start in range(0, len(todo), batch_size):
        ids, vols = [], []
        for v in todo[start:start + batch_size]:
            try:
                vols.append(torch.from_numpy(store.read_volume(v, mmap=False).astype("float32")))
                ids.append(v)
            except Mv3dError as e:
                cache.failed[v] = str(e)
                log.warning("vqa: volume %s skipped: %s", v, e)
        if not ids:
            continue
        if len({tuple(x.shape) for x in vols}) > 1:
            raise DataError(f"volumes {ids} have different shapes; prep all volumes with one --size")
        x = torch.stack(vols)[:, None].to(device)  # (B, 1, D, H, W)
        with torch.no_grad(), autocast:
            tokens, grid = model.image_tokens(x)  # (B, N, C)
        tokens, grid = pool_tokens(tokens.float(), grid, pool)  # (B, N', C)
        meta = {"grid": "x".join(map(str, grid)), "layer": LAYER, "identity": identity,
                "pool": "x".join(map(str, pool)) if pool else "none"}
        for v, t in zip(ids, tokens.to(torch.float16).cpu()):
            with atomic_path(cache.path(v)) as tmp:
                save_file({"tokens": t.contiguous()}, str(tmp), metadata=meta)
    return cache
