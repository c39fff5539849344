"""Learnability of the whole chain on synthetic data (issue #6, Deliver 6): synth -> prep ->
rewrite (rules) -> pretrain (tiny, CPU) -> zero-shot, once with all four loss terms and once without
the local terms (the paper's Table 4 logic), printing global and organ-level (local) zero-shot AUC
side by side, plus training throughput.

    .venv/bin/python benchmarks/learnability.py [--scans 960] [--valid 120] [--epochs 8] [--out /tmp/mv3d-learn]

Each run is the real CLI; the zero-shot numbers come from mv3dtk.eval.zeroshot.zero_shot (the CT-CLIP
protocol), on the synthetic valid split.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

EXE = str(Path(sys.executable).with_name("mv3d"))
GRID = ["--spacing", "6", "1.5", "1.5"]


def mv3d(*args: str) -> None:
    subprocess.run([EXE, *args], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def build_project(out: Path, scans: int, valid: int, seed: int) -> Path:
    """synth (demo grid) -> init -> prep -> rewrite (rules) under ``out``; -> the project root."""
    shutil.rmtree(out, ignore_errors=True)
    data, proj = out / "data", out / "project"
    mv3d("synth", str(data), "--n-train", str(scans), "--n-valid", str(valid), "--shape", "32", "64", "64", *GRID,
         "--seed", str(seed))
    mv3d("init", str(proj))
    mv3d("-P", str(proj), "prep", str(data), *GRID, "--size", "32", "64", "64", "--workers", "2")
    mv3d("-P", str(proj), "rewrite", "--backend", "rules")
    return proj


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scans", type=int, default=960, help="training scans (reconstructions make ~4/3 volumes each)")
    ap.add_argument("--valid", type=int, default=120, help="validation scans")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--global-text", default="statements", help="pretrain --global-text (the demo's: statements)")
    ap.add_argument("--model-config", default="vit-tiny", help="pretrain --model-config (name or JSON path)")
    ap.add_argument("--only", choices=("all four terms", "no local terms"), help="run one of the two settings only")
    ap.add_argument("--out", type=Path, default=Path("/tmp/mv3d-learn"))
    a = ap.parse_args()

    import torch

    from mv3dtk import load_model
    from mv3dtk.eval.zeroshot import zero_shot

    t0 = time.perf_counter()
    proj = build_project(a.out, a.scans, a.valid, a.seed)
    print(f"data: {a.scans} + {a.valid} scans, synth + prep + rewrite {time.perf_counter() - t0:.0f} s")

    common = ["--backbone", "vit", "--model-config", a.model_config, "--freeze-text", "--global-text", a.global_text,
              "--batch-size", "16", "--epochs",
              str(a.epochs), "--warmup-steps", "20", "--lr", "1e-3", "--workers", "1", "--seed", str(a.seed)]
    rows = []
    for name, losses in (("all four terms", "global,local,global_semantic,local_semantic"),
                         ("no local terms", "global,global_semantic")):
        if a.only not in (None, name):
            continue
        run = name.replace(" ", "-")
        t = time.perf_counter()
        mv3d("-P", str(proj), "pretrain", *common, "--losses", losses, "--run", run)
        train_s = time.perf_counter() - t
        metrics = [json.loads(x) for x in (proj / "pretrain" / run / "metrics.jsonl").read_text().splitlines()]
        vps = sorted(m["volumes_per_s"] for m in metrics)[len(metrics) // 2]
        torch.manual_seed(0)
        model = load_model(proj / "pretrain" / run / "model").eval()
        g = zero_shot(model, proj, mode="global")["macro"]["auroc"]
        loc = zero_shot(model, proj, mode="local")["macro"]["auroc"]
        rows.append((name, g, loc, len(metrics), train_s, vps))
    print(f"{'losses':<16} {'global AUC':>10} {'local AUC':>10} {'steps':>6} {'train s':>8} {'vol/s':>6}")
    for name, g, loc, steps, s, vps in rows:
        print(f"{name:<16} {g:>10.3f} {loc:>10.3f} {steps:>6d} {s:>8.0f} {vps:>6.1f}")


if __name__ == "__main__":
    main()
