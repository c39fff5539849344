"""PretrainDataset against the prep/rewrite files it reads, and make_loader's order contract."""

from __future__ import annotations

import shutil

import numpy as np
import polars as pl
import pytest
import torch

from mv3dtk.data.datasets import PretrainDataset, batches_per_epoch, collate, make_loader
from mv3dtk.data.ingest import PrepOptions, run_prep
from mv3dtk.data.store import VolumeStore
from mv3dtk.data.synth import make_synthetic_dataset
from mv3dtk.errors import Mv3dError
from mv3dtk.text.backends import RulesBackend
from mv3dtk.text.rewrite import run_rewrite


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("datasets")
    data = make_synthetic_dataset(root / "data", n_train=6, n_valid=2, shape=(16, 32, 32), seed=0).root
    project = root / "project"
    project.mkdir()
    run_prep(data, project, options=PrepOptions(spacing=(3.0, 1.5, 1.5), size=(16, 16, 16)))
    run_rewrite(project, RulesBackend())
    return project


@pytest.fixture
def project(built, tmp_path):
    """A private copy for tests that change files."""
    return shutil.copytree(built, tmp_path / "p")


def _expected_regions(project, vid: str, regions: list[str]) -> list[str]:
    """The region sentences of one volume, joined in file order, read row by row."""
    df = pl.read_parquet(project / "prep" / "region_texts.parquet")
    out = {r: [] for r in regions}
    for row in df.iter_rows(named=True):
        if row["volume_id"] == vid and row["region"] is not None:
            out[row["region"]].append(row["sentence"])
    return [" ".join(out[r]) for r in regions]


def _expected_enriched_regions(project, vid: str, regions: list[str]) -> list[str]:
    """Each prep sentence replaced by its rewrite (matched on region, anatomy and source), joined in prep order."""
    rw = pl.read_parquet(project / "rewrite" / "region_texts.parquet")
    lookup = {(r["volume_id"], r["region"], r["anatomy"], r["source"]): r["enriched"] for r in rw.iter_rows(named=True)}
    df = pl.read_parquet(project / "prep" / "region_texts.parquet")
    out = {r: [] for r in regions}
    for row in df.iter_rows(named=True):
        if row["volume_id"] == vid and row["region"] is not None:
            out[row["region"]].append(lookup[(vid, row["region"], row["anatomy"], row["sentence"])])
    return [" ".join(out[r]) for r in regions]


# -- items ---------------------------------------------------------------------------------

def test_items_match_the_files(built):
    ds = PretrainDataset(built)
    store = VolumeStore(built)
    vols = pl.read_parquet(built / "prep" / "volumes.parquet")
    reports = pl.read_parquet(built / "rewrite" / "reports.parquet")
    assert ds.regions == store.regions() and len(ds.regions) == 10
    assert ds.enriched_available and ds.enriched_missing == 0
    R = len(ds.regions)
    without_sentences = 0
    for i in range(len(ds)):
        item = ds[i]
        vid = item["volume_id"]
        assert item["index"] == i and vid == ds.volume_ids[i]
        assert item["image"].dtype == torch.float32 and item["image"].shape == (1, 16, 16, 16)
        assert np.array_equal(item["image"][0].numpy(), store.read_volume(vid).astype(np.float32))
        assert item["mask"].dtype == torch.int32 and item["mask"].shape == (16, 16, 16)
        assert np.array_equal(item["mask"].numpy(), store.read_mask(vid).astype(np.int32))
        assert item["mask"].any()
        assert item["report"] == vols.filter(pl.col("volume_id") == vid)["report"].item()
        assert item["enriched"] == reports.filter(pl.col("volume_id") == vid)["enriched"].item()
        assert item["enriched"] != item["report"]

        expected = _expected_regions(built, vid, ds.regions)
        assert item["region_texts"] == expected and len(item["region_texts"]) == R
        assert item["region_valid"].dtype == torch.bool
        assert item["region_valid"].tolist() == [bool(t) for t in expected]
        assert item["enriched_regions"] == _expected_enriched_regions(built, vid, ds.regions)
        assert [bool(t) for t in item["enriched_regions"]] == item["region_valid"].tolist()
        without_sentences += not item["region_valid"].any()  # reconstructions _2: RadGenome has no sentences
    assert without_sentences >= 1

    # a region with several sentences: joined with " " in file order
    df = pl.read_parquet(built / "prep" / "region_texts.parquet")
    vid, region = df.filter(pl.col("region").is_not_null()).group_by("volume_id", "region").len().filter(
        pl.col("len") >= 2).sort("volume_id", "region").row(0)[:2]
    sentences = df.filter((pl.col("volume_id") == vid) & (pl.col("region") == region))["sentence"].to_list()
    item = ds[ds.volume_ids.index(vid)]
    assert item["region_texts"][ds.regions.index(region)] == " ".join(sentences)


