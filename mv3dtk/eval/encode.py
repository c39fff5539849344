"""Encode a split once for every evaluation: volumes (global + local embeddings and which regions
the masks hold), the paper's organ crops for the global-only comparison, and texts.

Volumes are read through :class:`~mv3dtk.data.datasets.PretrainDataset` (the same rows, order and
tensors as pretraining: status ``ok``, the split, sorted ``volume_id``), so evaluation cannot drift
from what the model was trained on. Each volume goes through the image tower exactly once
(``encode_image`` with its masks gives the global and every local embedding in one pass).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import polars as pl
import torch
from torch.utils.data import DataLoader

from ..data.datasets import PretrainDataset, collate
from ..errors import DataError, Mv3dError
from ..log import get_logger, progress
from ..procs import WorkerInit

BACKGROUND = -1.0  # prep's volumes are windowed to [-1, 1]: -1 is the lowest HU of the window


@dataclass
class EncodedSplit:
    """One split, encoded. Row i of every array is ``volume_ids[i]`` (sorted)."""

    split: str
    volume_ids: list[str]
    regions: list[str]  # prep/regions.json order: column r of ``local`` / ``present``
    global_: np.ndarray  # (V, E) float32, L2-normalised
    local: np.ndarray  # (V, R, E) float32, L2-normalised where present, zeros elsewhere
    present: np.ndarray  # (V, R) bool: the volume's mask holds region r
    reports: list[str]  # (V,) the report ("" when none)
    region_texts: list[list[str]]  # (V, R) the region's sentences joined ("" when none)
    region_valid: np.ndarray  # (V, R) bool: the volume has a sentence for region r

    def region_index(self, name: str) -> int:
        try:
            return self.regions.index(name)
        except ValueError:
            raise DataError(f"region {name!r} is not in prep/regions.json ({', '.join(self.regions)}); "
                            "prep the data with RadGenome's region names") from None


def resolve_device(device: str | torch.device | None) -> torch.device:
    """None -> CUDA when available, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise Mv3dError(f"device {device!r}: {e}; use cpu, cuda or cuda:N") from None


def _autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" and precision == "bf16")


def open_split(project_root: str | Path, split: str):
    """The split's usable volumes (status ok), as pretraining reads them; an error if there are none."""
    ds = PretrainDataset(project_root, split=split, enriched=False)
    if not len(ds):
        raise DataError(f"split {split!r} of {Path(project_root) / 'prep/volumes.parquet'} has no volume with "
                        "status ok; pick another with --split (train, valid) or prep that split")
    return ds


def _batches(ds, batch_size: int, workers: int) -> Iterator[dict]:
    yield from DataLoader(ds, batch_size=batch_size, shuffle=False, collate_fn=collate, num_workers=workers,
                          worker_init_fn=WorkerInit())  # workers die with this process


def encode_split(model, project_root: str | Path, split: str = "valid", *, batch_size: int = 4, workers: int = 0,
                 device: str | torch.device | None = None, precision: str = "bf16", use_masks: bool = True,
                 log=None) -> EncodedSplit:
    """Encode every usable volume of ``split`` once (global + local embeddings), batched, with a
    progress bar. ``model`` (a MedVista3D) is moved to ``device`` and put in eval mode."""
    log = log or get_logger("eval")
    ds = open_split(project_root, split)
    dev = resolve_device(device)
    model.to(dev).eval()
    glob, loc, pres, reports, texts, valid = [], [], [], [], [], []
    tick, close = progress(len(ds), f"encode {split} volumes", log)
    try:
        with torch.inference_mode(), _autocast(dev, precision):
            for batch in _batches(ds, batch_size, workers):
                x = batch["image"].to(dev)  # (B, 1, D, H, W)
                masks = batch["mask"].to(dev) if use_masks else None  # (B, D, H, W)
                out = model.encode_image(x, masks)
                glob.append(out["global"].float().cpu().numpy())  # (B, E)
                loc.append(out["local"].float().cpu().numpy())  # (B, R, E)
                pres.append(out["present"].cpu().numpy())  # (B, R)
                reports += batch["report"]
                texts += batch["region_texts"]
                valid.append(batch["region_valid"].numpy())  # (B, R)
                for _ in batch["volume_id"]:
                    tick()
    finally:
        close()
    return EncodedSplit(split=split, volume_ids=list(ds.volume_ids), regions=list(ds.regions),
                        global_=np.concatenate(glob), local=np.concatenate(loc), present=np.concatenate(pres),
                        reports=reports, region_texts=texts, region_valid=np.concatenate(valid))


