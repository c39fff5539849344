"""``mv3d vqa-train``'s library entry point: MedVista3D-LLaVA in two stages, on cached image tokens.

    run_vqa_training(project_root, project_root / "vqa" / "run1", VqaTrainOptions(llm=..., vqa=(...,)), log)

* **Stage 1** (``vqa/<run>/stage1/``): the LLM is frozen and only the projector trains, on prep's report
  texts of the train split, LLaVA-1.5's "plain" captioning (``<image>`` + report; loss on the report). The
  MedVista3D paper calls this step "alignment"; LLaVA's feature alignment is this captioning objective.
* **Stage 2** (``vqa/<run>/stage2/``): peft LoRA on every linear layer of the LLM plus the projector (its
  own parameter group), starting from stage 1's projector, on the CT-CHAT conversations whose volume is in
  the train split; the loss is on the assistant answers and their end-of-turn token.

Each stage: AdamW (weight decay 0), linear warm-up over 3 % of the steps then cosine, gradient clipping at
1.0; a global batch of ``batch_size`` samples cut into micro-batches and ranks, the summed token loss
divided once by the global batch's supervised tokens (so accumulation and ``--nproc`` give the gradient of
one big batch; gradients are summed over ranks by hand, which also lets a rank hold no sample of a short
last batch). Checkpoints (``checkpoints/step-<n>/``): ``projector.safetensors``, ``adapter/``
(``save_pretrained``), ``optimizer.pt`` and ``rng.pt`` (read back with ``weights_only=True``) and
``trainer.json``; ``--resume`` continues at the saved data position with the saved states, so a resumed
run equals the uninterrupted one. The final ``vqa/<run>/model/`` holds the projector, the adapter and
``vqa.json``, which names the LLM and the encoder.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import polars as pl
import torch
from safetensors.torch import load_file, save_file

from ..dist import barrier, init_distributed, shutdown
from ..errors import ConfigError, MissingInputError, Mv3dError
from ..fs import atomic_path, atomic_write_json
from ..tracking import make_tracker
from ..train.checkpoint import KEEP, config_fingerprint, latest_checkpoint, read_pt, read_safetensors, refused, rng_state
from ..train.loop import lr_factor
from .chat import Encoded, encode_conversation, encode_plain, truncate
from .data import keep_prepped, read_vqa, vqa_files
from .features import FeatureCache, build_cache
from .llm import check_llm_dir, describe_llm, load_llm
from .model import Projector, VqaModel, supervised_tokens
from .options import VqaTrainOptions

WARMUP_RATIO = 0.03  # CT-CHAT and LLaVA-1.5
MAX_GRAD_NORM = 1.0  # the Hugging Face Trainer's default, which both use
CARD = "vqa.json"


@dataclass
class Sample:
    volume_id: str
    enc: Encoded


def prepped_volumes(project_root: Path) -> pl.DataFrame:
    path = project_root / "prep" / "volumes.parquet"
    if not path.is_file():
        raise MissingInputError(f"{path} is missing; run: mv3d prep")
    return pl.read_parquet(path, columns=["volume_id", "split", "status", "report"]).filter(pl.col("status") == "ok")


def vqa_items(sources, volumes: pl.DataFrame, split: str, log: logging.Logger) -> list[dict]:
    """The items of every source file whose volume was prepped into ``split`` (skipped ones counted)."""
    items = [item for src in sources for path in vqa_files(src) for item in read_vqa(path)]
    if not items:
        raise ConfigError(f"--vqa {' '.join(map(str, sources))}: no VQA item found")
    prepped = set(volumes["volume_id"].to_list())
    kept, skipped = keep_prepped(items, prepped)
    if skipped:
        log.warning("vqa: %d of %d items skipped: their volume was not prepped (or failed prep)", skipped, len(items))
    in_split = set(volumes.filter(pl.col("split") == split)["volume_id"].to_list())
    return [it for it in kept if it["volume_id"] in in_split]


def _encode(samples: list[tuple[str, Encoded]], max_length: int, n_image: int, log: logging.Logger,
            what: str) -> list[Sample]:
    """Cut each sequence to ``max_length`` LLM positions (its sentinel stands for ``n_image`` image tokens);
    a sample left without a supervised token is dropped and counted, never a NaN loss."""
    out, dropped = [], 0
    for volume_id, enc in samples:
        cut = truncate(enc, max_length - n_image + 1)
        if cut is None or supervised_tokens([cut.labels]) == 0:
            dropped += 1
            continue
        out.append(Sample(volume_id, cut))
    if dropped:
        log.warning("vqa: %d of %d %s dropped: nothing left to learn after cutting to --max-length %d", dropped,
                    len(samples), what, max_length)
    if not out:
        raise ConfigError(f"no {what} left to train on (all were cut away at --max-length {max_length}, or none "
                          "exists); raise --max-length or check the inputs")
    return out


def _device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def resume_key(opts: VqaTrainOptions, stage: str, model_dir: Path, llm_dir: Path, identity: str) -> dict:
    """What a stage's checkpoints must agree with to be resumed."""
    keep = ("vqa", "token_pool", "lora_r", "lora_alpha", "lora_dropout", "batch_size", "max_length", "seed",
            "precision") + (("lr1", "epochs1") if stage == "1" else ("lr2", "projector_lr", "epochs2"))
    key = {k: getattr(opts, k) for k in keep}
    return {**key, "stage": stage, "model": str(model_dir), "llm": str(llm_dir), "identity": identity,
            "max_steps": opts.max_steps}


