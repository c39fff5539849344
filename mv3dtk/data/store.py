"""The one reader/writer API for preprocessed arrays (DESIGN §4): every stage and dataset goes
through :class:`VolumeStore`, never ``np.load`` on paths, so the on-disk format (plain ``.npy``
today; e.g. packed-bit masks or zstd int16 volumes at CT-RATE scale) can change in one place.

Layout: ``prep/volumes/<volume_id>.npy`` float16 (D, H, W) in [-1, 1];
``prep/masks/<volume_id>.npy`` uint16 (D, H, W), bit k = ``prep/regions.json[k]``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..fs import atomic_path


class VolumeStore:
    def __init__(self, project_root: str | Path):
        self.root = Path(project_root) / "prep"

    def volume_path(self, volume_id: str) -> Path:
        return self.root / "volumes" / f"{volume_id}.npy"

    def mask_path(self, volume_id: str) -> Path:
        return self.root / "masks" / f"{volume_id}.npy"

    def relpath(self, path: Path) -> str:
        return path.relative_to(self.root.parent).as_posix()

    def write_volume(self, volume_id: str, volume: np.ndarray) -> Path:
        """volume (D, H, W) in [-1, 1] -> stored as float16, atomically."""
        return self._save(self.volume_path(volume_id), volume.astype(np.float16, copy=False))

    def write_mask(self, volume_id: str, mask: np.ndarray) -> Path:
        """mask (D, H, W) uint16 bitmask, atomically."""
        return self._save(self.mask_path(volume_id), mask.astype(np.uint16, copy=False))

    def read_volume(self, volume_id: str, mmap: bool = True) -> np.ndarray:
        """(D, H, W) float16, memory-mapped by default (read-only)."""
        return self._load(self.volume_path(volume_id), mmap, "run: mv3d prep")

    def read_mask(self, volume_id: str, mmap: bool = True) -> np.ndarray | None:
        """(D, H, W) uint16 bitmask, or ``None`` when the volume has no masks."""
        path = self.mask_path(volume_id)
        return self._load(path, mmap, "run: mv3d prep") if path.is_file() else None

    def regions(self) -> list[str]:
        path = self.root / "regions.json"
        if not path.is_file():
            raise DataError(f"{path} is missing; run: mv3d prep")
        return json.loads(path.read_text())

    @staticmethod
    def _save(path: Path, arr: np.ndarray) -> Path:
        with atomic_path(path) as tmp:
            np.save(tmp, arr)
        return path

    @staticmethod
    def _load(path: Path, mmap: bool, fix: str) -> np.ndarray:
        try:
            return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
        except FileNotFoundError:
            raise DataError(f"{path} is missing; {fix}") from None
        except ValueError as e:
            raise DataError(f"{path} is not a readable array ({e}); {fix} again") from e
