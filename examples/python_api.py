"""Using mv3d from Python: every stage is a plain library function behind its CLI command.

    python examples/python_api.py OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import polars as pl

from mv3dtk import Project
from mv3dtk.data.ingest import PrepOptions, run_prep
from mv3dtk.data.store import VolumeStore
from mv3dtk.data.synth import make_synthetic_dataset


def main(out: Path) -> None:
    data = make_synthetic_dataset(out / "ctrate", n_train=2, n_valid=1, shape=(32, 64, 64), seed=0).root
    project = Project.init(out / "project")
    summary = run_prep(data, project.root, options=PrepOptions(spacing=(3.0, 1.5, 1.5), size=(32, 32, 32)))
    print(summary.line())
    table = pl.read_parquet(project.root / "prep" / "volumes.parquet")
    first = table.row(0, named=True)
    volume = VolumeStore(project.root).read_volume(first["volume_id"])  # (D, H, W) float16 in [-1, 1], mmap
    print(first["volume_id"], volume.shape, volume.dtype, "findings:", (first["findings"] or "")[:60], "...")
    print(table.select("volume_id", "Cardiomegaly", "Lung nodule", "Pleural effusion"))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "api-demo"))
