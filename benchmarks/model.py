"""Model costs: parameters and FLOPs per volume (fwd+bwd) of the paper configs, the extra FLOPs of
the local pathway (10 regions of a synthetic chest CT) relative to global-only, and CPU step time /
peak memory of the tiny configs. Figures only.

Usage:  python benchmarks/model.py [--skip-paper]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from mv3dtk.models.dual import encode_dual
from mv3dtk.models.factory import build_backbone, get_model_config

PAPER = ("vit-b", "unimiss-small")
TINY = ("vit-tiny", "unimiss-tiny")


def flops(fn) -> float:
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def synthetic_masks(shape: tuple[int, int, int]) -> torch.Tensor:
    """The 10 RadGenome region bitmask of a synthetic chest CT, prepped to ``shape``."""
    from mv3dtk.data.ingest import PrepOptions, run_prep
    from mv3dtk.data.synth import make_synthetic_dataset

    with tempfile.TemporaryDirectory() as tmp:
        src = make_synthetic_dataset(Path(tmp) / "d", n_train=1, n_valid=1, shape=(96, 256, 256),
                                     spacing=(3.0, 1.25, 1.25), seed=0).root
        run_prep(src, Path(tmp), splits=("valid",), options=PrepOptions(size=shape), limit=1)
        mask = np.load(next((Path(tmp) / "prep" / "masks").glob("*.npy")))
    return torch.from_numpy(mask.astype(np.int32))[None]  # (1, D, H, W)


def paper_costs(name: str, masks: torch.Tensor) -> dict:
    cfg = get_model_config(name)["image"]
    model = build_backbone(cfg)
    params = sum(p.numel() for p in model.parameters())
    x = torch.randn(1, 1, *cfg["input_size"])

    def step(local: bool):
        out = encode_dual(model, x, masks if local else None, 10)
        loss = out["global"].sum() + (out["local"].sum() if local else 0)
        loss.backward()
        model.zero_grad(set_to_none=True)

    g = flops(lambda: step(False))
    d = flops(lambda: step(True))
    with torch.no_grad():
        present = int(encode_dual(model, x, masks, 10)["present"].sum())
    return {"params": params, "global": g, "dual": d, "present": present}


def tiny_step(name: str, batch: int = 4, reps: int = 10) -> dict:
    cfg = get_model_config(name)["image"]
    model = build_backbone(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 1, *cfg["input_size"])
    masks = torch.zeros(batch, *cfg["input_size"], dtype=torch.int32)
    masks[:, :, : cfg["input_size"][1] // 2] |= 1
    masks[:, : cfg["input_size"][0] // 2] |= 2
    times = []
    for i in range(reps + 2):
        t0 = time.perf_counter()
        out = encode_dual(model, x, masks, 10)
        (out["global"].square().mean() + out["local"].square().mean()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return {"params": sum(p.numel() for p in model.parameters()), "ms": 1000 * statistics.median(times)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-paper", action="store_true", help="only the tiny configs")
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if not args.skip_paper:
        masks = synthetic_masks((96, 320, 320))
        print("paper configs, one 96x320x320 volume, batch 1, fwd+bwd (FLOPs counted by torch's FlopCounterMode):")
        print(f"{'config':<15} {'params M':>9} {'global TFLOP':>13} {'dual TFLOP':>11} {'local extra':>12} "
              f"{'regions':>8}")
        for name in PAPER:
            c = paper_costs(name, masks)
            extra = c["dual"] / c["global"] - 1
            print(f"{name:<15} {c['params'] / 1e6:>9.1f} {c['global'] / 1e12:>13.3f} {c['dual'] / 1e12:>11.3f} "
                  f"{100 * extra:>11.1f}% {c['present']:>8}   target <= 15 %: {'PASS' if extra <= 0.15 else 'MISS'}")
    print("tiny configs, CPU, batch 4, AdamW step with 2 regions (median of 10):")
    for name in TINY:
        c = tiny_step(name)
        print(f"{name:<15} {c['params'] / 1e6:>9.3f} M params {c['ms']:>8.1f} ms/step")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB")


if __name__ == "__main__":
    main()