def run_vqa_training(project_root: str | Path, run_dir: str | Path, opts: VqaTrainOptions,
                     log: logging.Logger) -> dict[str, Any]:
    """Train the stages ``opts.stage`` asks for into ``run_dir``; -> {stage: its last metrics}."""
    from ..eval.runs import resolve_model_dir
    from ..models.medvista3d import load_model

    root, run_dir = Path(project_root), Path(run_dir)
    dist = init_distributed()
    if not opts.llm:
        raise ConfigError("vqa-train needs --llm LLAMA_DIR: a local Llama-architecture folder (e.g. "
                          "Llama-3.1-8B-Instruct with config, safetensors weights, tokenizer and chat template)")
    llm_dir = check_llm_dir(opts.llm)
    model_dir = resolve_model_dir(root, opts.model)
    stages = ("1", "2") if opts.stage == "both" else (opts.stage,)
    if "2" in stages and not opts.vqa:
        raise ConfigError("stage 2 trains on CT-CHAT VQA conversations: pass --vqa CTRATE_ROOT (with "
                          "dataset/vqa/*_vqa.json) or --vqa FILE.json")
    if opts.batch_size % dist.world_size:
        raise ConfigError(f"--batch-size {opts.batch_size} must be a multiple of the {dist.world_size} processes")
    device = _device()

    volumes = prepped_volumes(root)
    train_vols = volumes.filter(pl.col("split") == "train")
    captions = [(v, r) for v, r in zip(train_vols["volume_id"], train_vols["report"]) if r and r.strip()]
    items = vqa_items(opts.vqa, volumes, "train", log) if "2" in stages else []
    if "2" in stages and not items:
        raise ConfigError(f"none of the VQA items of --vqa {' '.join(opts.vqa)} has a prepped volume in the train "
                          "split; prep the volumes they name (their 'image' field) first")
    if "1" in stages and not captions:
        raise ConfigError("stage 1 trains on prep's reports, but no train volume has one; prep a dataset with "
                          "reports or run --stage 2")

    # the frozen encoder fills the token cache (each rank its share), then leaves memory
    encoder = load_model(model_dir, map_location=device)
    identity = encoder.image_identity
    needed = sorted({v for v, _ in captions} | {it["volume_id"] for it in items})
    cache = build_cache(encoder, root, needed, pool=opts.token_pool, batch_size=opts.encode_batch, device=device,
                        precision=opts.precision, rank=dist.rank, world_size=dist.world_size, log=log)
    del encoder
    barrier()
    missing = [v for v in needed if not cache.has(v)]
    if missing:
        log.warning("vqa: %d volumes have no image tokens (unreadable) and are left out: %s", len(missing),
                    ", ".join(missing[:5]))
    have = set(needed) - set(missing)
    first = next(iter(sorted(have)), None)
    if first is None:
        raise Mv3dError(f"no volume could be encoded into {cache.directory}; see the warnings above")
    n_image, feat_dim = cache.read(first).shape

    dtype = torch.bfloat16 if device.type == "cuda" and opts.precision == "bf16" else torch.float32
    llm, tok = load_llm(llm_dir, dtype=dtype, device=device)
    results = {}
    for stage in stages:
        if stage == "1":
            raw = [(v, encode_plain(tok, r)) for v, r in captions if v in have]
        else:
            raw = [(it["volume_id"], encode_conversation(tok, it["conversations"])) for it in items
                   if it["volume_id"] in have]
        samples = _encode(raw, opts.max_length, n_image, log, "captions" if stage == "1" else "conversations")
        key = resume_key(opts, stage, model_dir, llm_dir, identity)
        trainer = StageTrainer(run_dir / f"stage{stage}", stage, llm, feat_dim, samples, cache, opts, key, dist,
                               device, log)
        results[stage] = trainer.run()
        llm = trainer.base_llm()
    if dist.is_main:
        write_model(run_dir, stages, llm_dir, model_dir, identity, opts, n_image, feat_dim)
    shutdown()
    return results