def crop_to_region(image: torch.Tensor, region: torch.Tensor, size: Sequence[int],
                   fill: float = BACKGROUND) -> torch.Tensor | None:
    """The paper's global-only comparison input: image (1, D, H, W) cropped to the bounding box of
    ``region`` (D, H, W) bool, centred in a ``size`` (D', H', W') canvas of ``fill`` (a box larger
    than ``size`` is centre-cropped to it). None when the region is empty."""
    idx = region.nonzero()  # (n, 3)
    if not len(idx):
        return None
    lo, hi = idx.min(0).values, idx.max(0).values + 1  # (3,), (3,)
    out = image.new_full((image.shape[0], *size), fill)  # (1, D', H', W')
    src, dst = [], []
    for a in range(3):
        n, want = int(hi[a] - lo[a]), int(size[a])
        take = min(n, want)
        s0 = int(lo[a]) + (n - take) // 2  # centre of the box when it is too long
        d0 = (want - take) // 2
        src.append(slice(s0, s0 + take))
        dst.append(slice(d0, d0 + take))
    out[(slice(None), *dst)] = image[(slice(None), *src)]
    return out


def encode_crops(model, project_root: str | Path, split: str, regions: Sequence[str], *, batch_size: int = 4,
                 workers: int = 0, device: str | torch.device | None = None, precision: str = "bf16",
                 log=None) -> tuple[list[str], np.ndarray, np.ndarray]:
    """For every volume and each region in ``regions``: crop to the region's mask, pad to the model
    input (:func:`crop_to_region`) and encode globally. Returns (volume_ids, emb (V, C, E) float32
    (zeros where the region is absent), present (V, C) bool)."""
    log = log or get_logger("eval")
    ds = open_split(project_root, split)
    bits = []
    for name in regions:
        if name not in ds.regions:
            raise DataError(f"region {name!r} is not in prep/regions.json ({', '.join(ds.regions)})")
        bits.append(ds.regions.index(name))
    size = tuple(int(v) for v in model.config["image"]["input_size"])
    dev = resolve_device(device)
    model.to(dev).eval()
    V, C = len(ds), len(regions)
    present = np.zeros((V, C), dtype=bool)
    emb: np.ndarray | None = None
    pending: list[tuple[int, int, torch.Tensor]] = []  # (volume row, crop column, (1, D', H', W'))

    def flush() -> None:
        nonlocal emb
        x = torch.stack([t for _, _, t in pending]).to(dev)  # (n, 1, D', H', W')
        g = model.encode_image(x, None)["global"].float().cpu().numpy()  # (n, E)
        if emb is None:
            emb = np.zeros((V, C, g.shape[1]), dtype=np.float32)
        for (i, c, _), e in zip(pending, g):
            emb[i, c] = e
        pending.clear()

    tick, close = progress(V, f"encode {split} organ crops", log)
    try:
        with torch.inference_mode(), _autocast(dev, precision):
            for batch in _batches(ds, 1, workers):
                i, image, mask = int(batch["index"][0]), batch["image"][0], batch["mask"][0]  # (1,D,H,W), (D,H,W)
                for c, bit in enumerate(bits):
                    crop = crop_to_region(image, ((mask >> bit) & 1).bool(), size)
                    if crop is not None:
                        present[i, c] = True
                        pending.append((i, c, crop))
                    if len(pending) >= batch_size:
                        flush()
                tick()
            if pending:
                flush()
    finally:
        close()
    if emb is None:
        raise DataError(f"no volume of split {split!r} has a mask for {', '.join(regions)}; the global-crop mode "
                        "needs RadGenome region masks (prep with masks), or use --mode global")
    return list(ds.volume_ids), emb, present


def encode_texts(model, texts: Sequence[str], *, batch_size: int = 64, device: str | torch.device | None = None,
                 precision: str = "bf16") -> np.ndarray:
    """Texts -> (N, E) float32 L2-normalised embeddings in input order; each distinct text is encoded
    once, in batches of similar length."""
    texts = [str(t) for t in texts]
    uniq = sorted(set(texts), key=lambda t: (-len(t), t))
    dev = resolve_device(device)
    model.to(dev).eval()
    chunks = []
    with torch.inference_mode(), _autocast(dev, precision):
        for s in range(0, len(uniq), max(1, batch_size)):
            chunks.append(model.encode_text(uniq[s:s + batch_size]).float().cpu().numpy())  # (b, E)
    if not chunks:
        return np.zeros((0, 0), dtype=np.float32)
    table = np.concatenate(chunks)  # (U, E)
    pos = {t: i for i, t in enumerate(uniq)}
    return table[[pos[t] for t in texts]]


def load_labels(project_root: str | Path, volume_ids: Sequence[str], labels: Sequence[str]) -> np.ndarray:
    """(V, L) float64 labels of ``volume_ids`` from prep/volumes.parquet (NaN where missing)."""
    path = Path(project_root) / "prep" / "volumes.parquet"
    cols = pl.read_parquet_schema(path)
    missing = [c for c in labels if c not in cols]
    if missing:
        raise DataError(f"{path} has no label column {missing[0]!r}; prep the data again with labels "
                        "(CT-RATE's multi_abnormality_labels CSVs)")
    df = pl.read_parquet(path, columns=["volume_id", *labels])
    order = pl.DataFrame({"volume_id": list(volume_ids)})
    df = order.join(df.unique("volume_id", keep="first"), on="volume_id", how="left", maintain_order="left")
    return df.select([pl.col(c).cast(pl.Float64) for c in labels]).to_numpy().astype(np.float64)
