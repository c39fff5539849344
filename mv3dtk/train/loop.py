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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import Mv3dError
from ..runs import DistInfo
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint

LOSS_NAMES = ("global", "local", "global-semantic", "local-semantic")
GLOBAL_TEXTS = ("report", "enriched", "statement", "mixed", "statements")


@dataclass
class TrainConfig:
    model: dict
    losses: tuple[str, ...] = LOSS_NAMES
    batch_size: int = 32
    epochs: int = 16
    max_steps: int | None = None
    lr: float = 5e-5
    weight_decay: float = 1e-5
    warmup_steps: int = 200
    rsmb_size: int = 65536
    rsmb_init: str = "none"
    init_from: str | None = None
    precision: str = "bf16"
    grad_clip: float = 1.0
    workers: int = 4
    seed: int = 0
    checkpoint_every: int = 500
    compile: bool = False
    freeze_text: bool = False
    global_text: str = "report"
    extra: dict = field(default_factory=dict)

    def resume_key(self) -> dict:
        """What must match to resume (not max_steps, workers or checkpoint cadence)."""
        d = asdict(self)
        for k in ("max_steps", "workers", "checkpoint_every", "compile", "extra"):
            d.pop(k)
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


def global_texts(batch: dict, mode: str, seed: int, step: int) -> list[str]:
    """The text each volume of ``batch`` is aligned with by the global term (B,); for
    ``statements``, the batch's distinct statements (T,) (:func:`batch_statements`).

    ``report``: its source report (the paper). ``enriched``: the whole enriched report. ``statement``:
    one sentence of the enriched report, drawn afresh at every step (CXR-CLIP style), so that the image
    meets single presence/absence statements, the form zero-shot prompts take. ``mixed``: either, with
    even odds. Draws depend only on (seed, step, volume), so a resumed or distributed run repeats them."""
    import random

    from ..text.labeler import split_sentences

    if mode == "statements":
        return batch_statements(batch)
    if mode == "report":
        return list(batch["report"])
    if mode == "enriched":
        return list(batch["enriched"])
    out = []
    for i, text in zip(batch["index"].tolist(), batch["enriched"]):
        rng = random.Random(f"{seed}:{step}:{i}")
        sentences = split_sentences(text)
        whole = not sentences or (mode == "mixed" and rng.random() < 0.5)
        out.append(text if whole else rng.choice(sentences))
    return out


def batch_statements(batch: dict) -> list[str]:
    """``--global-text statements``: every distinct sentence of the batch's enriched reports, in order
    of first appearance (1 <= T < B * MAX_STATEMENTS). The global term then aligns each volume with all
    of its own statements at once (:func:`mv3dtk.train.losses.set_nce`), a dense signal per step.
    Only the sentences :func:`statement_ids` knows as true are used; a batch without any gives the
    empty text, which the loss drops (its id is the padding's)."""
    from ..text.labeler import split_sentences

    keep = MAX_STATEMENTS - 1  # statement_ids stores the whole text's id, then this many sentences
    return list(dict.fromkeys(x for text in batch["enriched"] for x in split_sentences(text)[:keep])) or [""]


def first_of_each(ids: torch.Tensor) -> torch.Tensor:
    """ids (T,) int64 -> (T,) bool: the first occurrence of each id that is not the padding's."""
    _, inverse = torch.unique(ids, return_inverse=True)
    pos = torch.arange(len(ids), device=ids.device)
    first = torch.full((int(inverse.max()) + 1 if len(ids) else 0,), len(ids), device=ids.device)
    first = first.scatter_reduce(0, inverse, pos, reduce="amin")
    return (first[inverse] == pos) & (ids != EMPTY_ID)


def pad_ids(ids: torch.Tensor, n: int) -> torch.Tensor:
    """ids (T,) int64 -> (T + n,) padded with EMPTY_ID (exactly: F.pad's value is a float, which
    would round a 64-bit id)."""
    return torch.cat([ids, torch.full((n,), EMPTY_ID, dtype=ids.dtype, device=ids.device)])


