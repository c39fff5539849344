"""The resampler against the references it claims to reproduce: torch's F.interpolate (CT-CLIP's
grid, the default) and MONAI's Spacingd + ResizeWithPadOrCropd (``grid="monai"``)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mv3dtk.data.preprocess import (orient, plan_axis, plans_for, preprocess_image, read_nifti, resample_linear,
                                    resample_nearest, voxel_data)
from mv3dtk.errors import DataError


@pytest.mark.parametrize("in_shape, out_size", [((30, 40, 50), (10, 40, 50)), ((30, 40, 50), (12, 60, 33)),
                                                ((9, 17, 23), (20, 5, 23))])
def test_ctclip_grid_is_f_interpolate(in_shape, out_size):
    a = np.random.default_rng(0).normal(size=in_shape).astype(np.float32)
    plans = tuple(plan_axis(n, 1.0, n / o, o) for n, o in zip(in_shape, out_size))
    t = torch.from_numpy(a)[None, None]
    ref = F.interpolate(t, size=out_size, mode="trilinear", align_corners=False)[0, 0].numpy()
    np.testing.assert_allclose(resample_linear(a, plans, 0.0), ref, atol=2e-5)
    ref_n = F.interpolate(t, size=out_size, mode="nearest-exact")[0, 0].numpy()
    np.testing.assert_array_equal(resample_nearest(a, plans), ref_n)
    i16 = (a * 100).astype(np.int16)  # integer input is converted after the first pass: same result
    ref16 = F.interpolate(torch.from_numpy(i16.astype(np.float32))[None, None], size=out_size, mode="trilinear",
                          align_corners=False)[0, 0].numpy()
    np.testing.assert_allclose(resample_linear(i16, plans, 0.0), ref16, atol=2e-3)


def test_centre_crop_and_pad_match_cropping_the_full_resample():
    a = np.random.default_rng(1).normal(size=(20, 30, 40)).astype(np.float32)
    full = F.interpolate(torch.from_numpy(a)[None, None], size=(40, 60, 80), mode="trilinear",
                         align_corners=False)[0, 0].numpy()
    plans = tuple(plan_axis(n, 1.0, 0.5, o) for n, o in zip(a.shape, (30, 60, 90)))  # crop, keep, pad
    out = resample_linear(a, plans, -7.0)
    np.testing.assert_allclose(out[:, :, 5:85], full[5:35, :, :], atol=1e-5)
    assert (out[:, :, :5] == -7).all() and (out[:, :, 85:] == -7).all()


@pytest.mark.slow
def test_monai_grid_reproduces_monai(tmp_path):
    from monai.transforms import (Compose, EnsureChannelFirstd, LoadImaged, Orientationd, ResizeWithPadOrCropd,
                                  ScaleIntensityRanged, Spacingd)

    rng = np.random.default_rng(2)
    arr = (rng.normal(size=(70, 60, 50)) * 300).astype(np.int16)  # (i, j, k)
    path = tmp_path / "v.nii.gz"
    nib.save(nib.Nifti1Image(arr, np.diag([-0.7, -0.8, 1.5, 1.0])), path)
    spacing, size = (3.0, 1.0, 1.0), (24, 40, 64)
    pipe = Compose([LoadImaged("x"), EnsureChannelFirstd("x"),
                    Orientationd("x", axcodes="SPL", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
                    Spacingd("x", pixdim=spacing, mode="bilinear"),
                    ScaleIntensityRanged("x", a_min=-1000, a_max=1000, b_min=-1, b_max=1, clip=True),
                    ResizeWithPadOrCropd("x", spatial_size=size, value=-1)])
    ref = np.asarray(pipe({"x": str(path)})["x"])[0]  # (D, H, W)
    img = read_nifti(path)
    o = orient(voxel_data(img), img.affine)
    ours = preprocess_image(o, spacing=o.spacing, target_spacing=spacing, target_size=size, hu_window=(-1000, 1000),
                            rescale=None, grid="monai").astype(np.float32)
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).mean() < 1e-3
    default = preprocess_image(o, spacing=o.spacing, target_spacing=spacing, target_size=size,
                               hu_window=(-1000, 1000), rescale=None).astype(np.float32)
    assert np.abs(default - ref).mean() > 10 * np.abs(ours - ref).mean()  # the grids really differ


def test_read_nifti_is_a_faithful_zero_copy_view(tmp_path):
    arr = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    nib.save(nib.Nifti1Image(arr, np.eye(4)), tmp_path / "a.nii.gz")
    img = read_nifti(tmp_path / "a.nii.gz")
    data = voxel_data(img)
    np.testing.assert_array_equal(data, np.asanyarray(nib.load(tmp_path / "a.nii.gz").dataobj))
    assert not data.flags.writeable  # a view on the decoded bytes
    scaled = nib.Nifti1Image(arr, np.eye(4))
    scaled.header.set_slope_inter(2.0, -5.0)
    nib.save(scaled, tmp_path / "s.nii")
    np.testing.assert_allclose(voxel_data(read_nifti(tmp_path / "s.nii")), arr * 2.0 - 5.0)  # scl_* applied
    raw = (tmp_path / "s.nii").read_bytes()
    (tmp_path / "t.nii").write_bytes(raw[:-10])
    with pytest.raises(DataError, match="truncated"):
        read_nifti(tmp_path / "t.nii")


def test_plans_for_rejects_unknown_grid():
    with pytest.raises(ValueError, match="grid"):
        plans_for((4, 4, 4), (1, 1, 1), (1, 1, 1), (4, 4, 4), grid="scipy")
