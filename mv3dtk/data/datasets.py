"""The pretraining dataset over ``prep/`` (+ ``rewrite/``) and a deterministic, resumable,
rank-sharded loader (DESIGN §4, §6).

Arrays are read only through :class:`~mv3dtk.data.store.VolumeStore`; the texts come from the
parquet tables, read once with polars in ``__init__``:

* ``report``: ``prep/volumes.parquet`` ``report`` ("" when null);
* ``region_texts[r]``: the sentences of ``prep/region_texts.parquet`` for (volume, region r), joined
  with " " in file order ("" and ``region_valid[r] = False`` when there are none);
* ``enriched`` / ``enriched_regions[r]``: the same texts from ``rewrite/reports.parquet`` and
  ``rewrite/region_texts.parquet``. Each enriched text is matched to its source text (report: by
  volume and source; sentence: by volume, region, anatomy and source), so a stale or partial rewrite
  never pairs a report with another version's rewrite; a source text without a rewrite falls back to
  itself and is counted in ``enriched_missing``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import MissingInputError, Mv3dError
from ..procs import WorkerInit
from .store import VolumeStore


class PretrainDataset(Dataset):
    def __init__(self, project_root: str | Path, *, split: str = "train", enriched: bool = True):
        self.root = Path(project_root)
        self.split = split
        self.store = VolumeStore(self.root)
        self.regions: list[str] = self.store.regions()
        prep = self.root / "prep"
        for name in ("volumes.parquet", "region_texts.parquet"):
            if not (prep / name).is_file():
                raise MissingInputError(f"{prep / name} is missing; run: mv3d prep")

        vols = pl.read_parquet(prep / "volumes.parquet", columns=["volume_id", "split", "status", "report"])
        vols = vols.filter((pl.col("status") == "ok") & (pl.col("split") == split)).sort("volume_id")
        vols = vols.with_columns(pl.col("report").fill_null(""))
        self.volume_ids: list[str] = vols["volume_id"].to_list()
        self.reports: list[str] = vols["report"].to_list()

        # one row per region sentence of this split's volumes, in file order
        sents = (pl.read_parquet(prep / "region_texts.parquet", columns=["volume_id", "region", "anatomy", "sentence"])
                 .filter(pl.col("region").is_not_null() & pl.col("volume_id").is_in(self.volume_ids))
                 .with_columns(pl.col("sentence").fill_null("")))

        # the enriched version of each text, column "rw"; a text without one falls back to itself
        rw = self.root / "rewrite"
        reps_file, regs_file = rw / "reports.parquet", rw / "region_texts.parquet"
        self.enriched_available = enriched and reps_file.is_file() and regs_file.is_file()
        vols = _attach(vols, reps_file if enriched else None, {"source": "report"}, ["volume_id", "report"])
        sents = _attach(sents, regs_file if enriched else None, {"source": "sentence"},
                        ["volume_id", "region", "anatomy", "sentence"])
        self.enriched_missing = 0 if not enriched else int(
            vols.filter(pl.col("rw").is_null() & (pl.col("report") != "")).height
            + sents.filter(pl.col("rw").is_null() & (pl.col("sentence") != "")).height)
        self.enriched_reports: list[str] = vols.select(pl.coalesce("rw", "report"))["rw"].to_list()
        sents = sents.with_columns(pl.coalesce("rw", "sentence").alias("rw"))

        # (volume_id, region) -> joined sentences / joined enriched sentences
        grouped = sents.group_by("volume_id", "region", maintain_order=True).agg(
            pl.col("sentence").str.join(" "), pl.col("rw").str.join(" "))
        self._region_text: dict[tuple[str, str], tuple[str, str]] = {
            (v, r): (s, e) for v, r, s, e in grouped.iter_rows()}

    def __len__(self) -> int:
        return len(self.volume_ids)

    def __getitem__(self, i: int) -> dict:
        vid = self.volume_ids[i]
        vol = self.store.read_volume(vid)  # (D, H, W) float16, memory-mapped
        image = torch.from_numpy(np.asarray(vol, dtype=np.float32)).unsqueeze(0)  # (1, D, H, W), a copy
        m = self.store.read_mask(vid)  # (D, H, W) uint16 bitmask | None
        mask = torch.zeros(vol.shape, dtype=torch.int32) if m is None else torch.from_numpy(
            np.asarray(m, dtype=np.int32))  # (D, H, W)
        texts = [self._region_text.get((vid, r)) for r in self.regions]  # R x ((source, enriched) | None)
        return {
            "index": i, "volume_id": vid, "image": image, "mask": mask,
            "report": self.reports[i], "enriched": self.enriched_reports[i],
            "region_texts": [t[0] if t else "" for t in texts],
            "enriched_regions": [t[1] if t else "" for t in texts],
            "region_valid": torch.tensor([t is not None for t in texts], dtype=torch.bool),  # (R,)
        }


def _attach(df, path: Path | None, rename: dict[str, str], key: list[str]):
    """``df`` with a column ``rw``: the rewrite table's ``enriched`` for the row's key (null when the
    table is absent or has no such row). One rewrite row per key, so the join never multiplies rows."""
    if path is None or not path.is_file():
        return df.with_columns(pl.lit(None, dtype=pl.String).alias("rw"))
    back = {v: k for k, v in rename.items()}
    table = pl.read_parquet(path, columns=[back.get(c, c) for c in key] + ["enriched"])
    table = table.rename({**rename, "enriched": "rw"})
    table = table.unique(subset=key, keep="first", maintain_order=True)
    return df.join(table, on=key, how="left", nulls_equal=True, maintain_order="left")


def collate(batch: list[dict]) -> dict:
    """Tensors stacked along a new batch dim, strings as lists (B,), region lists as B lists of R."""
    out: dict = {}
    for k in batch[0]:
        vals = [b[k] for b in batch]
        if k == "index":
            out[k] = torch.tensor(vals, dtype=torch.long)  # (B,)
        elif isinstance(vals[0], torch.Tensor):
            out[k] = torch.stack(vals)  # image (B,1,D,H,W), mask (B,D,H,W), region_valid (B,R)
        else:
            out[k] = vals
    return out


def batches_per_epoch(n: int, batch_size: int, world_size: int = 1) -> int:
    """Local batches per rank per epoch (= global batches): the incomplete last global batch is dropped."""
    return n // (batch_size * world_size)


def epoch_batches(n: int, *, batch_size: int, seed: int, epoch: int, rank: int = 0,
                  world_size: int = 1) -> list[list[int]]:
    """This rank's local batches of one epoch: global batch k = perm[k*G:(k+1)*G] with
    G = batch_size * world_size, and rank r takes its r-th slice of batch_size indices."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    G = batch_size * world_size
    return [perm[k * G + rank * batch_size:k * G + (rank + 1) * batch_size]
            for k in range(batches_per_epoch(n, batch_size, world_size))]


