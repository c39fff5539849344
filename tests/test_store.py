"""The storage API every stage reads prep's arrays through."""

from __future__ import annotations

import numpy as np
import pytest

from mv3dtk.data.store import VolumeStore
from mv3dtk.errors import DataError


def test_round_trip_memory_mapped_and_read_only(tmp_path):
    store = VolumeStore(tmp_path)
    vol = np.linspace(-1, 1, 2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    mask = np.arange(24, dtype=np.uint16).reshape(2, 3, 4)
    assert store.relpath(store.write_volume("v1", vol)) == "prep/volumes/v1.npy"
    store.write_mask("v1", mask)
    got = store.read_volume("v1")
    assert got.dtype == np.float16 and isinstance(got, np.memmap) and not got.flags.writeable
    np.testing.assert_allclose(got, vol, atol=1e-3)
    np.testing.assert_array_equal(store.read_mask("v1"), mask)
    assert store.read_mask("v2") is None
    assert [p.name for p in (tmp_path / "prep" / "volumes").iterdir()] == ["v1.npy"]  # no temporaries


def test_missing_and_unsafe_files_are_clear_errors(tmp_path):
    store = VolumeStore(tmp_path)
    with pytest.raises(DataError, match="run: mv3d prep"):
        store.read_volume("nope")
    with pytest.raises(DataError, match="regions.json is missing"):
        store.regions()
    store.volume_path("evil").parent.mkdir(parents=True)
    np.save(store.volume_path("evil"), np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="not a readable array"):
        store.read_volume("evil", mmap=False)  # object arrays would need pickle: refused
