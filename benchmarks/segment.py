"""``mv3d segment-finetune`` on synthetic TotalSegmentator data (issue #19): a pretrained start beside a random
one and a shuffled-labels control, same budget, side by side, then ``segment-predict`` speed.

    .venv/bin/python benchmarks/segment.py [--model pretrain/<run>/model] [--cases 10] [--epochs 20]
        [--iterations 10] [--widths 8 16 16 32 32 32] [--out /tmp/mv3d-seg-bench]

* Data: ``mv3d synth --dataset totalseg`` (32x64x64 at 3 x 1.5 x 1.5 mm), the five lung lobes and the heart;
  nnU-Net's fold 0 (a fifth of the cases) is validated.
* Runs, each the real CLI in its own process with one torch thread, at once (ratios in one run: this machine is
  shared): ``pretrained`` (``--init pretrained`` from ``--model``, default a random ``unimiss-tiny`` saved here, so
  that without a real UniMiSS model "pretrained" is only a different random start), ``random`` (``--init random``)
  and ``shuffled`` (pretrained start, every case's masks drawn from another case: what position priors alone give).
* Printed: per-class and mean Dice of each run, the whole-lung Dice (the five lobes as one), the first and last
  epochs' training loss, seconds per training iteration, and segment-predict's seconds per volume (test-time
  mirroring on, 8 passes).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np

EXE = str(Path(sys.executable).with_name("mv3d"))
LOBES = ("lung_upper_lobe_left", "lung_lower_lobe_left", "lung_upper_lobe_right", "lung_middle_lobe_right",
         "lung_lower_lobe_right")
LABELS = (*LOBES, "heart")
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def finetune(project: Path, name: str, data: Path, model: Path, labels: Path, init: str, args) -> dict:
    cmd = [EXE, "-P", str(project), "segment-finetune", "--model", str(model), "--data", str(data), "--labels",
           str(labels), "--patch", "32", "64", "64", "--decoder-widths", *map(str, args.widths), "--epochs",
           str(args.epochs), "--iterations", str(args.iterations), "--val-iterations", "1", "--lr", str(args.lr),
           "--init", init, "--device", "cpu", "--run", name, "--json"]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=ONE_THREAD)
    wall = time.perf_counter() - t0
    metrics = json.loads(out.stdout.strip().splitlines()[-1])
    run = project / "segment" / name
    log = "\n".join(p.read_text() for p in sorted(run.glob("nnUNet_results/*/*/fold_0/training_log_*.txt")))
    losses = [float(x) for x in re.findall(r"train_loss (-?[\d.]+)", log)]
    times = [float(x) for x in re.findall(r"Epoch time: ([\d.]+) s", log)]
    return {"metrics": metrics, "losses": losses, "s_per_iter": sum(times) / max(1, len(times)) / args.iterations,
            "wall": wall, "run": run, "lung": whole_lung(run, metrics)}


def whole_lung(run: Path, metrics: dict) -> float:
    """Dice of the five lobes as one structure, over the validation cases."""
    raw = next((run / "nnUNet_raw").glob("Dataset*"))
    lobes = list(range(1, len(LOBES) + 1))
    values = []
    for case in metrics["per_case"]:
        pred = np.isin(np.asarray(nib.load(run / "validation" / f"{case}.nii.gz").dataobj), lobes)
        ref = np.isin(np.asarray(nib.load(raw / "labelsTr" / f"{case}.nii.gz").dataobj), lobes)
        values.append(2 * (pred & ref).sum() / max(1, pred.sum() + ref.sum()))
    return float(np.mean(values))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, help="A saved UniMiSS mv3d model [default: a random unimiss-tiny].")
    ap.add_argument("--cases", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--iterations", type=int, default=10)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--widths", type=int, nargs=6, default=[8, 16, 16, 32, 32, 32])
    ap.add_argument("--out", type=Path, default=Path("/tmp/mv3d-seg-bench"))
    args = ap.parse_args()

    from mv3dtk.data.synth_totalseg import make_synthetic_totalseg
    from mv3dtk.testing.seg_data import shuffle_totalseg_masks
    from mv3dtk.testing.tiny_models import make_tiny_bert, save_tiny_model

    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    data = args.out / "ts"
    make_synthetic_totalseg(data, args.cases)
    shuffled = shuffle_totalseg_masks(data, args.out / "ts-shuffled")
    labels = args.out / "labels.txt"
    labels.write_text("\n".join(LABELS) + "\n")
    model = args.model
    if model is None:
        text = make_tiny_bert(args.out / "bert", ["No effusion.", "The heart is enlarged."] * 8, vocab_size=100)
        model = save_tiny_model(args.out / "unimiss", "unimiss-tiny", text)
    project = args.out / "project"
    subprocess.run([EXE, "init", str(project)], check=True, capture_output=True)

    jobs = {"pretrained": (data, "pretrained"), "random": (data, "random"), "shuffled": (shuffled, "pretrained")}
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = {k: pool.submit(finetune, project, k, d, model, labels, init, args) for k, (d, init) in jobs.items()}
        runs = {k: f.result() for k, f in futures.items()}

    cases = runs["pretrained"]["metrics"]["n_cases"]
    print(f"segment-finetune, {args.cases} synthetic cases (fold 0: {cases} validated), "
          f"{args.epochs} x {args.iterations} iterations, lr {args.lr}, widths {args.widths}, model {model}")
    print(f"{'structure':<24}" + "".join(f"{k:>12}" for k in runs))
    for name in LABELS:
        print(f"{name:<24}" + "".join(f"{r['metrics']['per_class'][name]['dice'] or 0:>12.3f}" for r in runs.values()))
    print(f"{'mean DSC':<24}" + "".join(f"{r['metrics']['mean_dice']:>12.3f}" for r in runs.values()))
    print(f"{'whole lung':<24}" + "".join(f"{r['lung']:>12.3f}" for r in runs.values()))
    print(f"{'loss first -> last':<24}" + "".join(f"{r['losses'][0]:>6.2f}{r['losses'][-1]:>6.2f}"
                                                   for r in runs.values()))
    print(f"{'s / iteration':<24}" + "".join(f"{r['s_per_iter']:>12.2f}" for r in runs.values()))

    inputs = args.out / "predict-in"
    inputs.mkdir()
    for case in sorted(p.name for p in data.iterdir() if (p / "ct.nii.gz").is_file())[:4]:
        os.symlink(data / case / "ct.nii.gz", inputs / f"{case}.nii.gz")
    t0 = time.perf_counter()
    subprocess.run([EXE, "-P", str(project), "segment-predict", str(inputs), str(args.out / "predict-out"), "--run",
                    "pretrained", "--device", "cpu"], check=True, capture_output=True, env=ONE_THREAD)
    print(f"segment-predict: {(time.perf_counter() - t0) / 4:.2f} s per volume (4 volumes, one thread, mirroring on, "
          "process start included)")


if __name__ == "__main__":
    main()
