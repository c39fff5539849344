"""Supervised ceiling of an image tower on synthetic CT (issue #6): how much of each abnormality the
image tower alone can learn, before any text is involved. Each variant's image tower is trained from
scratch with a linear head and a per-label BCE loss on the train split, and the per-class AUROC on the
valid split is printed side by side. Zero-shot (which also needs the text side) cannot beat this.

    .venv/bin/python benchmarks/image_probe.py [--project DIR] [--epochs 20] [--variants ...]

A variant is NAME=CONFIG[;key=json;...] with dotted keys into the model config, for example
``linear-max=vit-tiny;image.stem=null;pool="max"`` (the linear patch projection with max pooling).
Without ``--project`` a 240 + 60 scan synthetic project is built on the demo grid (about 20 s), as
benchmarks/learnability.py builds it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from learnability import build_project  # the same synthetic project (benchmarks/ is on sys.path)
DEFAULT_VARIANTS = ['linear-max=vit-tiny;image.stem=null;pool="max"', "stem-meanmax=vit-tiny", "unimiss=unimiss-tiny"]


def load_split(project: Path, split: str):
    """-> images (N, 1, D, H, W) float32, labels (N, A) float32, for the ``ok`` volumes of ``split``."""
    import numpy as np
    import polars as pl
    import torch

    from mv3dtk.data.ctrate import ABNORMALITIES
    from mv3dtk.data.store import VolumeStore

    store = VolumeStore(project)
    vols = pl.read_parquet(project / "prep" / "volumes.parquet")
    vols = vols.filter((pl.col("status") == "ok") & (pl.col("split") == split)).sort("volume_id")
    x = torch.stack([torch.from_numpy(np.asarray(store.read_volume(v), np.float32)) for v in vols["volume_id"]])
    return x[:, None], torch.tensor(vols.select(ABNORMALITIES).to_numpy(), dtype=torch.float32)


def parse_variant(spec: str) -> tuple[str, dict]:
    from mv3dtk.models.factory import get_model_config

    name, _, rest = spec.partition("=")
    config, *sets = rest.split(";")
    cfg = get_model_config(config)
    for item in sets:
        key, _, value = item.partition("=")
        *path, last = key.split(".")
        node = cfg
        for k in path:
            node = node[k]
        node[last] = json.loads(value)
    return name, cfg


def probe(cfg: dict, train, valid, *, epochs: int, batch: int, lr: float, seed: int) -> tuple[dict, float]:
    import numpy as np
    import torch
    import torch.nn.functional as F
    from sklearn.metrics import roc_auc_score

    from mv3dtk.data.ctrate import ABNORMALITIES
    from mv3dtk.models.dual import encode_dual, pool_width
    from mv3dtk.models.factory import build_backbone

    torch.manual_seed(seed)
    pool = cfg.get("pool", "mean")
    tower = build_backbone(cfg["image"])
    head = torch.nn.Linear(tower.embed_dim * pool_width(pool), len(ABNORMALITIES))
    params = list(tower.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    (xt, yt), (xv, yv) = train, valid
    per_epoch = len(xt) // batch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=epochs * per_epoch, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(xt), generator=gen)
        for b in range(per_epoch):
            idx = order[b * batch:(b + 1) * batch]
            feats = encode_dual(tower, xt[idx], None, 0, pool=pool)["global"]  # (B, C')
            loss = F.binary_cross_entropy_with_logits(head(feats), yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    seconds = time.perf_counter() - t0
    tower.eval()
    with torch.no_grad():
        scores = torch.cat([head(encode_dual(tower, xv[i:i + 32], None, 0, pool=pool)["global"])
                            for i in range(0, len(xv), 32)])  # (N, A)
    aucs = {}
    for k, name in enumerate(ABNORMALITIES):
        y = yv[:, k].numpy()
        if 0 < y.sum() < len(y):
            aucs[name] = float(roc_auc_score(y, scores[:, k].numpy()))
    aucs["mean"] = float(np.mean(list(aucs.values())))
    return aucs, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--project", type=Path, help="a prepped project (default: build a synthetic one)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/mv3d-probe"))
    ap.add_argument("--scans", type=int, default=240)
    ap.add_argument("--valid", type=int, default=60)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS)
    a = ap.parse_args()

    import torch

    torch.set_num_threads(max(1, torch.get_num_threads()))
    project = a.project or build_project(a.out, a.scans, a.valid, a.seed)
    train, valid = load_split(project, "train"), load_split(project, "valid")
    print(f"{project}: {len(train[0])} train / {len(valid[0])} valid volumes, {a.epochs} epochs")
    results = {}
    for spec in a.variants:
        name, cfg = parse_variant(spec)
        results[name] = probe(cfg, train, valid, epochs=a.epochs, batch=a.batch_size, lr=a.lr, seed=a.seed)
    names = list(results)
    print(f"{'abnormality':<36}" + "".join(f"{n:>14}" for n in names))
    for label in results[names[0]][0]:
        print(f"{label:<36}" + "".join(f"{results[n][0].get(label, float('nan')):>14.3f}" for n in names))
    print(f"{'train seconds':<36}" + "".join(f"{results[n][1]:>14.0f}" for n in names))


if __name__ == "__main__":
    main()
