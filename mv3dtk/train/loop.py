"""The MedVista3D pretraining loop (library side of ``mv3d pretrain``).

Per step: encode the volumes (dual pathway) and the report / region texts, query the RSMB with the
enriched texts (no gradient), gather everything across ranks, compute eq. 16, clip, AdamW, warm-up
+ cosine schedule, then enqueue the batch's enriched embeddings (Algorithm 1). Only rank 0 writes
``metrics.jsonl``, checkpoints and the final ``model/``. A resumed run continues from the exact
data position with the saved optimizer, scheduler, bank and RNG states, so its loss sequence equals
an uninterrupted run's.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..data.datasets import PretrainDataset, batches_per_epoch, make_loader
from ..dist import DistInfo
from ..errors import Mv3dError
from ..fs import atomic_write_text
from ..index import index_path, load_matrix
from ..models.medvista3d import MedVista3D, load_weights
from ..tracking import Tracker
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .gather import gather_batch, gather_nograd, global_batchnorm
from .losses import MedVista3DLoss
from .options import GLOBAL_TEXTS, LOSS_TERMS
from .plots import plot_metrics
from .rsmb import SemanticBank
from .targets import MAX_STATEMENTS, STATEMENT_MODES, global_targets, global_texts, pad_ids, statement_ids

GRAD_CLIP = 1.0  # global gradient-norm clip


@dataclass(kw_only=True)
class TrainConfig:
    """Everything a run needs, resolved (the stage's options and the model config): built by
    :func:`mv3dtk.train.pretrain.train_config`, where the defaults live."""

    model: dict
    losses: tuple[str, ...]
    batch_size: int
    epochs: int
    max_steps: int | None
    lr: float
    weight_decay: float
    warmup_steps: int
    rsmb_size: int
    rsmb_init: str
    init_from: str | None
    precision: str
    workers: int
    seed: int
    checkpoint_every: int
    compile: bool
    freeze_text: bool
    global_text: str
    grad_clip: float = GRAD_CLIP

    def resume_key(self) -> dict:
        """What must match to resume (not max_steps, workers or checkpoint cadence)."""
        d = asdict(self)
        for k in ("max_steps", "workers", "checkpoint_every", "compile"):
            d.pop(k)
        # the fingerprint keeps the loss spelling of runs begun before the names were unified, so they still resume
        d["losses"] = tuple(t.replace("_", "-") for t in self.losses)
        if d["global_text"] == "report":  # the default: runs begun before the option existed still resume
            d.pop("global_text")
        return d


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up to 1 over ``warmup`` steps, then cosine to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _tokenize(model, texts: list[str], device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in model.text.tokenize(texts).items()}


class FrozenTextFeatures:
    """Pooled features of a frozen text tower, computed once per distinct text (a report seen in
    every epoch is encoded once). Deterministic, so it is not checkpointed."""

    def __init__(self, model, device, batch_size: int = 64, max_items: int = 500_000):
        self.model, self.device, self.batch_size, self.max_items = model, device, batch_size, max_items
        self.cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> torch.Tensor:
        missing = list(dict.fromkeys(t for t in texts if t not in self.cache))
        if len(self.cache) + len(missing) > self.max_items:
            self.cache.clear()
        for i in range(0, len(missing), self.batch_size):
            chunk = missing[i:i + self.batch_size]
            tok = _tokenize(self.model, chunk, self.device)
            feats = self.model.text(tok["input_ids"], tok["attention_mask"]).float()  # (n, H)
            self.cache.update(zip(chunk, feats))
        return torch.stack([self.cache[t] for t in texts]).to(self.device)  # (N, H)


def _region_inputs(batch: dict, key: str) -> tuple[list[str], torch.Tensor]:
    """Valid region texts of the batch, flattened, and their (sample, region) index (M, 2)."""
    index = batch["region_valid"].nonzero()  # (M, 2)
    texts = [batch[key][int(b)][int(r)] for b, r in index]
    return texts, index


class Trainer:
    def __init__(self, project_root: Path, run_dir: Path, cfg: TrainConfig, dist: DistInfo, log, resume: bool,
                 tracker: Tracker | None = None):
        self.cfg, self.dist, self.log, self.run_dir = cfg, dist, log, run_dir
        self.tracker = tracker or Tracker()
        self.device = torch.device(f"cuda:{dist.local_rank}" if torch.cuda.is_available() else "cpu")
        self.amp = cfg.precision == "bf16" and self.device.type == "cuda"
        torch.manual_seed(cfg.seed)
        self.semantic = any(t.endswith("semantic") for t in cfg.losses)
        if cfg.global_text not in GLOBAL_TEXTS:
            raise Mv3dError(f"global_text {cfg.global_text!r}: choose from {', '.join(GLOBAL_TEXTS)}")
        uses_rewrite = self.semantic or cfg.global_text != "report"
        self.data = PretrainDataset(project_root, split="train", enriched=uses_rewrite)
        if uses_rewrite and not self.data.enriched_available:
            log.warning("rewrite/ has not run (or misses %d texts): the semantic terms and --global-text %s use the "
                        "source texts; run 'mv3d rewrite' for the enriched ones", self.data.enriched_missing,
                        cfg.global_text)
        elif uses_rewrite and self.data.enriched_missing:
            log.warning("%d texts have no rewrite (a partial or stale rewrite/): they use the source text; rerun "
                        "'mv3d rewrite' to cover them", self.data.enriched_missing)
        self.model = MedVista3D(cfg.model).to(self.device)
        if cfg.init_from:
            self._init_from(Path(cfg.init_from))
        self.frozen_text = None
        if cfg.freeze_text:  # the text tower stays as loaded; only the projection learns
            self.model.text.requires_grad_(False)
            self.frozen_text = FrozenTextFeatures(self.model, self.device)
        self.bank = SemanticBank(cfg.rsmb_size, int(cfg.model["embed_dim"])).to(self.device)
        if cfg.rsmb_init == "index" and not resume:  # a resumed run restores its own bank
            self._warm_start_bank(project_root)
        self.loss_fn = MedVista3DLoss(**{f"use_{n}": n in cfg.losses for n in LOSS_TERMS})
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                     fused=self.device.type == "cuda")
        if cfg.batch_size % dist.world_size:
            raise Mv3dError(f"--batch-size {cfg.batch_size} (the global batch) must be a multiple of the "
                            f"{dist.world_size} processes")
        self.local_batch = cfg.batch_size // dist.world_size
        self.steps_per_epoch = batches_per_epoch(len(self.data), self.local_batch, dist.world_size)
        self.total = min(cfg.max_steps or 10 ** 12, self.steps_per_epoch * cfg.epochs)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: lr_factor(s, cfg.warmup_steps, self.steps_per_epoch * cfg.epochs))
        self.step, self.epoch, self.batch = 0, 0, 0
        if resume:
            self._resume()
        if dist.world_size > 1:  # a conv stem's BatchNorm sees the global batch, as in a single process
            self.model = (torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model) if self.device.type == "cuda"
                          else global_batchnorm(self.model))
        self.net = self.model
        if dist.world_size > 1:
            self.net = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if cfg.compile:
            self.net = torch.compile(self.net)

    def _init_from(self, path: Path) -> None:
        """Start from a saved model's weights (its text tower is already the config's text model)."""
        load_weights(self.model, path, map_location=self.device)
        self.log.info("initialised from %s", path)

    def _warm_start_bank(self, root: Path) -> None:
        """Fill the RSMB with the enriched texts that ``mv3d index-texts`` embedded with this very
        text tower (same encoder identity), newest last; Algorithm 1 then continues from there."""
        ident = self.model.text_identity
        try:
            _, _, emb = load_matrix(index_path(root), ident, origins=("enriched", "region_enriched"))
        except Mv3dError as e:
            raise Mv3dError(f"--rsmb-init index: {e}. The bank can only start from embeddings of the text tower this "
                            "run starts with: start from a trained model with --init-from pretrain/<run>/model and "
                            "index it first with: mv3d index-texts --encoder pretrain/<run>/model "
                            "--origins enriched,region_enriched") from None
        if not len(emb):
            raise Mv3dError("--rsmb-init index: the index has no enriched texts for this text tower; run: mv3d rewrite, "
                            "then mv3d index-texts --encoder <the --init-from model> --origins enriched,region_enriched")
        self.bank.enqueue(emb[-self.cfg.rsmb_size:].to(self.device))
        self.log.info("RSMB warm-started with %d enriched embeddings from index/texts.duckdb (%s)", len(self.bank),
                      ident)

    def _resume(self) -> None:
        ckpt = latest_checkpoint(self.run_dir)
        if ckpt is None:
            raise Mv3dError(f"--resume: no checkpoint in {self.run_dir / 'checkpoints'}; start without --resume")
        meta = load_checkpoint(ckpt, model=self.model, optimizer=self.opt, scheduler=self.sched, bank=self.bank,
                               config=self.cfg.resume_key())
        self.step, self.epoch, self.batch = meta["step"], meta["epoch"], meta["batch"]
        metrics = self.run_dir / "metrics.jsonl"
        if self.dist.is_main and metrics.is_file():  # drop what the interrupted run logged after the checkpoint
            keep = [ln for ln in metrics.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= self.step]
            atomic_write_text(metrics, "".join(ln + "\n" for ln in keep))
        self.log.info("resumed from %s (step %d, epoch %d, batch %d)", ckpt, self.step, self.epoch, self.batch)

    # -- one step ------------------------------------------------------------------------
    def _texts(self, texts: list[str], dev):
        """What the model's forward takes for ``texts``: tokens, or frozen features (N, H)."""
        if self.frozen_text is not None:
            return self.frozen_text(texts)
        return _tokenize(self.model, texts, dev)

    @torch.no_grad()
    def _encode_texts(self, texts: list[str]) -> torch.Tensor:
        if self.frozen_text is not None:
            return self.model.project_text(self.frozen_text(texts)).float()  # (N, E)
        return self.model.encode_text(texts).float()  # (N, E)

    def _forward(self, batch: dict) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """-> the gathered loss inputs, and the gathered enriched embeddings to enqueue."""
        dev = self.device
        image = batch["image"].to(dev, non_blocking=True)  # (B, 1, D, H, W)
        masks = batch["mask"].to(dev, non_blocking=True)  # (B, D, H, W)
        texts, index = _region_inputs(batch, "region_texts")
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.amp):
            report = global_texts(batch, self.cfg.global_text, self.cfg.seed, self.step)  # (B,) or (T,)
            out = self.net(image, masks, self._texts(report, dev),
                           self._texts(texts, dev) if texts else None, index.to(dev))
        ids = None
        if self.cfg.global_text in STATEMENT_MODES:  # statements are matched by identity across the gathered batch
            ids = dict(zip(("text", "true"), (t.to(dev) for t in statement_ids(batch, report))))
        if self.cfg.global_text == "statements":  # (T, E) -> a fixed (B * MAX_STATEMENTS, E) that ranks can gather
            pad = len(batch["enriched"]) * MAX_STATEMENTS - len(report)
            out["text_global"] = F.pad(out["text_global"], (0, 0, 0, pad))
            ids["text"] = pad_ids(ids["text"], pad)
        enqueue = None
        if self.semantic:
            neighbours, fresh = self._semantic(batch, out)
            enqueue = self._enriched_for_bank(*fresh)
            out.update(neighbours)
        out = gather_batch(out)
        if ids is not None:
            ids = gather_batch(ids)
            out["text_global"], out["global_positives"] = global_targets(
                self.cfg.global_text, out["text_global"], ids["text"], ids["true"])
        return out, enqueue

    @torch.no_grad()
    def _semantic(self, batch: dict, out: dict) -> tuple[dict[str, torch.Tensor], tuple[torch.Tensor, ...]]:
        """The RSMB's nearest neighbours of the batch's enriched texts (the semantic terms' inputs), and those
        enriched embeddings themselves (global (B, E), local (B, R, E) with their validity (B, R)) for the bank."""
        t_hat = self._encode_texts(batch["enriched"])  # (B, E)
        nn_g, found_g = self.bank.query(t_hat)
        texts, index = _region_inputs(batch, "enriched_regions")
        B, R, E = out["image_local"].shape
        t_loc = torch.zeros(B, R, E, device=self.device)
        nn_l = torch.zeros(B, R, E, device=self.device)
        found_l = torch.zeros(B, R, dtype=torch.bool, device=self.device)
        if texts:
            emb = self._encode_texts(texts)  # (M, E)
            nn, found = self.bank.query(emb)
            idx = (index[:, 0].to(self.device), index[:, 1].to(self.device))
            t_loc[idx], nn_l[idx], found_l[idx] = emb, nn, found
        neighbours = {"enriched_global_nn": nn_g, "enriched_global_found": found_g, "enriched_local_nn": nn_l,
                      "enriched_local_found": found_l}
        return neighbours, (t_hat, t_loc, out["text_local_valid"].clone())

    def _enriched_for_bank(self, t_hat: torch.Tensor, t_loc: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """What Algorithm 1 enqueues: every rank's enriched global and valid local embeddings (N, E)."""
        g, loc, valid = gather_nograd(t_hat), gather_nograd(t_loc), gather_nograd(valid)
        return torch.cat([g, loc[valid]])

    def train_step(self, batch: dict) -> dict[str, float]:
        out, enqueue = self._forward(batch)
        terms = self.loss_fn(out)
        loss = terms["loss"]
        if not torch.isfinite(loss):
            last = latest_checkpoint(self.run_dir)
            raise Mv3dError(f"the loss became {loss.item()} at step {self.step}; training stopped. The last good "
                            f"checkpoint is {last or 'none (none written yet)'}; lower --lr or check the data")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.opt.step()
        self.sched.step()
        if enqueue is not None:
            self.bank.enqueue(enqueue)
        return {k: float(v.detach()) for k, v in terms.items()}

    # -- the run -------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Train to the last step; returns the last step's metrics ({} when the run had already finished)."""
        self.model.train()
        if self.frozen_text is not None:
            self.model.text.eval()  # no dropout: the cached features are the tower's exact output
        self.meter = Throughput(self.cfg.batch_size, self.step)
        last: dict[str, Any] = {}
        while self.step < self.total:
            last = self._epoch() or last
            if self.step < self.total:
                self.epoch, self.batch = self.epoch + 1, 0
        if self.dist.is_main and (last or not (self.run_dir / "model").is_dir()):  # a finished run: nothing new
            self.model.save(self.run_dir / "model")
            plot_metrics(self.run_dir / "metrics.jsonl", self.run_dir / "loss.png")
        return last

    def _epoch(self) -> dict[str, Any]:
        loader = make_loader(self.data, batch_size=self.local_batch, seed=self.cfg.seed, epoch=self.epoch,
                             skip_batches=self.batch, workers=self.cfg.workers, rank=self.dist.rank,
                             world_size=self.dist.world_size, pin_memory=self.device.type == "cuda")
        last: dict[str, Any] = {}
        t_end = time.perf_counter()
        for batch in loader:
            t_data = time.perf_counter()
            terms = self.train_step(batch)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            t_done = time.perf_counter()
            self.step, self.batch = self.step + 1, self.batch + 1
            last = {"step": self.step, "epoch": self.epoch, **terms, "lr": self.sched.get_last_lr()[0],
                    "temperature": float(torch.exp(-self.model.logit_scale.detach())),
                    "volumes_per_s": self.cfg.batch_size / (t_done - t_end),
                    "data_wait": (t_data - t_end) / (t_done - t_end),
                    "run_volumes_per_s": self.meter.run_rate(self.step, t_done)}
            t_end = t_done
            if self.dist.is_main:
                self._log_step(last, t_done)
            if self.step >= self.total:
                break
        return last

    def _log_step(self, m: dict[str, Any], now: float) -> None:
        with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(m) + "\n")
        self.tracker.log(self.step, m)
        if self.step % max(1, self.total // 20) == 0 or self.step == self.total:
            self.log.info("step %d/%d loss %.4f lr %.2e %.1f vol/s data-wait %.0f%%", self.step, self.total,
                          m["loss"], m["lr"], self.meter.interval_rate(self.step, now), 100 * m["data_wait"])
        if self.step % self.cfg.checkpoint_every == 0 or self.step == self.total:
            self._checkpoint()

    def _checkpoint(self) -> None:
        save_checkpoint(self.run_dir, model=self.model, optimizer=self.opt, scheduler=self.sched, bank=self.bank,
                        step=self.step, epoch=self.epoch, batch=self.batch, config=self.cfg.resume_key())


class Throughput:
    """Wall-clock volumes per second (global batch), data loading and start-up included: over the logging
    interval (what the log line shows) and over the whole run so far (what a user plans a run with)."""

    def __init__(self, batch_size: int, step: int, now: float | None = None):
        self.batch_size = batch_size
        self.start = self.mark = (step, time.perf_counter() if now is None else now)

    def run_rate(self, step: int, now: float) -> float:
        return self._rate(self.start, step, now)

    def interval_rate(self, step: int, now: float) -> float:
        """The rate since the previous call (or the start), then a new interval begins."""
        rate = self._rate(self.mark, step, now)
        self.mark = (step, now)
        return rate

    def _rate(self, since: tuple[int, float], step: int, now: float) -> float:
        return (step - since[0]) * self.batch_size / max(now - since[1], 1e-9)
