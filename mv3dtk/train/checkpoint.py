"""Training checkpoints: ``pretrain/<run>/checkpoints/step-<n>/``, written atomically (a full
temporary folder renamed into place), so a failed write (disk full, kill) never leaves a torn
checkpoint and the previous one stays valid.

Files: ``model.safetensors`` (every weight, text tower included), ``bank.safetensors`` (RSMB),
``optimizer.pt`` / ``rng.pt`` (tensors and numbers only: loaded with ``weights_only=True``, so a
checkpoint can never execute code) and ``trainer.json`` (step, epoch, position in the epoch,
scheduler state, config fingerprint). A file that holds anything else (pickled code or objects: not
written by mv3d) or is damaged is refused with an :class:`Mv3dError` before any state is touched.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
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
    try:
        meta = json.loads((path / "trainer.json").read_text())
    except (OSError, ValueError) as e:
        raise Mv3dError(refused(path, "trainer.json", f"is not the JSON mv3d writes ({e})")) from None
    if meta.get("config") != config_fingerprint(config):
        raise Mv3dError(f"cannot resume from {path}: it was trained with other settings (model, losses, batch size, "
                        "lr, ...); resume with the same options or start a new run with --run NAME")
    device = next(model.parameters()).device
    # every file is read (and checked) before any state changes: a refused checkpoint leaves the run untouched
    weights = read_safetensors(path, "model.safetensors", device)
    queue = read_safetensors(path, "bank.safetensors", device)
    opt_state, rng = read_pt(path, "optimizer.pt", device), read_pt(path, "rng.pt", "cpu")
    if not isinstance(rng, dict) or not isinstance(rng.get("torch"), torch.Tensor) or rng["torch"].dtype != torch.uint8:
        raise Mv3dError(refused(path, "rng.pt", "does not hold the random-number state mv3d writes"))
    model.load_state_dict(weights)
    bank.load_state_dict(queue)
    try:
        optimizer.load_state_dict(opt_state)
    except (ValueError, KeyError, TypeError) as e:
        raise Mv3dError(refused(path, "optimizer.pt", f"does not fit this run's optimizer ({e})")) from None
    scheduler.load_state_dict(meta["scheduler"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return meta


def refused(ckpt: Path, name: str, what: str) -> str:
    return (f"cannot resume from {ckpt}: {name} {what}. Delete {ckpt} to resume from the checkpoint before it, "
            "or start a fresh run with --run NEW_NAME")


def read_safetensors(ckpt: Path, name: str, device) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(ckpt / name), device=str(device))
    except (SafetensorError, OSError) as e:  # a pickle (or anything else) in its place: never unpickled
        raise Mv3dError(refused(ckpt, name, f"is not a safetensors file written by mv3d ({e}): it was replaced or "
                                             "damaged, and nothing in it was run")) from None


def read_pt(ckpt: Path, name: str, device) -> Any:
    """``torch.load(weights_only=True)``: tensors, numbers and containers only, never code."""
    try:
        return torch.load(ckpt / name, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        raise Mv3dError(refused(ckpt, name, (
            f"holds pickled Python code or objects ({_unpickling_reason(e)}), which mv3d never writes into a "
            "checkpoint: it was not written by mv3d (replaced or tampered with), and nothing in it was run"))) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise Mv3dError(refused(ckpt, name, f"is damaged or not a PyTorch file ({type(e).__name__}: "
                                             f"{str(e).splitlines()[0] if str(e) else ''})")) from None


def _unpickling_reason(e: Exception) -> str:
    """The line of a refused ``weights_only`` load that names what the pickle wanted (e.g. "unsupported
    GLOBAL posix.system ...")."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", ln).strip() for ln in str(e).splitlines()]
    why = [ln for ln in lines if "GLOBAL" in ln or "Unsupported" in ln] or [ln for ln in lines if ln]
    return (why[0] if why else type(e).__name__).split(" Please use")[0].rstrip(".")
