"""MedVista3D: a 3D image tower with the dual pathway, a text tower, projections to a shared
space, a learnable temperature. ``save(dir)`` writes config.json + model.safetensors + text/ (HF
model and tokenizer files); :func:`load_model` rebuilds the model from that directory alone and
never unpickles anything."""

from __future__ import annotations

import copy
import hashlib
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import ConfigError
from ..fs import atomic_path
from .dual import POOLS, encode_dual, pool_width
from .factory import build_backbone, get_model_config
from .text import TextEncoder, resolve_text_model

FORMAT_VERSION = 1
MAX_LOGIT_SCALE = 100.0


TEXT_PROJ = ("linear", "mlp")


def text_projection(hidden: int, dim: int, kind: str) -> nn.Module:
    """Text-tower features (N, hidden) -> (N, dim). ``linear``: the paper's. ``mlp``: Linear-GELU-Linear
    with a 4*dim hidden layer. With the ``statements`` loss both separate "X is present." from "X is
    not present." of a frozen tower (benchmarks/text_ceiling.py), and the linear map learns better
    in the chain (benchmarks/learnability.py: 0.847 against 0.789 for vit-tiny)."""
    if kind == "linear":
        return nn.Linear(hidden, dim, bias=False)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(hidden, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
    raise ConfigError(f"model config 'text_proj': {kind!r} is not one of {', '.join(TEXT_PROJ)}")


def weights_hash(module: nn.Module, salt: bytes = b"") -> str:
    """12 hex digits of sha256 over ``salt`` and every tensor of ``module.state_dict()`` (name, shape, fp32 bytes)."""
    h = hashlib.sha256(salt)
    for name, w in module.state_dict().items():
        w = w.detach().to("cpu", torch.float32).contiguous()
        h.update(name.encode() + str(tuple(w.shape)).encode() + w.numpy().tobytes())
    return h.hexdigest()[:12]


class MedVista3D(nn.Module):
    def __init__(self, config: dict | str, *, text_dir: str | Path | None = None):
        super().__init__()
        self.config = copy.deepcopy(get_model_config(config) if isinstance(config, (str, Path)) else config)
        cfg = self.config
        self.n_regions = int(cfg.get("n_regions", 10))
        self.pool = str(cfg.get("pool", "mean"))  # token pooling of both pathways: mean (paper) | max | meanmax
        if self.pool not in POOLS:
            raise ConfigError(f"model config 'pool': {self.pool!r} is not one of {', '.join(POOLS)}")
        self.image = build_backbone(cfg["image"])
        if text_dir is not None:
            self.text = TextEncoder.load(text_dir)
        else:
            tcfg = dict(cfg["text"])
            path, opts = resolve_text_model(tcfg.pop("model"))
            self.text = TextEncoder(path, **{**opts, **tcfg})
        dim = int(cfg["embed_dim"])
        self.image_proj = nn.Linear(self.image.embed_dim * pool_width(self.pool), dim, bias=False)
        self.text_proj = text_projection(self.text.hidden_size, dim, str(cfg.get("text_proj", "linear")))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / float(cfg.get("init_temperature", 0.07)))))

    def scale(self) -> torch.Tensor:
        return self.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)

    # -- the image encoder API (shared by zero-shot, retrieval and the downstream stages) --------------
    def image_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """x (B, 1, D, H, W) -> the backbone's final tokens (B, N, C), after every block and the final
        norm and before any pooling, and their grid (d, h, w), N = d*h*w in row-major (D, H, W) order.
        No backbone has a class token. vit-tiny at 32x64x64: 512 tokens x 64; ViT-B at 96x320x320:
        2,400 x 768; UniMiSS-Small at 96x320x320: 6x10x10 = 600 x 512 (stage 4). For UniMiSS's
        multi-scale maps (U-Net skips) use ``model.image.forward_pyramid(x)``."""
        early, grid = self.image.forward_early(x)  # (B, N, C)
        return self.image.forward_late(early), grid  # (B, N, C)

    def image_features(self, x: torch.Tensor, masks: torch.Tensor | None = None):
        """The pooled, unprojected image features: what the projections map into the shared space.

        x (B, 1, D, H, W) -> (B, C') with C' = C x pool_width (the config's ``pool``: 2C for meanmax).
        With masks (B, D, H, W) uint16 bitmask -> (global (B, C'), local (B, R, C') zeros where absent,
        present (B, R) bool): the dual pathway's features per region."""
        feats = encode_dual(self.image, x, masks, self.n_regions, pool=self.pool)
        if masks is None:
            return feats["global"]  # (B, C')
        return feats["global"], feats["local"], feats["present"]

    @property
    def image_identity(self) -> str:
        """Identity of the image tower (its config and every weight): the key of feature caches such as
        VQA's token cache. Changes with any image weight, never with a text weight or the projections."""
        config = json.dumps(self.config["image"], sort_keys=True).encode()
        return f"mv3d-image:{self.config['image']['backbone']}-{weights_hash(self.image, config)}"

    def encode_image(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """x (B, 1, D, H, W), masks (B, D, H, W) uint16 bitmask | None -> ``global`` (B, E),
        ``local`` (B, R, E) (zeros where absent), ``present`` (B, R) bool; L2-normalised."""
        feats = encode_dual(self.image, x, masks, self.n_regions, pool=self.pool)
        local = F.normalize(self.image_proj(feats["local"]), dim=-1) * feats["present"][..., None]
        return {"global": F.normalize(self.image_proj(feats["global"]), dim=-1), "local": local,
                "present": feats["present"]}

    def encode_text_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.project_text(self.text(input_ids, attention_mask))  # (N, E)

    def project_text(self, features: torch.Tensor) -> torch.Tensor:
        """Pooled text-tower features (N, H) -> the shared space (N, E), L2-normalised."""
        return F.normalize(self.text_proj(features), dim=-1)

    def _text_in(self, texts: dict[str, torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """Tokenised texts, or pooled features (N, H) from a frozen text tower -> (N, E)."""
        if isinstance(texts, torch.Tensor):
            return self.project_text(texts)
        return self.encode_text_tokens(texts["input_ids"], texts["attention_mask"])

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        device = self.logit_scale.device
        tok = {k: v.to(device) for k, v in self.text.tokenize(list(texts)).items()}
        return self.encode_text_tokens(tok["input_ids"], tok["attention_mask"])

    def forward(self, image: torch.Tensor, masks: torch.Tensor | None, report: dict[str, torch.Tensor] | torch.Tensor,
                regions: dict[str, torch.Tensor] | torch.Tensor | None = None,
                region_index: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """One training forward (what DDP wraps). ``report``/``regions`` are tokenised texts
        (input_ids, attention_mask) or pooled features (N, H) of a frozen text tower;
        ``region_index`` (M, 2) = (sample, region) of each region text. Returns the loss inputs of
        :class:`mv3dtk.train.losses.MedVista3DLoss`."""
        img = self.encode_image(image, masks)
        text_local = torch.zeros_like(img["local"])  # (B, R, E)
        valid = torch.zeros_like(img["present"])  # (B, R)
        if regions is not None and region_index is not None and len(region_index):
            emb = self._text_in(regions)  # (M, E)
            text_local = text_local.index_put((region_index[:, 0], region_index[:, 1]), emb.to(text_local.dtype))
            valid = valid.index_put((region_index[:, 0], region_index[:, 1]), torch.ones_like(region_index[:, 0],
                                                                                          dtype=torch.bool))
        return {"image_global": img["global"], "image_local": img["local"], "region_present": img["present"],
                "text_global": self._text_in(report),
                "text_local": text_local, "text_local_valid": valid, "logit_scale": self.scale()}

    @property
    def text_identity(self) -> str:
        """Identity of the text tower as this model uses it (encoder + projection): the ``encoder``
        value of rows that ``mv3d index-texts --encoder <model dir>`` stores. Changes with any weight."""
        return f"mv3d:{self.text.identity}+proj-{weights_hash(self.text_proj)}"

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        with atomic_path(directory) as tmp:
            tmp.mkdir()
            state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items() if not k.startswith("text.")}
            save_file(state, str(tmp / "model.safetensors"), metadata={"format": "mv3d", "version": str(FORMAT_VERSION)})
            (tmp / "config.json").write_text(json.dumps({**self.config, "format_version": FORMAT_VERSION}, indent=2))
            self.text.save(tmp / "text")
        return directory


def load_model(path: str | Path, *, map_location: str | torch.device = "cpu") -> MedVista3D:
    """Rebuild a saved MedVista3D from its directory alone (config.json, model.safetensors, text/)."""
    path = Path(path)
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise ConfigError(f"{path} is not a saved mv3d model (needs config.json, model.safetensors and text/); "
                          "point at pretrain/<run>/model/")
    config = json.loads((path / "config.json").read_text())
    if config.pop("format_version", 0) > FORMAT_VERSION:
        raise ConfigError(f"{path} was saved by a newer mv3d; upgrade mv3d")
    model = MedVista3D(config, text_dir=path / "text")
    load_weights(model, path, map_location=map_location)
    return model.to(map_location)


def load_weights(model: MedVista3D, path: str | Path, *, map_location: str | torch.device = "cpu") -> None:
    """Load ``path/model.safetensors`` (all but the text tower, which lives in ``path/text``) into
    ``model``; weights that do not fit the model's config are an error."""
    path = Path(path)
    try:
        state = load_file(str(path / "model.safetensors"), device=str(map_location))
    except (SafetensorError, OSError) as e:  # e.g. a pickle in its place: safetensors never unpickles
        raise ConfigError(f"{path / 'model.safetensors'} is not a safetensors file written by mv3d ({e}); nothing in "
                          "it was run. Point at a model that MedVista3D.save wrote (pretrain/<run>/model/)") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("text.")]
    if missing or unexpected:
        raise ConfigError(f"{path}: weights do not match the config (missing {missing[:5]}, unexpected "
                          f"{unexpected[:5]}); the files are from different models")
