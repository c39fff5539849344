"""``mv3d prep`` as a library function: source volumes -> ``prep/`` (DESIGN §4).

Per volume, the worker writes ``prep/volumes/<id>.npy`` (float16 (D, H, W) in [-1, 1]),
``prep/masks/<id>.npy`` (uint16 bitmask, bit k = ``regions.json[k]``) and, last, the commit
marker ``prep/records/<id>.json`` (what was done, the source fingerprint and the options). A rerun
skips a volume whose record says ``ok`` for the same source fingerprint and options, so a run
killed at any moment resumes where it stopped; shards (``--shard I/N``) write disjoint records,
and a plain run afterwards finds them all done and writes the tables.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import traceback
import zlib
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import polars as pl

from ..log import progress
from ..errors import DataError, Mv3dError
from ..fs import atomic_path, atomic_write_json, atomic_write_text, clean_temporaries, read_json
from ..procs import die_with_parent
from . import ctrate
from .preprocess import orient, plans_for, preprocess_image, read_nifti, resample_nearest, voxel_data
from .sources import Source, SourceVolume, read_source
from .store import VolumeStore

RECORD_VERSION = 1
MAX_REGIONS = 16  # bits of the uint16 mask


@dataclass(frozen=True)
class PrepOptions:
    spacing: tuple[float, float, float] = (3.0, 1.0, 1.0)  # (D, H, W) = (z, y, x) mm
    size: tuple[int, int, int] = (96, 320, 320)  # (D, H, W) voxels
    hu: tuple[float, float] = (-1000.0, 1000.0)  # window mapped to [-1, 1]
    hu_source: str = "auto"  # auto | raw | fixed
    grid: str = "ctclip"  # sampling grid: ctclip (half-voxel, F.interpolate) | monai (Spacingd)
    regions: tuple[str, ...] = ctrate.REGIONS

    def key(self) -> str:
        blob = json.dumps([RECORD_VERSION, asdict(self)], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class PrepSummary:
    total: int = 0
    processed: int = 0
    skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (volume_id, error)
    seconds: float = 0.0
    shard: str | None = None

    def line(self) -> str:
        ok = self.total - len(self.failed)
        where = f" (shard {self.shard})" if self.shard else ""
        return (f"prep{where}: {ok} of {self.total} volumes ok ({self.processed} processed, {self.skipped} already "
                f"done), {len(self.failed)} failed, {self.seconds:.1f} s")


# -- one volume ------------------------------------------------------------------------------

def _file_fp(p: Path | None) -> list | None:
    if p is None or not p.exists():
        return None
    st = p.stat()
    return [str(p), st.st_size, st.st_mtime_ns]


def source_fingerprint(sv: SourceVolume) -> str:
    parts = [_file_fp(sv.image_path), sorted((r, [_file_fp(p) for p in ps]) for r, ps in sv.masks.items()),
             sv.spacing, sv.rescale, sv.hu_hint]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


def _decide_rescale(sv: SourceVolume, guess: ctrate.HuGuess, hu_source: str) -> tuple[float, float] | None:
    if hu_source == "fixed" or (hu_source == "auto" and sv.hu_hint == "fixed"):
        return None
    if hu_source == "raw":
        if sv.rescale is None:
            raise DataError(f"{sv.image_path}: --hu-source raw needs RescaleSlope/RescaleIntercept in the metadata CSV, "
                            f"and {sv.volume_id} has none; use --hu-source auto or fixed")
        return sv.rescale
    return (sv.rescale or (1.0, -1024.0)) if guess.raw else None


def _mask_bits(sv: SourceVolume, img, oriented, spacing, opts: PrepOptions) -> np.ndarray:
    plans = plans_for(oriented.array.shape, spacing, opts.spacing, opts.size, opts.grid)
    bits = np.zeros(opts.size, np.uint16)  # (D, H, W)
    for k, region in enumerate(opts.regions):
        for path in sv.masks.get(region, ()):  # several files (fine anatomies) are united
            bits |= _one_mask(sv, img, oriented, path, plans) << np.uint16(k)
    return bits


def _one_mask(sv: SourceVolume, img, oriented, path: Path, plans) -> np.ndarray:  # -> (D, H, W) uint16 {0, 1}
    m = read_nifti(path)
    if m.shape[:3] != img.shape[:3]:
        raise DataError(f"{path}: mask shape {m.shape} differs from its image's {img.shape} ({sv.image_path}); "
                        "masks must be on the image's voxel grid")
    if not np.allclose(m.affine, img.affine, atol=1e-3):
        raise DataError(f"{path}: mask affine differs from its image's ({sv.image_path}); masks must be on the "
                        "image's voxel grid")
    view = orient(voxel_data(m, path) > 0, img.affine).array  # (D, H, W) bool, same orientation
    return resample_nearest(view, plans).astype(np.uint16)


def process_volume(sv: SourceVolume, prep_dir: Path, opts: PrepOptions) -> dict[str, Any]:
    """Preprocess one volume and write its files; returns its record (never raises for data)."""
    rec: dict[str, Any] = {"version": RECORD_VERSION, "volume_id": sv.volume_id, "options": opts.key(),
                           "source_fingerprint": source_fingerprint(sv), "status": "failed", "error": sv.error}
    if sv.error:
        return rec
    try:
        rec.update(_process(sv, prep_dir, opts))
        rec.update(status="ok", error=None)
    except DataError as e:
        rec["error"] = str(e)
    except MemoryError:
        rec["error"] = f"{sv.image_path}: out of memory while preprocessing; use fewer --workers"
    except Exception as e:  # one bad volume must not sink a run of thousands
        rec["error"] = f"{sv.image_path}: unexpected {type(e).__name__}: {e}"
        rec["traceback"] = traceback.format_exc()
    return rec


def _process(sv: SourceVolume, prep_dir: Path, opts: PrepOptions) -> dict[str, Any]:
    img = read_nifti(sv.image_path)
    oriented = orient(voxel_data(img, sv.image_path), img.affine)  # (D, H, W) view
    spacing = sv.spacing or oriented.spacing
    guess = ctrate.guess_hu(oriented.array)  # read the voxels once: the decision and its warnings
    rescale = _decide_rescale(sv, guess, opts.hu_source)
    warnings = ctrate.hu_warnings(sv.image_path, guess, rescale, opts.hu_source, sv.hu_hint == "fixed",
                                  (getattr(img.dataobj, "slope", None), getattr(img.dataobj, "inter", None)))
    vol = preprocess_image(oriented, spacing=spacing, target_spacing=opts.spacing, target_size=opts.size,
                           hu_window=opts.hu, rescale=rescale, grid=opts.grid)  # (D, H, W) float16
    store = VolumeStore(prep_dir.parent)
    out = {"image_path": store.relpath(store.volume_path(sv.volume_id)), "mask_path": None,
           "hu_rescaled": rescale is not None, "warnings": warnings,
           "source_spacing": [float(s) for s in spacing], "source_shape": [int(n) for n in oriented.array.shape],
           "source_axcodes": "".join(oriented.source_axcodes)}
    masks = _mask_bits(sv, img, oriented, spacing, opts) if sv.masks else None
    store.write_volume(sv.volume_id, vol)
    if masks is not None:
        out["mask_path"] = store.relpath(store.write_mask(sv.volume_id, masks))
        out["mask_regions"] = sorted(sv.masks)
    return out


def _work(args: tuple[SourceVolume, Path, PrepOptions]) -> dict[str, Any]:
    sv, prep_dir, opts = args
    rec = process_volume(sv, prep_dir, opts)
    atomic_write_json(prep_dir / "records" / f"{sv.volume_id}.json", rec, fsync=False)  # the commit marker
    return rec


# -- selection, resume -----------------------------------------------------------------------

def parse_shard(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise Mv3dError(f"--shard {text!r}: expected I/N with 0 <= I < N, e.g. --shard 0/4 "
                        "(SLURM: --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT)") from None
    if not 0 <= i < n:
        raise Mv3dError(f"--shard {text!r}: I must be in 0..{n - 1} (shards are numbered from 0)")
    return i, n


def in_shard(volume_id: str, shard: tuple[int, int] | None) -> bool:
    return shard is None or zlib.crc32(volume_id.encode()) % shard[1] == shard[0]


def cached_record(sv: SourceVolume, prep_dir: Path, opts: PrepOptions, project_root: Path) -> dict | None:
    path = prep_dir / "records" / f"{sv.volume_id}.json"
    if not path.is_file():
        return None
    try:
        rec = read_json(path)
    except (OSError, ValueError):
        return None
    if (rec.get("status") != "ok" or rec.get("options") != opts.key()
            or rec.get("source_fingerprint") != source_fingerprint(sv)):
        return None
    files = [rec.get("image_path"), rec.get("mask_path")]
    return rec if all((project_root / f).is_file() for f in files if f) else None


# -- the run ---------------------------------------------------------------------------------

def _run_all(todo: list[SourceVolume], prep_dir: Path, opts: PrepOptions, workers: int,
             log: logging.Logger) -> Iterable[dict]:
    tick, stop = progress(len(todo), "prep", log)
    try:
        if workers <= 1 or len(todo) <= 1:
            for sv in todo:
                yield _work((sv, prep_dir, opts))
                tick()
            return
        env = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)  # inherited by the spawned workers
        try:
            # started from this (main) thread on submit; each worker dies with this process
            with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"),
                                     initializer=die_with_parent, initargs=(os.getpid(),)) as pool:
                futures = [pool.submit(_work, (sv, prep_dir, opts)) for sv in todo]
                for fut in as_completed(futures):
                    yield fut.result()
                    tick()
        finally:
            for k, v in old.items():
                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    finally:
        stop()


def run_prep(source: str | Path, project_root: Path, *, layout: str = "auto", splits=ctrate.SPLITS,
             options: PrepOptions = PrepOptions(), masks=None, region_texts=None, workers: int = 1,
             shard: tuple[int, int] | None = None, limit: int | None = None,
             log: logging.Logger | None = None) -> PrepSummary:
    log = log or logging.getLogger("mv3d.prep")
    t0 = time.time()
    src = read_source(source, layout=layout, splits=splits, masks=masks, region_texts=region_texts)
    for w in src.warnings:
        log.warning("%s", w)
    if len(options.regions) > MAX_REGIONS:
        raise Mv3dError(f"{len(options.regions)} regions do not fit the uint16 mask (at most {MAX_REGIONS})")
    volumes = src.volumes[:limit] if limit else src.volumes
    prep_dir = project_root / "prep"
    for sub in ("volumes", "masks", "records"):
        (prep_dir / sub).mkdir(parents=True, exist_ok=True)
        clean_temporaries(prep_dir / sub)
    mine = [sv for sv in volumes if in_shard(sv.volume_id, shard)]
    records = {sv.volume_id: cached_record(sv, prep_dir, options, project_root) for sv in mine}
    todo = [sv for sv in mine if records[sv.volume_id] is None]
    log.info("prep: %d volumes (%s layout), %d already done, %d to process with %d worker(s)",
             len(mine), src.layout, len(mine) - len(todo), len(todo), workers)
    for rec in _run_all(todo, prep_dir, options, workers, log):
        records[rec["volume_id"]] = rec
        if rec["status"] != "ok":
            log.warning("failed: %s", rec["error"])
        for w in rec.get("warnings", ()):
            log.warning("%s", w)
    summary = PrepSummary(total=len(mine), processed=len(todo), skipped=len(mine) - len(todo),
                          failed=[(v, r["error"]) for v, r in records.items() if r["status"] != "ok"],
                          shard=f"{shard[0]}/{shard[1]}" if shard else None)
    if shard is None:
        write_tables(src, volumes, records, prep_dir, options)
    summary.seconds = time.time() - t0
    return summary


# -- tables ----------------------------------------------------------------------------------

def _row(sv: SourceVolume, rec: dict) -> dict[str, Any]:
    report = " ".join(t for t in (sv.findings, sv.impressions) if t) or None
    warnings = list(sv.warnings) + ([] if sv.findings else [f"{sv.volume_id}: the findings section is empty"])
    warnings += (rec.get("warnings") or []) if rec["status"] == "ok" else []
    return {
        "volume_id": sv.volume_id, "split": sv.split, "patient_id": sv.patient_id, "scan_id": sv.scan_id,
        "image_path": rec.get("image_path") if rec["status"] == "ok" and not sv.error else None,
        "mask_path": rec.get("mask_path") if rec["status"] == "ok" and not sv.error else None,
        "findings": sv.findings, "impressions": sv.impressions, "report": report,
        **{c: sv.labels.get(c) for c in ctrate.ABNORMALITIES},
        "source_path": str(sv.image_path) if sv.image_path else None,
        "source_spacing": rec.get("source_spacing"), "source_shape": rec.get("source_shape"),
        "hu_rescaled": rec.get("hu_rescaled"), "status": "failed" if sv.error else rec["status"],
        "error": sv.error or rec.get("error"),
        "warning": "; ".join(warnings) or None,
    }


def table_schema() -> dict:
    s = {k: pl.String for k in ("volume_id", "split", "patient_id", "scan_id", "image_path", "mask_path",
                                "findings", "impressions", "report")}
    s.update({c: pl.Int8 for c in ctrate.ABNORMALITIES})
    s.update({"source_path": pl.String, "source_spacing": pl.List(pl.Float64), "source_shape": pl.List(pl.Int64),
              "hu_rescaled": pl.Boolean, "status": pl.String, "error": pl.String, "warning": pl.String})
    return s


def write_tables(src: Source, volumes: list[SourceVolume], records: dict[str, dict], prep_dir: Path,
                 options: PrepOptions) -> None:
    rows = [_row(sv, records[sv.volume_id]) for sv in volumes if sv.volume_id in records]
    df = pl.DataFrame(rows, schema=table_schema(), orient="row")
    with atomic_path(prep_dir / "volumes.parquet") as tmp:
        df.write_parquet(tmp)
    ids = {sv.volume_id for sv in volumes}
    texts = [t for t in src.region_texts if t.volume_id in ids]
    tdf = pl.DataFrame({"volume_id": [t.volume_id for t in texts], "region": [t.region for t in texts],
                        "anatomy": [t.anatomy for t in texts], "sentence": [t.sentence for t in texts]},
                       schema={"volume_id": pl.String, "region": pl.String, "anatomy": pl.String,
                               "sentence": pl.String})
    with atomic_path(prep_dir / "region_texts.parquet") as tmp:
        tdf.write_parquet(tmp)
    atomic_write_text(prep_dir / "regions.json", json.dumps(list(options.regions), indent=2) + "\n")
