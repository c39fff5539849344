"""Image-tower pretraining throughput on a GPU: volumes/s, MFU and peak memory for ViT-B and
UniMiSS-Small at 96x320x320 (bf16 autocast, SDPA, fused AdamW, optional activation checkpointing
and torch.compile), with the dual pathway on 10 synthetic regions, and the largest batch that fits.
Prepared to finish in under 5 minutes on one H100/H200.

Usage:  python benchmarks/gpu_pretrain.py [--configs vit-b unimiss-small] [--checkpointing] [--compile]
                                          [--max-batch 64] [--steps 10] [--device cuda]
CPU smoke test:  python benchmarks/gpu_pretrain.py --device cpu --configs vit-tiny --steps 2 --max-batch 4
"""

from __future__ import annotations

import argparse
import time

import torch

from mv3dtk.models.dual import encode_dual
from mv3dtk.models.factory import build_backbone, get_model_config

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 TFLOP/s (SXM)


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def make_batch(batch: int, size, device):
    x = torch.randn(batch, 1, *size, device=device)
    masks = torch.zeros(batch, *size, dtype=torch.int32, device=device)
    D, H, W = size
    for k in range(10):  # 10 overlapping boxes of different sizes, like organ regions
        d0, h0, w0 = (k * D) // 20, (k * H) // 20, (k * W) // 20
        masks[:, d0:d0 + D // 2, h0:h0 + H // (2 + k % 3), w0:w0 + W // (2 + k % 4)] |= 1 << k
    return x, masks


def train_step(model, opt, x, masks, amp: bool):
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        out = encode_dual(model, x, masks, 10)
        loss = out["global"].float().square().mean() + out["local"].float().square().mean()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def flops_per_volume(model, size, device) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    x, masks = make_batch(1, size, device)
    with FlopCounterMode(display=False) as fc:
        out = encode_dual(model, x, masks, 10)
        (out["global"].sum() + out["local"].sum()).backward()
    model.zero_grad(set_to_none=True)
    return fc.get_total_flops()


def fits(model, opt, batch, size, device, amp) -> bool:
    try:
        x, masks = make_batch(batch, size, device)
        train_step(model, opt, x, masks, amp)
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()


def largest_batch(model, opt, size, device, amp, cap: int) -> int:
    b = 1
    while b * 2 <= cap and fits(model, opt, b * 2, size, device, amp):
        b *= 2
    return b if fits(model, opt, b, size, device, amp) else 0


def bench(name: str, args, device) -> None:
    cfg = get_model_config(name)["image"]
    cfg["grad_checkpointing"] = args.checkpointing
    model = build_backbone(cfg).to(device)
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)
    size = tuple(cfg["input_size"])
    per_vol = flops_per_volume(model, size, device)
    step_model = torch.compile(model) if args.compile else model
    amp = device.type == "cuda"
    batch = largest_batch(step_model, opt, size, device, amp, args.max_batch)
    if batch == 0:
        print(f"{name}: batch 1 does not fit")
        return
    x, masks = make_batch(batch, size, device)
    for _ in range(2):  # warm-up (and compilation)
        train_step(step_model, opt, x, masks, amp)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        train_step(step_model, opt, x, masks, amp)
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / args.steps
    vps = batch / dt
    peak = peak_flops(device)
    mfu = f"{100 * per_vol * vps / peak:.1f}%" if peak else "n/a"
    mem = f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device.type == "cuda" else "n/a"
    print(f"{name:<15} batch {batch:>3}  {dt * 1000:>8.1f} ms/step  {vps:>7.1f} volumes/s  "
          f"{per_vol / 1e12:.2f} TFLOP/volume  MFU {mfu}  peak {mem}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", default=["vit-b", "unimiss-small"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    print(f"bf16 autocast {'on' if device.type == 'cuda' else 'off (CPU)'}, checkpointing {args.checkpointing}, "
          f"compile {args.compile}")
    for name in args.configs:
        bench(name, args, device)


if __name__ == "__main__":
    main()