def distinct_statements(text: torch.Tensor, ids: torch.Tensor, true_ids: torch.Tensor):
    """Gathered statement embeddings text (N, E) with their ids (N,) (padding and repeats across ranks
    included), and what is true of each volume true_ids (B, K) -> the distinct statements (T, E) and
    positives (B, T) bool: statement t is one of volume b's."""
    keep = first_of_each(ids)
    return text[keep], positives_from_ids(ids[keep], true_ids)


def global_targets(mode: str, text: torch.Tensor, ids: torch.Tensor, true_ids: torch.Tensor):
    """The global term's texts and positives for the statement modes: text (N, E) with their ids (N,)
    and true_ids (B, K) -> (texts (T, E), positives (B, T) bool). ``statements``: each distinct
    statement once (:func:`distinct_statements`). ``statement`` / ``mixed`` (paired, N = B): a
    statement true of several volumes is a positive for each of them, and each volume's own text is."""
    if mode == "statements":
        return distinct_statements(text, ids, true_ids)
    pos = positives_from_ids(ids, true_ids)  # (B, B)
    return text, pos | torch.eye(len(pos), dtype=torch.bool, device=pos.device)


MAX_STATEMENTS = 64  # per volume, for the positives of the global term (more are rare and ignored)


def text_hash(text: str) -> int:
    """A stable 64-bit id of a text (the same in every process, unlike ``hash``)."""
    import hashlib

    return int.from_bytes(hashlib.blake2b(text.strip().encode("utf-8"), digest_size=8).digest(), "little", signed=True)


EMPTY_ID = text_hash("")  # pads the statement ids; never a positive