def test_enriched_falls_back_when_rewrite_is_missing(project):
    shutil.rmtree(project / "rewrite")
    ds = PretrainDataset(project)
    assert not ds.enriched_available and ds.enriched_missing > 0
    for i in range(len(ds)):
        item = ds[i]
        assert item["enriched"] == item["report"]
        assert item["enriched_regions"] == item["region_texts"]
    n_sentences = pl.read_parquet(project / "prep" / "region_texts.parquet").filter(
        pl.col("region").is_not_null() & pl.col("volume_id").is_in(ds.volume_ids)).height
    assert ds.enriched_missing == len(ds) + n_sentences


def test_enriched_falls_back_per_text_when_a_rewrite_row_is_missing(project, built):
    path = project / "rewrite" / "reports.parquet"
    df = pl.read_parquet(path)
    gone = "train_2_a_1"
    df.filter(pl.col("volume_id") != gone).write_parquet(path)
    ds = PretrainDataset(project)
    assert ds.enriched_available and ds.enriched_missing == 1
    item = ds[ds.volume_ids.index(gone)]
    assert item["enriched"] == item["report"]
    other = ds[ds.volume_ids.index("train_1_a_1")]
    assert other["enriched"] == df.filter(pl.col("volume_id") == "train_1_a_1")["enriched"].item()


def test_enriched_false_uses_the_source_texts(built):
    ds = PretrainDataset(built, enriched=False)
    assert not ds.enriched_available and ds.enriched_missing == 0
    item = ds[0]
    assert item["enriched"] == item["report"] and item["enriched_regions"] == item["region_texts"]


def test_a_volume_without_a_mask_gets_zeros(project):
    store = VolumeStore(project)
    ds = PretrainDataset(project)
    store.mask_path(ds.volume_ids[1]).unlink()
    item = ds[1]
    assert item["mask"].dtype == torch.int32 and item["mask"].shape == (16, 16, 16) and not item["mask"].any()


# -- filters -------------------------------------------------------------------------------

def test_split_and_status_filters(project):
    vols = pl.read_parquet(project / "prep" / "volumes.parquet")
    train = sorted(vols.filter(pl.col("split") == "train")["volume_id"])
    valid = sorted(vols.filter(pl.col("split") == "valid")["volume_id"])
    assert PretrainDataset(project).volume_ids == train
    ds_valid = PretrainDataset(project, split="valid")
    assert ds_valid.volume_ids == valid and all(v.startswith("valid_") for v in ds_valid.volume_ids)
    assert {ds_valid[i]["volume_id"] for i in range(len(ds_valid))} == set(valid)

    failed = train[2]
    vols.with_columns(pl.when(pl.col("volume_id") == failed).then(pl.lit("failed")).otherwise(pl.col("status"))
                      .alias("status")).sample(fraction=1.0, shuffle=True, seed=1).write_parquet(
        project / "prep" / "volumes.parquet")  # shuffled rows: the dataset sorts by volume_id
    ds = PretrainDataset(project)
    assert ds.volume_ids == [v for v in train if v != failed]
    assert [ds[i]["volume_id"] for i in range(len(ds))] == ds.volume_ids


# -- the loader ----------------------------------------------------------------------------

class _Indices(torch.utils.data.Dataset):
    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        return {"index": i, "volume_id": f"v{i}"}


def _order(loader) -> list[list[int]]:
    return [b["index"].tolist() for b in loader]