def write_model(run_dir: Path, stages, llm_dir: Path, model_dir: Path, identity: str, opts: VqaTrainOptions,
                n_image: int, feat_dim: int) -> Path:
    """``vqa/<run>/model/``: the last stage's projector (and stage 2's adapter) and the card that names the
    LLM and the encoder."""
    import shutil

    last = run_dir / f"stage{stages[-1]}"
    with atomic_path(run_dir / "model") as tmp:
        tmp.mkdir()
        shutil.copy2(last / "projector.safetensors", tmp / "projector.safetensors")
        if (last / "adapter").is_dir():
            shutil.copytree(last / "adapter", tmp / "adapter")
        card = {"format": "mv3d-vqa", "version": 1, "llm": str(llm_dir), "llm_info": describe_llm(llm_dir),
                "encoder": str(model_dir), "image_identity": identity, "token_pool": opts.token_pool,
                "image_tokens": n_image, "feature_dim": feat_dim, "stages": list(stages),
                "vqa": list(opts.vqa), "max_length": opts.max_length,
                "lora": {"r": opts.lora_r, "alpha": opts.lora_alpha, "dropout": opts.lora_dropout}
                if (last / "adapter").is_dir() else None, "options": asdict(opts)}
        (tmp / CARD).write_text(json.dumps(card, indent=2, default=str))
    return run_dir / "model"