def statement_ids(batch: dict, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """-> ids of the global texts (B,) int64, and of what is true of each volume (B, K) int64: its
    enriched report and each of its sentences, padded with the id of the empty text."""
    from ..text.labeler import split_sentences

    true = torch.full((len(batch["enriched"]), MAX_STATEMENTS), EMPTY_ID, dtype=torch.long)
    for i, enriched in enumerate(batch["enriched"]):
        ids = [text_hash(enriched)] + [text_hash(x) for x in split_sentences(enriched)]
        ids = ids[:MAX_STATEMENTS]
        true[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
    return torch.tensor([text_hash(t) for t in texts], dtype=torch.long), true


def positives_from_ids(text_ids: torch.Tensor, true_ids: torch.Tensor) -> torch.Tensor:
    """text_ids (T,), true_ids (B, K) -> (B, T) bool: global text j is one of volume i's statements.
    An empty text (the padding's id) is nobody's positive; with paired texts (T = B) the training
    loop adds the diagonal, so an empty text is still its own volume's."""
    return (true_ids[:, :, None] == text_ids[None, None, :]).any(1) & (text_ids != EMPTY_ID)[None, :]


def _region_inputs(batch: dict, key: str) -> tuple[list[str], torch.Tensor]:
    """Valid region texts of the batch, flattened, and their (sample, region) index (M, 2)."""
    index = batch["region_valid"].nonzero()  # (M, 2)
    texts = [batch[key][int(b)][int(r)] for b, r in index]
    return texts, index


class Trainer:
    def __init__(self, project_root: Path, run_dir: Path, cfg: TrainConfig, dist: DistInfo, log, resume: bool):
        from ..data.datasets import PretrainDataset
        from ..models.medvista3d import MedVista3D
        from .losses import MedVista3DLoss
        from .rsmb import SemanticBank

        self.cfg, self.dist, self.log, self.run_dir = cfg, dist, log, run_dir
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
        self.loss_fn = MedVista3DLoss(**{f"use_{n.replace('-', '_')}": n in cfg.losses for n in LOSS_NAMES})
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                     fused=self.device.type == "cuda")
        from ..data.datasets import batches_per_epoch

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
        if dist.world_size > 1 and self.device.type == "cuda":  # a conv stem's BatchNorm sees the global batch
            self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.net = self.model
        if dist.world_size > 1:
            self.net = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if cfg.compile:
            self.net = torch.compile(self.net)

    def _init_from(self, path: Path) -> None:
        """Start from a saved model's weights (its text tower is already the config's text model)."""
        from ..models.medvista3d import load_weights

        load_weights(self.model, path, map_location=self.device)
        self.log.info("initialised from %s", path)

    def _warm_start_bank(self, root: Path) -> None:
        """Fill the RSMB with the enriched texts that ``mv3d index-texts`` embedded with this very
        text tower (same encoder identity), newest last; Algorithm 1 then continues from there."""
        from ..text.index import index_path, load_matrix

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
            from ..fs import atomic_write_text

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
        from .dist import gather_batch

        dev = self.device
        image = batch["image"].to(dev, non_blocking=True)  # (B, 1, D, H, W)
        masks = batch["mask"].to(dev, non_blocking=True)  # (B, D, H, W)
        texts, index = _region_inputs(batch, "region_texts")
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.amp):
            report = global_texts(batch, self.cfg.global_text, self.cfg.seed, self.step)  # (B,) or (T,)
            out = self.net(image, masks, self._texts(report, dev),
                           self._texts(texts, dev) if texts else None, index.to(dev))
        if self.cfg.global_text in ("statement", "mixed", "statements"):
            out["_text_ids"], out["_true_ids"] = (t.to(dev) for t in statement_ids(batch, report))
        if self.cfg.global_text == "statements":  # (T, E) -> a fixed (B * MAX_STATEMENTS, E) that ranks can gather
            pad = len(batch["enriched"]) * MAX_STATEMENTS - len(report)
            out["text_global"] = F.pad(out["text_global"], (0, 0, 0, pad))
            out["_text_ids"] = pad_ids(out["_text_ids"], pad)
        enqueue = None
        if self.semantic:
            sem = self._semantic(batch, out)
            enqueue = self._enriched_for_bank(sem)  # pops the private keys
            out.update(sem)
        out = gather_batch(out)
        if "_text_ids" in out:  # statements are matched by identity across the gathered batch
            out["text_global"], out["global_positives"] = global_targets(
                self.cfg.global_text, out["text_global"], out.pop("_text_ids"), out.pop("_true_ids"))
        return out, enqueue

    @torch.no_grad()
    def _semantic(self, batch: dict, out: dict) -> dict[str, torch.Tensor]:
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
        return {"enriched_global_nn": nn_g, "enriched_global_found": found_g, "enriched_local_nn": nn_l,
                "enriched_local_found": found_l, "_t_hat": t_hat, "_t_hat_local": t_loc,
                "_t_hat_local_valid": out["text_local_valid"].clone()}

    def _enriched_for_bank(self, out: dict) -> torch.Tensor:
        from .dist import gather_nograd

        g = gather_nograd(out.pop("_t_hat"))
        loc = gather_nograd(out.pop("_t_hat_local"))
        valid = gather_nograd(out.pop("_t_hat_local_valid"))
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
        self.model.train()
        if self.frozen_text is not None:
            self.model.text.eval()  # no dropout: the cached features are the tower's exact output
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
        from ..data.datasets import make_loader

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
                    "data_wait": (t_data - t_end) / (t_done - t_end)}
            t_end = t_done
            if self.dist.is_main:
                self._log_step(last)
            if self.step >= self.total:
                break
        return last

    def _log_step(self, m: dict[str, Any]) -> None:
        with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(m) + "\n")
        if self.step % max(1, self.total // 20) == 0 or self.step == self.total:
            self.log.info("step %d/%d loss %.4f lr %.2e %.1f vol/s data-wait %.0f%%", self.step, self.total,
                          m["loss"], m["lr"], m["volumes_per_s"], 100 * m["data_wait"])
        if self.step % self.cfg.checkpoint_every == 0 or self.step == self.total:
            self._checkpoint()

    def _checkpoint(self) -> None:
        save_checkpoint(self.run_dir, model=self.model, optimizer=self.opt, scheduler=self.sched, bank=self.bank,
                        step=self.step, epoch=self.epoch, batch=self.batch, config=self.cfg.resume_key())


def plot_metrics(metrics: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..fs import atomic_path

    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for key in ("loss", "global", "local", "global_semantic", "local_semantic"):
        if rows and key in rows[0]:
            ax.plot([r["step"] for r in rows], [r[key] for r in rows], label=key)
    ax.set(xlabel="step", ylabel="loss", title="MedVista3D pretraining")
    ax.legend()
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)