def test_loader_order_is_deterministic_and_drops_the_last_partial_batch():
    ds = _Indices(23)
    a = _order(make_loader(ds, batch_size=4, seed=7, epoch=0))
    assert a == _order(make_loader(ds, batch_size=4, seed=7, epoch=0))
    assert a != _order(make_loader(ds, batch_size=4, seed=7, epoch=1))
    assert a != _order(make_loader(ds, batch_size=4, seed=8, epoch=0))
    assert len(a) == batches_per_epoch(23, 4) == 5 and all(len(b) == 4 for b in a)
    flat = sum(a, [])
    assert len(set(flat)) == 20
    perm = torch.randperm(23, generator=torch.Generator().manual_seed(7 * 1_000_003 + 0)).tolist()
    assert flat == perm[:20]
    batch = next(iter(make_loader(ds, batch_size=4, seed=7, epoch=0)))
    assert batch["index"].dtype == torch.long and batch["volume_id"] == [f"v{i}" for i in a[0]]


def test_skip_batches_yields_the_tail_of_the_epoch():
    ds = _Indices(23)
    full = _order(make_loader(ds, batch_size=3, seed=1, epoch=2))
    for k in (0, 1, 4, len(full)):
        assert _order(make_loader(ds, batch_size=3, seed=1, epoch=2, skip_batches=k)) == full[k:]
    with pytest.raises(Mv3dError, match="skip"):
        make_loader(ds, batch_size=3, seed=1, epoch=2, skip_batches=len(full) + 1)


def test_ranks_split_each_global_batch_in_rank_order():
    ds = _Indices(29)
    single = _order(make_loader(ds, batch_size=6, seed=3, epoch=5))  # the global batches of 2 x 3
    r0 = _order(make_loader(ds, batch_size=3, seed=3, epoch=5, rank=0, world_size=2))
    r1 = _order(make_loader(ds, batch_size=3, seed=3, epoch=5, rank=1, world_size=2))
    assert len(r0) == len(r1) == len(single) == batches_per_epoch(29, 3, 2) == 4
    for k in range(len(single)):
        assert r0[k] + r1[k] == single[k]
    seen = sum(r0, []) + sum(r1, [])
    assert len(seen) == len(set(seen)) == 24
    r1_resumed = _order(make_loader(ds, batch_size=3, seed=3, epoch=5, rank=1, world_size=2, skip_batches=2))
    assert r1_resumed == r1[2:]


def test_workers_give_the_same_batches(built):
    ds = PretrainDataset(built)
    serial = list(make_loader(ds, batch_size=3, seed=0, epoch=0))
    parallel = list(make_loader(ds, batch_size=3, seed=0, epoch=0, workers=2, prefetch_factor=1))
    assert len(serial) == len(parallel) == batches_per_epoch(len(ds), 3) == 2
    for a, b in zip(serial, parallel):
        assert a.keys() == b.keys()
        for k in a:
            if isinstance(a[k], torch.Tensor):
                assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k])
            else:
                assert a[k] == b[k]
    b = serial[0]
    assert b["image"].shape == (3, 1, 16, 16, 16) and b["mask"].shape == (3, 16, 16, 16)
    assert b["region_valid"].shape == (3, len(ds.regions))
    assert len(b["region_texts"]) == 3 and all(len(r) == len(ds.regions) for r in b["region_texts"])
    assert b["index"].tolist() == [ds.volume_ids.index(v) for v in b["volume_id"]]


def test_collate_stacks_tensors_and_lists_strings(built):
    ds = PretrainDataset(built)
    b = collate([ds[0], ds[1]])
    assert b["index"].tolist() == [0, 1] and b["volume_id"] == ds.volume_ids[:2]
    assert torch.equal(b["image"][1], ds[1]["image"]) and b["enriched_regions"][0] == ds[0]["enriched_regions"]


def test_a_dataset_smaller_than_one_global_batch_is_a_clear_error(built):
    ds = PretrainDataset(built, split="valid")  # 3 volumes
    with pytest.raises(Mv3dError, match=r"'valid' split has 3 usable volumes.*global batch of 4.*--batch-size"):
        make_loader(ds, batch_size=2, seed=0, epoch=0, world_size=2)
    assert len(list(make_loader(ds, batch_size=3, seed=0, epoch=0))) == 1