class StageTrainer:
    """One stage: its parameters, optimizer, schedule, data order, checkpoints and metrics."""

    def __init__(self, stage_dir: Path, stage: str, llm, feat_dim: int, samples: list[Sample], cache: FeatureCache,
                 opts: VqaTrainOptions, key: dict, dist, device: torch.device, log: logging.Logger):
        self.dir, self.stage, self.samples, self.cache = stage_dir, stage, samples, cache
        self.opts, self.key, self.dist, self.device, self.log = opts, key, dist, device, log
        torch.manual_seed(opts.seed)
        hidden = llm.config.hidden_size
        self.projector = Projector(feat_dim, hidden)
        self._start_projector(stage_dir.parent / "stage1" / "projector.safetensors")
        llm.requires_grad_(False)
        if stage == "2":
            from peft import LoraConfig, get_peft_model

            llm = get_peft_model(llm, LoraConfig(r=opts.lora_r, lora_alpha=opts.lora_alpha,
                                                 lora_dropout=opts.lora_dropout, bias="none", task_type="CAUSAL_LM",
                                                 target_modules="all-linear"))
        if opts.grad_checkpointing:
            llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model = VqaModel(llm, self.projector).to(device)
        lora = [p for n, p in llm.named_parameters() if p.requires_grad]
        groups = [{"params": list(self.projector.parameters()), "lr": opts.lr1 if stage == "1" else opts.projector_lr}]
        if lora:
            groups.append({"params": lora, "lr": opts.lr2})
        self.params = [p for g in groups for p in g["params"]]
        fused = device.type == "cuda"
        self.opt = torch.optim.AdamW(groups, weight_decay=0.0, fused=fused)
        epochs = opts.epochs1 if stage == "1" else opts.epochs2
        self.steps_per_epoch = math.ceil(len(samples) / opts.batch_size)
        self.total = epochs * self.steps_per_epoch
        if opts.max_steps:
            self.total = min(self.total, opts.max_steps)
        warmup = math.ceil(WARMUP_RATIO * self.total)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: lr_factor(s, warmup, self.total))
        self.step = 0

    def base_llm(self):
        """The LLM without this stage's adapters (stage 2 is the last stage: they stay)."""
        return self.model.llm

    def _start_projector(self, stage1: Path) -> None:
        if self.stage == "2" and stage1.is_file():
            self.projector.load_state_dict(load_file(str(stage1)))
            self.log.info("vqa stage 2: projector from %s", stage1)
        elif self.stage == "2":
            self.log.warning("vqa stage 2: no stage-1 projector in this run (%s); the projector starts untrained. "
                             "Run --stage both (or --stage 1 with the same --run first)", stage1)

    # -- data order: one permutation per epoch, from the seed alone ------------------------------------
    def batch_at(self, step: int) -> list[Sample]:
        epoch, b = divmod(step, self.steps_per_epoch)
        perm = torch.randperm(len(self.samples), generator=torch.Generator().manual_seed(self.opts.seed + epoch))
        return [self.samples[i] for i in perm[b * self.opts.batch_size:(b + 1) * self.opts.batch_size].tolist()]

    def run(self) -> dict:
        d = self.dist
        if latest_checkpoint(self.dir) is not None and not self.opts.resume:  # every rank stops, none waits
            raise ConfigError(f"{self.dir} already has checkpoints: pass --resume to continue the run, or "
                              "--run NEW_NAME")
        if d.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            if not self.opts.resume:
                (self.dir / "metrics.jsonl").unlink(missing_ok=True)
        barrier()
        done = self.dir / "done.json"
        if self.opts.resume and done.is_file():
            if json.loads(done.read_text()).get("config") != config_fingerprint(self.key):
                raise ConfigError(f"cannot resume {self.dir}: it was trained with other settings; resume with the "
                                  "same options or start a new run with --run NAME")
            self._load_outputs()
            self.log.info("vqa stage %s: already finished (%s)", self.stage, self.dir)
            return json.loads(done.read_text()).get("last", {})
        if self.opts.resume and (ckpt := latest_checkpoint(self.dir)) is not None:
            self._load(ckpt)
        self.log.info("vqa stage %s: %d samples, %d steps of %d (from step %d), %d trainable parameters", self.stage,
                      len(self.samples), self.total, self.opts.batch_size, self.step,
                      sum(p.numel() for p in self.params))
        last: dict = {}
        self.model.train()
        t0, tokens_seen = time.perf_counter(), 0
        tracker = make_tracker(self.opts.report_to if d.is_main else "none", self.dir, f"vqa-stage{self.stage}",
                               self.key)
        try:
            last = self._loop(tracker, t0, tokens_seen)
        finally:
            tracker.close()
        if d.is_main:
            self._save_outputs()
            atomic_write_json(done, {"config": config_fingerprint(self.key), "last": last})
        barrier()
        return last

    def _loop(self, tracker, t0: float, tokens_seen: int) -> dict:
        d, last = self.dist, {}
        while self.step < self.total:
            batch = self.batch_at(self.step)
            norm = max(1, supervised_tokens([s.enc.labels for s in batch]))
            mine = batch[d.rank::d.world_size]
            loss_sum = torch.zeros((), device=self.device)
            for k in range(0, len(mine), self.opts.micro_batch):
                micro = mine[k:k + self.opts.micro_batch]
                feats = [self.cache.read(s.volume_id) for s in micro]
                with self._autocast():
                    loss = self.model.loss_sum([s.enc.ids for s in micro], [s.enc.labels for s in micro], feats)
                (loss / norm).backward()
                loss_sum += loss.detach()
                tokens_seen += sum(len(s.enc.ids) - 1 + len(f) for s, f in zip(micro, feats))
            loss_sum = self._sum_over_ranks(loss_sum)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, MAX_GRAD_NORM)
            lr = self.sched.get_last_lr()
            self.opt.step()
            self.sched.step()
            self.opt.zero_grad(set_to_none=True)
            self.step += 1
            elapsed = time.perf_counter() - t0
            last = {"step": self.step, "loss": float(loss_sum) / norm, "lr": lr[-1], "grad_norm": float(grad_norm),
                    "tokens_per_s": tokens_seen * d.world_size / max(elapsed, 1e-9)}
            if d.is_main:
                with open(self.dir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(last) + "\n")
                tracker.log(self.step, last)
                if self.step % 10 == 0 or self.step == self.total:
                    self.log.info("vqa stage %s step %d/%d loss %.4f", self.stage, self.step, self.total, last["loss"])
            if self.step % self.opts.checkpoint_every == 0 or self.step == self.total:
                self._save()
        return last

    def _autocast(self):
        on = self.device.type == "cuda" and self.opts.precision == "bf16"
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=on)

    def _sum_over_ranks(self, loss_sum: torch.Tensor) -> torch.Tensor:
        """Sum every trainable gradient (and the loss) over the ranks: each rank's share is already divided by
        the global batch's token count, so the sum is the full batch's gradient."""
        if self.dist.world_size == 1:
            return loss_sum
        import torch.distributed as tdist

        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            tdist.all_reduce(p.grad)
        tdist.all_reduce(loss_sum)
        return loss_sum

    # -- persistence --------------------------------------------------------------------------------
    def _adapter_state(self) -> dict[str, torch.Tensor] | None:
        if self.stage != "2":
            return None
        from peft import get_peft_model_state_dict

        return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(self.model.llm).items()}

    def _projector_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in self.projector.state_dict().items()}

    def _save(self) -> None:
        if not self.dist.is_main:
            return
        import shutil

        target = self.dir / "checkpoints" / f"step-{self.step:08d}"
        with atomic_path(target) as tmp:
            tmp.mkdir()
            save_file(self._projector_state(), str(tmp / "projector.safetensors"))
            if self.stage == "2":
                self.model.llm.save_pretrained(str(tmp / "adapter"))
            torch.save(self.opt.state_dict(), tmp / "optimizer.pt")
            torch.save(rng_state(), tmp / "rng.pt")
            (tmp / "trainer.json").write_text(json.dumps({"step": self.step, "scheduler": self.sched.state_dict(),
                                                          "config": config_fingerprint(self.key)}, default=str))
        for old in sorted((self.dir / "checkpoints").glob("step-*"))[:-(KEEP + 1)]:
            shutil.rmtree(old, ignore_errors=True)

    def _load(self, ckpt: Path) -> None:
        try:
            meta = json.loads((ckpt / "trainer.json").read_text())
        except (OSError, ValueError) as e:
            raise Mv3dError(refused(ckpt, "trainer.json", f"is not the JSON mv3d writes ({e})")) from None
        if meta.get("config") != config_fingerprint(self.key):
            raise ConfigError(f"cannot resume from {ckpt}: it was trained with other settings (LLM, encoder, data, "
                              "LoRA, batch, lr, ...); resume with the same options or start a new run with --run NAME")
        projector = read_safetensors(ckpt, "projector.safetensors", "cpu")
        adapter = read_safetensors(ckpt / "adapter", "adapter_model.safetensors", "cpu") if self.stage == "2" else None
        opt_state, rng = read_pt(ckpt, "optimizer.pt", self.device), read_pt(ckpt, "rng.pt", "cpu")
        if not isinstance(rng, dict) or not isinstance(rng.get("torch"), torch.Tensor):
            raise Mv3dError(refused(ckpt, "rng.pt", "does not hold the random-number state mv3d writes"))
        self.projector.load_state_dict(projector)
        if adapter is not None:
            self._load_adapter(adapter)
        try:
            self.opt.load_state_dict(opt_state)
        except (ValueError, KeyError, TypeError) as e:
            raise Mv3dError(refused(ckpt, "optimizer.pt", f"does not fit this run's optimizer ({e})")) from None
        self.sched.load_state_dict(meta["scheduler"])
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.step = int(meta["step"])
        if self.dist.is_main:  # the steps logged after this checkpoint are redone: their lines go
            log = self.dir / "metrics.jsonl"
            rows = log.read_text().splitlines(True) if log.is_file() else []
            kept = [r for r in rows if r.strip() and json.loads(r)["step"] <= self.step]
            with atomic_path(log) as tmp:
                tmp.write_text("".join(kept))
        self.log.info("vqa stage %s: resumed from %s (step %d)", self.stage, ckpt, self.step)

    def _load_adapter(self, state: dict[str, torch.Tensor]) -> None:
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(self.model.llm, state)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise ConfigError(f"the adapter's weights do not fit this LLM (unexpected {unexpected[:3]}); resume with "
                              "the same --llm")

    def _save_outputs(self) -> None:
        with atomic_path(self.dir / "projector.safetensors") as tmp:
            save_file(self._projector_state(), str(tmp))
        if self.stage == "2":
            with atomic_path(self.dir / "adapter") as tmp:
                self.model.llm.save_pretrained(str(tmp))

    def _load_outputs(self) -> None:
        self.projector.load_state_dict(load_file(str(self.dir / "projector.safetensors")))
        if self.stage == "2":
            self._load_adapter(load_file(str(self.dir / "adapter" / "adapter_model.safetensors")))


__all__ = ["run_vqa_training", "write_model", "StageTrainer"]
