"""``mv3d pretrain`` glue: resolve the run, launch torchrun for ``--nproc N``, run the Trainer."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
from pathlib import Path

from ..errors import ConfigError, Mv3dError
from ..fs import atomic_write_json

PARENT_ENV = "MV3D_PARENT_RUN"  # set for the processes a launcher started: they leave the run record to it


def _model_config(model_config: str, text_encoder: str, mask_pool_layer, grad_checkpointing: bool,
                  init_from: Path | None = None) -> dict:
    from ..models.factory import get_model_config

    if init_from is not None:  # the saved model's own config, its text tower from its text/ folder
        cfg = get_model_config(str(init_from / "config.json"))
        cfg.pop("format_version", None)
        cfg["text"] = {**cfg["text"], "model": str(init_from / "text")}
    else:
        cfg = get_model_config(model_config)
    if text_encoder != "default":
        cfg["text"] = {**cfg["text"], "model": text_encoder}
    if mask_pool_layer is not None:
        cfg["image"]["mask_pool_layer"] = mask_pool_layer
    if grad_checkpointing:
        cfg["image"]["grad_checkpointing"] = True
    return cfg


def _run_name(run_name: str | None, backbone: str) -> str:
    if run_name:
        if "/" in run_name or run_name.startswith("."):
            raise ConfigError(f"--run {run_name!r}: use a plain folder name")
        return run_name
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise ConfigError("under torchrun every process must agree on the run folder: pass --run NAME")
    return f"{backbone}-{dt.datetime.now(dt.timezone.utc).strftime('%Y%m%dT%H%M%SZ')}"


def _launch(sctx, nproc: int, run: str) -> None:
    """Re-run this very command under ``torchrun --standalone --nproc_per_node N``."""
    argv = [a for a in sys.argv[1:]]
    args, skip = [], False
    for a in argv:  # drop --nproc/--run (re-added) and keep everything else as typed
        if skip:
            skip = False
            continue
        if a in ("--nproc", "--run"):
            skip = True
            continue
        if a.startswith(("--nproc=", "--run=")):
            continue
        args.append(a)
    if "-P" not in args and "--project" not in args:
        args = ["-P", str(sctx.project.root)] + args
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m",
           "mv3dtk", *args]
    sctx.log.info("launching %d processes (run %s): %s", nproc, run, " ".join(cmd))
    # the run name travels in the environment (Click's MV3D_PRETRAIN_RUN_NAME): torchrun's own parser
    # would take a trailing "--run" for its "--run-path"
    env = {**os.environ, PARENT_ENV: sctx.run_id or "", "MV3D_PRETRAIN_RUN_NAME": run,
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    code = subprocess.call(cmd, env=env)
    if code != 0:
        raise Mv3dError(f"torchrun exited with code {code}; see the messages above (and pretrain/{run}/)")


def pretrain(sctx, *, backbone, model_config, text_encoder, losses, mask_pool_layer, batch_size, epochs, max_steps,
             lr, weight_decay, warmup_steps, rsmb_size, rsmb_init, precision, grad_checkpointing, compile_, workers,
             nproc, checkpoint_every, resume, run_name, seed, freeze_text=False, init_from=None,
             global_text="report") -> None:
    from .loop import LOSS_NAMES, TrainConfig

    terms = tuple(t.strip() for t in losses.split(",") if t.strip())
    bad = [t for t in terms if t not in LOSS_NAMES]
    if bad or not terms:
        raise ConfigError(f"--losses {losses!r}: choose from {', '.join(LOSS_NAMES)}")
    source = None
    if init_from:
        source = Path(init_from)
        source = source if source.is_absolute() or source.exists() else sctx.project.root / source
        if not (source / "config.json").is_file() or not (source / "model.safetensors").is_file():
            raise ConfigError(f"--init-from {init_from}: not a saved mv3d model (needs config.json and "
                              "model.safetensors); point at pretrain/<run>/model")
        if text_encoder != "default":
            raise ConfigError("--init-from keeps the saved model's text tower; drop --text-encoder")
        source = source.resolve()
    cfg = _model_config(model_config, text_encoder, mask_pool_layer, grad_checkpointing, source)
    if cfg["image"]["backbone"] != backbone:
        raise ConfigError(f"--model-config {model_config} is a {cfg['image']['backbone']} model, not --backbone "
                          f"{backbone}")
    run = _run_name(run_name, backbone)
    run_dir = sctx.project.root / "pretrain" / run
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        _launch(sctx, nproc, run)
        sctx.record_output("pretrain.model", run_dir / "model")
        return
    train_cfg = TrainConfig(model=cfg, losses=terms, batch_size=batch_size, epochs=epochs, max_steps=max_steps, lr=lr,
                            weight_decay=weight_decay, warmup_steps=warmup_steps, rsmb_size=rsmb_size,
                            precision=precision, workers=workers, seed=seed, checkpoint_every=checkpoint_every,
                            compile=compile_, freeze_text=freeze_text, rsmb_init=rsmb_init, global_text=global_text,
                            init_from=str(source) if source else None)
    _train(sctx, run_dir, train_cfg, resume)


def _train(sctx, run_dir: Path, train_cfg, resume: bool) -> None:
    from .dist import init_distributed
    from .loop import Trainer

    dist = init_distributed()
    if dist.is_main:
        if (run_dir / "checkpoints").is_dir() and not resume:
            raise ConfigError(f"{run_dir} already has checkpoints: pass --resume to continue it, or --run NEW_NAME")
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run_dir / "config.json", {"train": train_cfg.resume_key(), "world_size": dist.world_size,
                                                    "max_steps": train_cfg.max_steps})
    trainer = Trainer(sctx.project.root, run_dir, train_cfg, dist, sctx.log, resume)
    last = trainer.run()
    if dist.is_main and not last:
        sctx.log.info("pretrain: the run had already finished (step %d); model: %s", trainer.step, run_dir / "model")
        sctx.record_output("pretrain.model", run_dir / "model")
    elif dist.is_main:
        sctx.log.info("pretrain: %d steps, final loss %.4f, %.1f volumes/s; model: %s", last.get("step", 0),
                      last.get("loss", float("nan")), last.get("volumes_per_s", 0.0), run_dir / "model")
        sctx.record_output("pretrain.model", run_dir / "model")
    if dist.world_size > 1:
        import torch.distributed as tdist

        tdist.barrier()
        tdist.destroy_process_group()
