"""Mask pooling of the dual pathway (``models.dual.region_weights``): one region at a time against every
bit expanded at once, on the CPU demo's batch (16 volumes of 32x64x64, 10 regions, an 8x8x8 token grid).
Prints the time of each and their ratio, side by side in one run; the results are checked to be equal.

Usage:  python benchmarks/region_weights.py [--batch 16] [--repeats 20]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from mv3dtk.models.dual import region_weights


def all_bits_at_once(masks: torch.Tensor, n_regions: int, grid) -> torch.Tensor:
    """The former implementation: a (B, R, D, H, W) float tensor of every bit, pooled in one call."""
    bits = torch.arange(n_regions, device=masks.device)
    binary = ((masks.long()[:, None] >> bits[None, :, None, None, None]) & 1).float()  # (B, R, D, H, W)
    return F.adaptive_avg_pool3d(binary, grid).flatten(2)  # (B, R, N)


def timed(fn, repeats: int) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t) / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=20)
    a = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    masks = torch.randint(0, 1 << 10, (a.batch, 32, 64, 64), generator=g).to(torch.int32)
    grid, R = (8, 8, 8), 10
    assert torch.equal(region_weights(masks, R, grid), all_bits_at_once(masks, R, grid))
    old = timed(lambda: all_bits_at_once(masks, R, grid), a.repeats)
    new = timed(lambda: region_weights(masks, R, grid), a.repeats)
    print(f"{'all bits at once':<20} {old * 1e3:8.1f} ms")
    print(f"{'one region at a time':<20} {new * 1e3:8.1f} ms")
    print(f"{'ratio':<20} {old / new:8.1f} x   (torch {torch.__version__}, {torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
