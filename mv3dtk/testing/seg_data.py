"""Controls for segmentation learning (tests, ``benchmarks/segment.py``): a TotalSegmentator-layout dataset whose
masks are shuffled between cases, so that a network can learn only where structures tend to be, not what the
image shows."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np


def shuffle_totalseg_masks(source: str | Path, out: str | Path, seed: int = 0) -> Path:
    """Copy the TotalSegmentator-layout dataset ``source`` to ``out`` with every case's masks taken from another
    case (a derangement of the cases, seeded), stored on the receiving case's grid (its affine), so the export's
    geometry checks pass. The cases must share one voxel shape (``mv3d synth --dataset totalseg`` draws them so)."""
    source, out = Path(source), Path(out)
    cases = sorted(p.name for p in source.iterdir() if (p / "ct.nii.gz").is_file())
    if len(cases) < 2:
        raise ValueError(f"{source}: shuffling masks needs at least two cases, found {len(cases)}")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(cases))
    while any(perm[i] == i for i in range(len(cases))):
        perm = rng.permutation(len(cases))
    shutil.copytree(source, out)
    for i, case in enumerate(cases):
        donor = source / cases[perm[i]] / "segmentations"
        affine = nib.load(source / case / "ct.nii.gz").affine
        for mask in sorted((out / case / "segmentations").glob("*.nii.gz")):
            nib.save(nib.Nifti1Image(np.asarray(nib.load(donor / mask.name).dataobj), affine), mask)
    return out