def make_loader(dataset, *, batch_size: int, seed: int, epoch: int, skip_batches: int = 0, workers: int = 0,
                rank: int = 0, world_size: int = 1, pin_memory: bool = False,
                prefetch_factor: int | None = None) -> DataLoader:
    if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise Mv3dError(f"batch size {batch_size}, rank {rank} of world size {world_size}: the batch size and "
                        "world size must be at least 1 and the rank in 0..world_size-1")
    n, G = len(dataset), batch_size * world_size
    if n < G:
        split = getattr(dataset, "split", None)
        what = f"the {split!r} split has" if split else "the dataset has"
        raise Mv3dError(f"{what} {n} usable volumes, fewer than one global batch of {G} (batch size {batch_size} x "
                        f"{world_size} process(es)); lower --batch-size, use fewer processes, or prep more volumes")
    batches = epoch_batches(n, batch_size=batch_size, seed=seed, epoch=epoch, rank=rank, world_size=world_size)
    if not 0 <= skip_batches <= len(batches):
        raise Mv3dError(f"cannot skip {skip_batches} batches of an epoch that has {len(batches)}; the checkpoint was "
                        "probably written with another batch size, world size or dataset; resume with those")
    # workers die with this process (a SIGKILLed run must leave no orphan holding memory or its stage lock)
    extra = {"prefetch_factor": prefetch_factor, "persistent_workers": False,
             "worker_init_fn": WorkerInit()} if workers > 0 else {}
    # its own generator: creating an iterator must not draw from the global RNG (a resumed run creates
    # different loaders than an uninterrupted one, and would otherwise see other dropout masks)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return DataLoader(dataset, batch_sampler=batches[skip_batches:], collate_fn=collate, num_workers=workers,
                      pin_memory=pin_memory, generator=gen, **extra)
