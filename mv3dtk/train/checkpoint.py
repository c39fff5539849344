"""Training checkpoints: ``pretrain/<run>/checkpoints/step-<n>/``, written atomically (a full
temporary folder renamed into place), so a failed write (disk full, kill) never leaves a torn
checkpoint and the previous one stays valid.

Files: ``model.safetensors`` (every weight, text tower included), ``bank.safetensors`` (RSMB),
``optimizer.pt`` / ``rng.pt`` (tensors and numbers only: loaded with ``weights_only=True``, so a
checkpoint can never execute code) and ``trainer.json`` (step, epoch, position in the epoch,
scheduler state, config fingerprint).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..errors import Mv3dError
from ..fs import atomic_path

KEEP = 2  # checkpoints kept besides the newest


def config_fingerprint(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def save_checkpoint(run_dir: Path, *, model, optimizer, scheduler, bank, step: int, epoch: int, batch: int,
                    config: dict) -> Path:
    target = run_dir / "checkpoints" / f"step-{step:08d}"
    with atomic_path(target) as tmp:
        tmp.mkdir()
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"))
        save_file({k: v.cpu().contiguous() for k, v in bank.state_dict().items()}, str(tmp / "bank.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        (tmp / "trainer.json").write_text(json.dumps({
            "step": step, "epoch": epoch, "batch": batch, "scheduler": scheduler.state_dict(),
            "config": config_fingerprint(config)}, default=str))
    for old in sorted((run_dir / "checkpoints").glob("step-*"))[:-(KEEP + 1)]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = sorted(p for p in (run_dir / "checkpoints").glob("step-*") if (p / "trainer.json").is_file())
    return found[-1] if found else None


def load_checkpoint(path: Path, *, model, optimizer, scheduler, bank, config: dict) -> dict:
    meta = json.loads((path / "trainer.json").read_text())
    if meta["config"] != config_fingerprint(config):
        raise Mv3dError(f"cannot resume from {path}: it was trained with other settings (model, losses, batch size, "
                        "lr, ...); resume with the same options or start a new run with --run NAME")
    device = next(model.parameters()).device
    model.load_state_dict(load_file(str(path / "model.safetensors"), device=str(device)))
    bank.load_state_dict(load_file(str(path / "bank.safetensors"), device=str(device)))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=device, weights_only=True))
    scheduler.load_state_dict(meta["scheduler"])
    rng = torch.load(path / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return meta
