"""Text encoders for the text index: one small interface over the offline default (all-MiniLM-L6-v2),
any local Hugging Face directory, and the text tower of a trained mv3d model.

    enc = resolve_encoder("default")                   # or "path/to/hf-dir", or "pretrain/<run>/model"
    enc.identity, enc.dim                              # "all-MiniLM-L6-v2-6a603b46d7af", 384
    enc.encode(["No pleural effusion."])               # (1, 384) float32, L2-normalised, CPU

``identity`` is what the index stores in its ``encoder`` column: :attr:`TextEncoder.identity` for
a Hugging Face model, :attr:`MedVista3D.text_identity` (encoder + projection) for an mv3d model.
Rows made by two encoders never mix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, Sequence, runtime_checkable

import torch

from ..errors import ConfigError, Mv3dError
from ..models.medvista3d import load_model
from ..models.text import TextEncoder, resolve_text_model

DEFAULT_ENCODER = "default"
MV3D_MODEL_FILES = ("config.json", "model.safetensors", "text")


@runtime_checkable
class IndexEncoder(Protocol):
    """What :func:`mv3dtk.index.build_index` and the search need from an encoder."""

    identity: str  # stored in the index's ``encoder`` column
    dim: int  # embedding width E
    kind: str  # "hf" | "mv3d" | anything a caller defines
    name: str  # short human name
    max_length: int  # longer texts are truncated to this many tokens

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """texts -> (N, E) float32, L2-normalised rows, on the CPU, in input order."""

    def n_tokens(self, texts: Sequence[str]) -> list[int]:
        """Tokens of each text before truncation (special tokens included)."""


def _pick_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: this machine has no CUDA GPU visible to torch; use --device cpu")
    return device


def _count_tokens(tokenizer, texts: Sequence[str], max_length: int) -> list[int]:
    """Token counts, tokenising only texts that could exceed ``max_length`` (a token spans at
    least one UTF-8 byte, so a text of fewer bytes than ``max_length - 2`` always fits)."""
    out = [0] * len(texts)
    long = [i for i, t in enumerate(texts) if len(t.encode("utf-8")) + 2 > max_length]
    if long:
        ids = tokenizer([texts[i] for i in long], truncation=False, verbose=False)["input_ids"]
        for i, row in zip(long, ids):
            out[i] = len(row)
    return out


class HFEncoder:
    """A Hugging Face model from a local directory (:class:`mv3dtk.models.text.TextEncoder`),
    mean/CLS pooled and L2-normalised."""

    kind = "hf"

    def __init__(self, spec: str, *, device: str = "auto"):
        path, opts = resolve_text_model(spec)
        self.model = TextEncoder(path, **opts).to(_pick_device(device))
        self.name = self.model.name
        self.identity = self.model.identity
        self.dim = self.model.hidden_size
        self.max_length = self.model.max_length

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        return self.model.encode(list(texts), batch_size=batch_size)  # (N, E)

    def n_tokens(self, texts: Sequence[str]) -> list[int]:
        return _count_tokens(self.model.tokenizer, texts, self.max_length)


class MV3DEncoder:
    """The text tower of a trained mv3d model (``pretrain/<run>/model/``): encoder, projection and
    L2 normalisation, exactly as the model embeds report and region texts."""

    kind = "mv3d"

    def __init__(self, model_dir: str | Path, *, device: str = "auto"):
        self.model = load_model(model_dir, map_location=_pick_device(device)).eval()
        self.name = f"mv3d:{Path(model_dir).resolve().parent.name}"
        self.identity = self.model.text_identity
        self.dim = int(self.model.config["embed_dim"])
        self.max_length = self.model.text.max_length

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        texts = [str(t) for t in texts]
        if not texts:
            return torch.empty(0, self.dim)
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))  # similar lengths share a batch
        step, chunks = max(1, int(batch_size)), []
        with torch.inference_mode():
            for s in range(0, len(order), step):
                chunks.append(self.model.encode_text([texts[i] for i in order[s:s + step]]).float().cpu())  # (b, E)
        out = torch.empty(len(texts), self.dim)
        out[torch.tensor(order)] = torch.cat(chunks)  # back to input order, (N, E)
        return out

    def n_tokens(self, texts: Sequence[str]) -> list[int]:
        return _count_tokens(self.model.text.tokenizer, texts, self.max_length)


def is_mv3d_model_dir(path: Path) -> bool:
    """``config.json`` + ``model.safetensors`` + ``text/``: a directory written by ``MedVista3D.save``."""
    return path.is_dir() and all((path / f).exists() for f in MV3D_MODEL_FILES) and (path / "text").is_dir()


def _candidates(spec: str, project_root: Path | None) -> list[Path]:
    p = Path(spec).expanduser()
    if p.is_absolute() or project_root is None:
        return [p]
    return [project_root / p, p]  # "pretrain/<run>/model" is relative to the project first


def resolve_encoder(spec: str = DEFAULT_ENCODER, *, project_root: str | Path | None = None,
                    device: str = "auto") -> IndexEncoder:
    """``"default"`` (the offline all-MiniLM-L6-v2), a Hugging Face model directory or cached repo
    id, or an mv3d model (``pretrain/<run>/model`` or ``pretrain/<run>``; relative paths are looked
    up in the project first) -> a loaded encoder. Never downloads anything."""
    spec = str(spec).strip()
    if not spec:
        raise ConfigError("--encoder is empty; use 'default', a model directory or pretrain/<run>/model")
    if spec.lower() == DEFAULT_ENCODER:
        return HFEncoder("minilm", device=device)
    root = Path(project_root) if project_root is not None else None
    for path in _candidates(spec, root):
        if is_mv3d_model_dir(path):
            return MV3DEncoder(path, device=device)
        if is_mv3d_model_dir(path / "model"):  # pretrain/<run>
            return MV3DEncoder(path / "model", device=device)
        if (path / "config.json").is_file():
            return HFEncoder(str(path), device=device)
    parts = Path(spec).parts
    if root is not None and parts and parts[0] == "pretrain":
        runs = sorted(d.parent.name for d in (root / "pretrain").glob("*/model") if is_mv3d_model_dir(d))
        raise Mv3dError(f"{root / spec} is not a finished mv3d model (config.json, model.safetensors, text/); "
                        f"runs with a model in {root / 'pretrain'}: {', '.join(runs) or 'none'}. "
                        "Use --encoder pretrain/<run>/model")
    if Path(spec).expanduser().is_absolute() or spec.startswith("."):
        raise Mv3dError(f"--encoder {spec}: no such model directory. Give 'default', a Hugging Face model "
                        "directory (with config.json), or a trained mv3d model: pretrain/<run>/model")
    try:
        return HFEncoder(spec, device=device)  # "minilm" or an org/name repo id in the local HF cache
    except Mv3dError as e:
        where = f" (looked in {root} and {Path.cwd()})" if root is not None else ""
        raise Mv3dError(f"{e}{where}. --encoder takes 'default', a Hugging Face model directory, "
                        "or a trained mv3d model: pretrain/<run>/model") from e
