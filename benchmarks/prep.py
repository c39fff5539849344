"""Preprocessing of one CT volume: MONAI reference vs CT-CLIP-style loader vs mv3d, side by side.

Usage:  python benchmarks/prep.py [--reps N] [--keep] [--cpu K]

Input: one 512x512x300 int16 ``.nii.gz`` (spacing 0.7x0.7x1.0 mm, LPS-like affine) written by
``mv3d synth OUT --n-train 1 --n-valid 1 --shape 300 512 512 --spacing 1.0 0.7 0.7`` into
``benchmarks/.cache/`` (git-ignored; made once, about 40 s, then reused).
Target (the paper's): spacing 3x1x1 mm (D, H, W), size 96x320x320, HU [-1000, 1000] -> [-1, 1],
padding -1 (air). Methods:

  (a) monai   LoadImaged -> EnsureChannelFirstd -> Orientationd("SPL") -> Spacingd((3, 1, 1),
              bilinear) -> ScaleIntensityRanged -> ResizeWithPadOrCropd((96, 320, 320), value=-1)
  (b) ctclip  CT-CLIP's ``data_inference_nii.py``: nib.load().get_fdata() (float64, stored order),
              clip, F.interpolate(trilinear, align_corners=False, size=round(n*s/t)), /1000,
              centre crop / pad with -1
  (c) mv3d    ``mv3dtk.data.ingest._process`` minus writing: read_nifti -> voxel_data -> orient ->
              _decide_rescale -> preprocess_image (float16); no .npy is written in the timed part

Every repetition of every method is a fresh subprocess pinned to ONE core (sched_setaffinity,
OMP/MKL/OPENBLAS_NUM_THREADS=1, torch.set_num_threads(1)); only the work is timed, imports are
reported apart; peak RSS is that process's ru_maxrss (imports included). Each method's output of
the first repetition is saved to a temporary folder (kept with ``--keep``) and compared in the
parent after putting all three in mv3d's (D, H, W) = (S, P, L) orientation. Figures only: no
timing is asserted. Also prints a gzip-decoding comparison on the same file.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache"
SYNTH_ARGS = ["--n-train", "1", "--n-valid", "1", "--shape", "300", "512", "512", "--spacing", "1.0", "0.7", "0.7"]
VOLUME = "dataset/train/train_1/train_1_a/train_1_a_1.nii.gz"
VOLUME_ID = "train_1_a_1"

SPACING = (3.0, 1.0, 1.0)  # (D, H, W) mm
SIZE = (96, 320, 320)  # (D, H, W)
HU = (-1000.0, 1000.0)
PAD = -1.0
METHODS = ("monai", "ctclip", "mv3d")
LABEL = {"monai": "(a) MONAI", "ctclip": "(b) CT-CLIP", "mv3d": "(c) mv3d"}
ONE_THREAD = {k: "1" for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                               "NUMEXPR_NUM_THREADS", "VECLIB_MAXIMUM_THREADS")}
MARK = "@@RESULT@@ "


# -- the data ---------------------------------------------------------------------------------

def ensure_volume() -> Path:
    """The synthetic dataset in benchmarks/.cache/ (made once; a ``.done`` stamp marks it complete)."""
    CACHE.mkdir(exist_ok=True)
    (CACHE / ".gitignore").write_text("*\n")
    root, stamp = CACHE / "synth", CACHE / "synth.done"
    if stamp.is_file() and stamp.read_text() == json.dumps(SYNTH_ARGS) and (root / VOLUME).is_file():
        return root
    shutil.rmtree(root, ignore_errors=True)
    mv3d = Path(sys.executable).with_name("mv3d")
    print(f"making the test volume: {mv3d.name} synth {root} {' '.join(SYNTH_ARGS)} (about 40 s, once)", flush=True)
    p = subprocess.run([str(mv3d), "synth", str(root), *SYNTH_ARGS], capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"mv3d synth failed (exit {p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
    stamp.write_text(json.dumps(SYNTH_ARGS))
    return root


# -- the three methods (run inside the child) -------------------------------------------------
# prepare_X(root) does the imports and set-up (not timed) and returns (work, finish, laps): work()
# is the timed preprocessing, finish(result) -> (array, info) runs after the clock stopped.

class Laps:
    """Seconds per named stage of one work() call."""

    def __init__(self) -> None:
        self.stages: dict[str, float] = {}
        self.t = 0.0

    def start(self) -> None:
        self.t = time.perf_counter()

    def __call__(self, name: str) -> None:
        t = time.perf_counter()
        self.stages[name] = t - self.t
        self.t = t


def setup_torch():
    import torch

    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    return torch


def prepare_monai(root: Path):
    setup_torch()
    from monai.transforms import (EnsureChannelFirstd, LoadImaged, Orientationd, ResizeWithPadOrCropd,
                                  ScaleIntensityRanged, Spacingd, apply_transform)

    k, laps = "image", Laps()
    transforms = [
        LoadImaged(k, reader="NibabelReader"),
        EnsureChannelFirstd(k),
        # labels given explicitly = nibabel's RAS+ meaning of the codes (silences a FutureWarning)
        Orientationd(k, axcodes="SPL", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        Spacingd(k, pixdim=SPACING, mode="bilinear"),
        ScaleIntensityRanged(k, a_min=HU[0], a_max=HU[1], b_min=-1.0, b_max=1.0, clip=True),
        ResizeWithPadOrCropd(k, spatial_size=SIZE, mode="constant", value=PAD),  # **pad_kwargs -> torch pad value
    ]

    def work():  # what Compose(transforms)(data) does, one apply_transform per transform, timed apart
        laps.start()
        data = {k: str(root / VOLUME)}
        for t in transforms:
            data = apply_transform(t, data)
            laps(type(t).__name__)
        return data[k]

    def finish(out):
        pre_crop = [op.get("orig_size") for op in out.applied_operations if op.get("class") == "ResizeWithPadOrCrop"]
        return out.as_tensor().numpy()[0], {"pre_crop_shape": list(pre_crop[0]) if pre_crop else None}

    return work, finish, laps


def ctclip_crop_pad(tensor, target_shape, value):
    """CT-CLIP's centre crop (start (n-t)//2) then symmetric pad (before (t-n)//2), as written there."""
    import torch.nn.functional as F

    (h, w, d), (dh, dw, dd) = tensor.shape, target_shape
    h0, w0, d0 = max((h - dh) // 2, 0), max((w - dw) // 2, 0), max((d - dd) // 2, 0)
    tensor = tensor[h0:min(h0 + dh, h), w0:min(w0 + dw, w), d0:min(d0 + dd, d)]
    ph, pw, pd = dh - tensor.size(0), dw - tensor.size(1), dd - tensor.size(2)
    return F.pad(tensor, (pd // 2, pd - pd // 2, pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=value)


def prepare_ctclip(root: Path):
    torch = setup_torch()
    import nibabel as nib
    import numpy as np
    import torch.nn.functional as F

    laps = Laps()

    def work():
        laps.start()
        img = nib.load(str(root / VOLUME))
        data = img.get_fdata()  # float64, (i, j, k) stored order; synth's default is HU already
        laps("nib.load+get_fdata")
        sx, sy, sz = (float(z) for z in img.header.get_zooms()[:3])
        current, target = (sz, sx, sy), (SPACING[0], SPACING[2], SPACING[1])  # (z, x, y)
        data = np.clip(data, *HU).transpose(2, 0, 1)  # CT-CLIP clips in HU before resampling
        t = torch.tensor(data).unsqueeze(0).unsqueeze(0)
        laps("clip+tensor")
        size = [int(round(n * c / s)) for n, c, s in zip(data.shape, current, target)]
        data = F.interpolate(t, size=size, mode="trilinear", align_corners=False).numpy()[0, 0]
        laps("interpolate")
        data = (np.transpose(data, (1, 2, 0)) / HU[1]).astype(np.float32)  # (x, y, z), [-1, 1]
        laps("scale")
        out = ctclip_crop_pad(torch.tensor(data), (SIZE[2], SIZE[1], SIZE[0]), PAD)  # (x, y, z) = (i, j, k)
        out = out.permute(2, 0, 1).unsqueeze(0)  # (1, k, i, j) like CT-CLIP
        laps("crop/pad")
        return out, img.affine

    def finish(res):
        out, affine = res
        return out.numpy()[0], {"layout": "(k, i, j)", "affine": affine.tolist()}

    return work, finish, laps


def prepare_mv3d(root: Path):
    from dataclasses import replace

    from mv3dtk.data import ctrate, ingest
    from mv3dtk.data.preprocess import orient, preprocess_image, read_nifti, voxel_data
    from mv3dtk.data.sources import read_source

    opts = ingest.PrepOptions()
    if (opts.spacing, opts.size, opts.hu) != (SPACING, SIZE, HU):
        raise SystemExit(f"mv3d's PrepOptions defaults changed: {opts}; update this benchmark's target")
    sv = next(v for v in read_source(root / "dataset").volumes if v.volume_id == VOLUME_ID)
    sv = replace(sv, masks={})  # image only, like (a) and (b)
    laps, info = Laps(), {}

    def work():  # ingest._process minus _mask_bits and _save_npy
        laps.start()
        img = read_nifti(sv.image_path)
        laps("read_nifti")
        oriented = orient(voxel_data(img, sv.image_path), img.affine)
        laps("voxel_data+orient")
        spacing = sv.spacing or oriented.spacing
        rescale = ingest._decide_rescale(sv, ctrate.guess_hu(oriented.array), opts.hu_source)
        laps("decide_rescale")
        vol = preprocess_image(oriented, spacing=spacing, target_spacing=opts.spacing, target_size=opts.size,
                               hu_window=opts.hu, rescale=rescale)
        laps("preprocess_image")
        info.update(source_shape=list(oriented.array.shape), spacing=list(spacing), rescale=rescale)
        return vol

    return work, (lambda vol: (vol, info)), laps


PREPARE = {"monai": prepare_monai, "ctclip": prepare_ctclip, "mv3d": prepare_mv3d}


def child(method: str, root: Path, out: Path | None, cpu: int) -> None:
    """One repetition in this (fresh) process; prints one JSON line after MARK."""
    t0 = time.perf_counter()
    os.sched_setaffinity(0, {cpu})
    import resource

    import numpy as np

    work, finish, laps = PREPARE[method](root)
    t1 = time.perf_counter()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    res = work()
    t2 = time.perf_counter()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    arr, extra = finish(res)
    if out is not None:
        np.save(out, arr)
    print(MARK + json.dumps({"seconds": t2 - t1, "import_s": t1 - t0, "rss_before_gb": rss0 * 1024 / 1e9,
                             "peak_rss_gb": peak * 1024 / 1e9, "stages": laps.stages, "shape": list(arr.shape),
                             "dtype": str(arr.dtype), "extra": extra}))


# -- the parent -------------------------------------------------------------------------------

def run_child(method: str, root: Path, out: Path | None, cpu: int) -> dict:
    cmd = [sys.executable, __file__, "--child", method, "--root", str(root), "--cpu", str(cpu)]
    if out is not None:
        cmd += ["--out", str(out)]
    env = {**os.environ, **ONE_THREAD, "PYTHONWARNINGS": "ignore"}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith(MARK)]
    if p.returncode != 0 or not lines:
        raise SystemExit(f"{method} failed (exit {p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
    return json.loads(lines[-1][len(MARK):])


def bench(root: Path, tmp: Path, reps: int, cpu: int) -> dict[str, list[dict]]:
    """Repetitions interleaved (a, b, c, a, b, c, ...) so that machine noise hits all alike."""
    runs: dict[str, list[dict]] = {m: [] for m in METHODS}
    for r in range(reps):
        for m in METHODS:
            runs[m].append(run_child(m, root, tmp / f"{m}.npy" if r == 0 else None, cpu))
        print(f"  repetition {r + 1}/{reps}: " + ", ".join(f"{m} {runs[m][-1]['seconds']:.2f} s" for m in METHODS),
              flush=True)
    return runs


def oriented_outputs(tmp: Path, runs: dict[str, list[dict]]) -> dict:
    """Every output as float32 (D, H, W) in mv3d's (S, P, L) orientation."""
    import numpy as np

    from mv3dtk.data.preprocess import orient

    a = np.load(tmp / "monai.npy").astype(np.float32)  # already (S, P, L)
    b = np.load(tmp / "ctclip.npy")  # (k, i, j) stored order
    affine = np.asarray(runs["ctclip"][0]["extra"]["affine"])
    b = np.ascontiguousarray(orient(b.transpose(1, 2, 0), affine).array)  # the same reorientation mv3d applies
    c = np.load(tmp / "mv3d.npy").astype(np.float32)
    return {"monai": a, "ctclip": b, "mv3d": c}


def diff(x, y) -> tuple[float, float]:
    import numpy as np

    if x.shape != y.shape:
        return float("nan"), float("nan")
    d = np.abs(x.astype(np.float64) - y)
    return float(d.mean()), float(d.max())


def grid_offsets(shape, spacing) -> list[str]:
    """Per axis: MONAI's sample centre minus mv3d's default (ctclip) one, in mm, first/last kept sample."""
    from mv3dtk.data.preprocess import plan_axis

    lines = []
    for name, n, s, t, o in zip("DHW", shape, spacing, SPACING, SIZE):
        ours, theirs = plan_axis(n, s, t, o, "ctclip"), plan_axis(n, s, t, o, "monai")
        off = ((theirs.i0 + theirs.w) - (ours.i0 + ours.w)) * s
        lines.append(f"    {name}: MONAI {theirs.n_resampled} samples, mv3d/(b) {ours.n_resampled}; MONAI - mv3d "
                     f"sample centre {off[0]:+.2f} mm (first) .. {off[-1]:+.2f} mm (last)")
    return lines


def mv3d_monai_grid(root: Path):
    """(c) with ``grid="monai"`` (``mv3d prep --grid monai``), float32 (D, H, W); not timed."""
    import numpy as np

    from mv3dtk.data.preprocess import orient, preprocess_image, read_nifti, voxel_data

    img = read_nifti(root / VOLUME)
    o = orient(voxel_data(img), img.affine)
    vol = preprocess_image(o, spacing=o.spacing, target_spacing=SPACING, target_size=SIZE, hu_window=HU,
                           rescale=None, grid="monai")
    return vol.astype(np.float32)


def gzip_comparison(path: Path, reps: int = 3) -> list[tuple[str, float]]:
    """Decompression seconds (median of ``reps``) of the same .nii.gz, file bytes already in memory."""
    import gzip
    import io

    from isal import igzip, igzip_threaded

    raw = path.read_bytes()

    def threaded(n: int):
        return lambda: igzip_threaded.open(io.BytesIO(raw), "rb", threads=n).read()

    cases = [("gzip.decompress (stdlib zlib)", lambda: gzip.decompress(raw)),
             ("isal.igzip.decompress", lambda: igzip.decompress(raw)),
             ("isal.igzip_threaded.open(threads=1).read()", threaded(1)),
             ("isal.igzip_threaded.open(threads=2).read()", threaded(2))]
    rows = []
    for name, fn in cases:
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        rows.append((name, statistics.median(times)))
    return rows


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def median_of(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def print_timings(runs: dict[str, list[dict]], root: Path, cpu: int, reps: int) -> None:
    med = {m: median_of(runs[m], "seconds") for m in METHODS}
    print(f"\n== one volume {VOLUME_ID} (512x512x300 int16 .nii.gz, {(root / VOLUME).stat().st_size / 1e6:.0f} MB) "
          f"-> {SIZE} at {SPACING} mm; {reps} fresh processes per method, pinned to cpu {cpu}, 1 thread ==")
    print(f"{'method':<13}{'median s':>9}{'min s':>8}{'max s':>8}{'/ (c)':>7}{'set-up s':>10}"
          f"{'RSS after imports GB':>22}{'peak RSS GB':>13}  output")
    for m in METHODS:
        s, r0 = [r["seconds"] for r in runs[m]], runs[m][0]
        print(f"{LABEL[m]:<13}{med[m]:>9.3f}{min(s):>8.3f}{max(s):>8.3f}{med[m] / med['mv3d']:>7.2f}"
              f"{median_of(runs[m], 'import_s'):>10.2f}{max(r['rss_before_gb'] for r in runs[m]):>22.2f}"
              f"{max(r['peak_rss_gb'] for r in runs[m]):>13.2f}  {tuple(r0['shape'])} {r0['dtype']}")
    print("stages, median s:")
    for m in METHODS:
        names = runs[m][0]["stages"]
        print(f"  {LABEL[m]:<13}" + ", ".join(f"{k} {statistics.median(r['stages'][k] for r in runs[m]):.3f}"
                                            for k in names))
    print("(c) = ingest._process minus _mask_bits and np.save (nothing is written while timed); "
          "set-up = imports and building the pipeline (not timed); GB = 1e9 bytes; peak RSS includes the imports")


def print_diffs(outs: dict, runs: dict[str, list[dict]], root: Path) -> tuple[float, float]:
    a, b, c = outs["monai"], outs["ctclip"], outs["mv3d"]
    d_ca, d_ma = diff(c, a), diff(mv3d_monai_grid(root), a)
    print("\n== outputs, all as float32 (D, H, W) in mv3d's S,P,L orientation ==")
    print(f"|(c) - (a)|  mean {d_ca[0]:.5f}  max {d_ca[1]:.4f}   (mv3d's default grid, as is: no shift)")
    print(f"|(c) - (a)|  mean {d_ma[0]:.5f}  max {d_ma[1]:.4f}   (mv3d prep --grid monai: MONAI's sampling grid)")
    print("|(c) - (b)|  mean {:.5f}  max {:.4f}   ((b) is (k, i, j): transposed to (i, j, k), then mv3d's orient())"
          .format(*diff(c, b)))
    print("|(b) - (a)|  mean {:.5f}  max {:.4f}".format(*diff(b, a)))
    info = runs["mv3d"][0]["extra"]
    print("note on (a): MONAI's Spacingd keeps the first voxel centre, round((n-1)*s/t + 1) samples; mv3d's default "
          "(and CT-CLIP's) F.interpolate grid has half-voxel centres, round(n*s/t) samples. The grids are offset:")
    print("\n".join(grid_offsets(info["source_shape"], info["spacing"])))
    print("  On the same grid (--grid monai) mv3d reproduces MONAI; the default-grid difference is that sub-voxel "
          "shift on a noisy volume, not interpolation error. (a) runs Spacingd with its default dtype=float64.")
    print("note on (b): same grid as (c); (b) clips HU before interpolating (CT-CLIP's inference loader), (c) after "
          "(differs only next to voxels outside [-1000, 1000]), plus (c)'s float16 rounding (<= 4.9e-4).")
    return d_ma


def print_gzip(root: Path) -> None:
    print("\n== gzip decoding of the same file (bytes already in memory, median of 3, parent process, not pinned) ==")
    for name, t in gzip_comparison(root / VOLUME):
        print(f"  {name:<45}{t:>7.3f} s")
    print("  mv3d uses isal.igzip.decompress (mv3dtk.data.preprocess._decompress; stdlib gzip only if isal is missing)")


def print_targets(runs: dict[str, list[dict]], d_ca: tuple[float, float]) -> None:
    med = {m: median_of(runs[m], "seconds") for m in METHODS}
    peak = max(r["peak_rss_gb"] for r in runs["mv3d"])
    speed_a, speed_b = med["monai"] / med["mv3d"], med["ctclip"] / med["mv3d"]
    print("\n== targets (from the issue) ==")
    for name, ok, value in [("(c) >= 4x faster than (a)", speed_a >= 4, f"{speed_a:.2f}x"),
                            ("(c) >= 1.5x faster than (b)", speed_b >= 1.5, f"{speed_b:.2f}x"),
                            ("mean |(c) - (a)| <= 0.01 (same grid)", d_ca[0] <= 0.01, f"{d_ca[0]:.5f}"),
                            ("peak RSS of (c) <= 1.5 GB", peak <= 1.5, f"{peak:.2f} GB")]:
        print(f"  {verdict(ok)}  {name:<38} measured {value}")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5, help="fresh processes per method (default 5)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder with the three outputs (.npy)")
    ap.add_argument("--cpu", type=int, default=None, help="core to pin the children to (default: the last allowed)")
    ap.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    ap.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    cpu = max(os.sched_getaffinity(0)) if args.cpu is None else args.cpu
    if args.child:
        child(args.child, args.root, args.out, cpu)
        return
    root = ensure_volume()
    tmp = Path(tempfile.mkdtemp(prefix="mv3d-prep-bench-"))
    try:
        print(f"timing {', '.join(LABEL[m] for m in METHODS)} on {root / VOLUME}", flush=True)
        runs = bench(root, tmp, args.reps, cpu)
        print_timings(runs, root, cpu, args.reps)
        d_ca = print_diffs(oriented_outputs(tmp, runs), runs, root)
        print_gzip(root)
        print_targets(runs, d_ca)
    finally:
        if args.keep:
            print(f"\noutputs kept in {tmp} (monai.npy, ctclip.npy, mv3d.npy)")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
