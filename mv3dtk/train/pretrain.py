"""``mv3d pretrain``'s library entry points: resolve the options into a :class:`TrainConfig`, and run it.

    cfg = train_config(project_root, PretrainOptions(backbone="vit", model_config="vit-tiny"))
    last = run_pretraining(project_root, project_root / "pretrain" / "run1", cfg, resume=False, log=log)
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..dist import init_distributed, shutdown
from ..errors import ConfigError
from ..fs import atomic_write_json
from ..models.factory import get_model_config
from ..tracking import make_tracker
from .checkpoint import latest_checkpoint
from .loop import Trainer, TrainConfig
from .options import PretrainOptions, parse_losses


def model_config(opts: PretrainOptions, init_from: Path | None = None) -> dict:
    """The model config a run builds: the named config (or, with ``init_from``, the saved model's own, its
    text tower from its ``text/`` folder), with the text encoder, mask-pool layer and checkpointing options."""
    if init_from is not None:
        cfg = get_model_config(str(init_from / "config.json"))
        cfg.pop("format_version", None)
        cfg["text"] = {**cfg["text"], "model": str(init_from / "text")}
    else:
        cfg = get_model_config(opts.model_config)
    if opts.text_encoder != "default":
        cfg["text"] = {**cfg["text"], "model": opts.text_encoder}
    if opts.mask_pool_layer is not None:
        cfg["image"]["mask_pool_layer"] = opts.mask_pool_layer
    if opts.grad_checkpointing:
        cfg["image"]["grad_checkpointing"] = True
    return cfg


def _init_source(project_root: Path, opts: PretrainOptions) -> Path | None:
    """``--init-from`` resolved against the project and checked to be a saved model."""
    if not opts.init_from:
        return None
    source = Path(opts.init_from)
    source = source if source.is_absolute() or source.exists() else project_root / source
    if not (source / "config.json").is_file() or not (source / "model.safetensors").is_file():
        raise ConfigError(f"--init-from {opts.init_from}: not a saved mv3d model (needs config.json and "
                          "model.safetensors); point at pretrain/<run>/model")
    if opts.text_encoder != "default":
        raise ConfigError("--init-from keeps the saved model's text tower; drop --text-encoder")
    return source.resolve()


def train_config(project_root: Path, opts: PretrainOptions) -> TrainConfig:
    """Check ``opts`` (with the paper's defaults filled in) and resolve them into a :class:`TrainConfig`."""
    opts = opts.with_paper_defaults()
    terms = parse_losses(opts.losses)
    source = _init_source(Path(project_root), opts)
    cfg = model_config(opts, source)
    if cfg["image"]["backbone"] != opts.backbone:
        raise ConfigError(f"--model-config {opts.model_config} is a {cfg['image']['backbone']} model, not --backbone "
                          f"{opts.backbone}")
    return TrainConfig(model=cfg, losses=terms, batch_size=opts.batch_size, epochs=opts.epochs,
                       max_steps=opts.max_steps, lr=opts.lr, weight_decay=opts.weight_decay,
                       warmup_steps=opts.warmup_steps, rsmb_size=opts.rsmb_size, rsmb_init=opts.rsmb_init,
                       init_from=str(source) if source else None, precision=opts.precision, workers=opts.workers,
                       seed=opts.seed, checkpoint_every=opts.checkpoint_every, compile=opts.compile,
                       freeze_text=opts.freeze_text, global_text=opts.global_text)


def run_pretraining(project_root: Path, run_dir: Path, cfg: TrainConfig, resume: bool,
                    log: logging.Logger, report_to: str = "none") -> dict[str, Any]:
    """Train ``cfg`` into ``run_dir`` (checkpoints, ``metrics.jsonl``, ``loss.png``, ``model/``), in this
    process or as one rank of a torchrun job. Returns the last step's metrics ({} when the run had
    already finished)."""
    dist = init_distributed()
    if dist.is_main:
        if latest_checkpoint(run_dir) is not None and not resume:
            raise ConfigError(f"{run_dir} already has checkpoints: pass --resume to continue it, or --run NEW_NAME")
        run_dir.mkdir(parents=True, exist_ok=True)
        if not resume:  # a run killed before its first checkpoint starts over: its logged steps go with it
            (run_dir / "metrics.jsonl").unlink(missing_ok=True)
        atomic_write_json(run_dir / "config.json", {"train": cfg.resume_key(), "world_size": dist.world_size,
                                                    "max_steps": cfg.max_steps})
    tracker = make_tracker(report_to if dist.is_main else "none", run_dir, "pretrain", cfg.resume_key())
    try:
        last = Trainer(Path(project_root), run_dir, cfg, dist, log, resume, tracker).run()
    finally:
        tracker.close()
    if dist.is_main and not last:
        log.info("pretrain: the run had already finished; model: %s", run_dir / "model")
    elif dist.is_main:
        log.info("pretrain: %d steps, final loss %.4f, %.1f volumes/s over the run; model: %s", last["step"],
                 last["loss"], last["run_volumes_per_s"], run_dir / "model")
    shutdown()  # on success only: after an error the other ranks may never reach the barrier
    return last
