"""The local Llama that ``mv3d vqa-train`` builds on: check its folder, load it offline, describe it.

* :func:`check_llm_dir` names every missing piece of the folder at once (config, a Llama architecture,
  safetensors weights, a tokenizer, a chat template) before anything heavy is imported. Pickled weights
  (``pytorch_model.bin``) are refused and never opened: unpickling can run code.
* :func:`load_llm` loads ``LlamaForCausalLM`` and its tokenizer from that folder with the Hugging Face
  offline switches on: nothing is downloaded, ever.
* :func:`stop_ids` gathers every token that ends an assistant turn (Llama-3.1-Instruct ends turns with
  ``<|eot_id|>`` and the text with ``<|end_of_text|>``; generation must stop on both).
* :func:`describe_llm` is the LLM's entry in a trained model's card.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError, Mv3dError
from ..models.text import _offline

__all__ = ["check_llm_dir", "describe_llm", "load_llm", "stop_ids"]

EOT = "<|eot_id|>"
CONVERT_HINT = ("convert them to safetensors first (e.g. load the model once with transformers in a trusted "
                "environment and save it with model.save_pretrained(folder, safe_serialization=True))")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path} is not readable JSON ({e}); restore the file from the model's download") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object; restore the file from the model's download")
    return data


def _architecture_problem(config: dict[str, Any]) -> str | None:
    archs = config.get("architectures") or []
    if config.get("model_type") == "llama" or "LlamaForCausalLM" in archs:
        return None
    what = ", ".join(map(str, archs)) or config.get("model_type") or "no model_type or architectures"
    return f"a Llama architecture (config.json says {what}; mv3d vqa-train needs model_type \"llama\")"


def _weights_problem(d: Path) -> str | None:
    shards = sorted(d.glob("*.safetensors"))
    index = d / "model.safetensors.index.json"
    if index.is_file():
        named = sorted(set(_read_json(index).get("weight_map", {}).values()))
        missing = [n for n in named if not (d / n).is_file()]
        return f"weight shards named in {index.name}: {', '.join(missing)}" if missing else None
    if shards:
        return None
    pickled = sorted(p.name for p in d.glob("*.bin") if p.name.startswith("pytorch_model"))
    if pickled:
        return (f"safetensors weights: only pickled weights ({', '.join(pickled)}) are there, and mv3d never "
                f"unpickles them; {CONVERT_HINT}")
    return "weights (model.safetensors, or a model.safetensors.index.json with its shards)"


def _template_problem(d: Path) -> str | None:
    if (d / "chat_template.jinja").is_file():
        return None
    settings = d / "tokenizer_config.json"
    if settings.is_file() and _read_json(settings).get("chat_template"):
        return None
    return ("a chat template (chat_template.jinja, or \"chat_template\" in tokenizer_config.json): use an "
            "Instruct model, e.g. Llama-3.1-8B-Instruct")


def check_llm_dir(path: str | Path) -> Path:
    """``path`` as a Path when it holds a loadable Llama; else a ConfigError naming everything missing."""
    d = Path(path).expanduser()
    if not d.is_dir():
        raise ConfigError(f"--llm {path}: no such folder. Give a local Llama folder (config.json, safetensors "
                          "weights, tokenizer, chat template), e.g. a download of Llama-3.1-8B-Instruct")
    problems = []
    if (d / "config.json").is_file():
        problems.append(_architecture_problem(_read_json(d / "config.json")))
    else:
        problems.append("config.json")
    problems.append(_weights_problem(d))
    if not ((d / "tokenizer.json").is_file() or (d / "tokenizer.model").is_file()):
        problems.append("a tokenizer (tokenizer.json or tokenizer.model)")
    problems.append(_template_problem(d))
    problems = [p for p in problems if p]
    if problems:
        raise ConfigError(f"the LLM folder {d} lacks " + "; ".join(problems) +
                          ". Give a complete local Llama folder, as downloaded from Hugging Face")
    return d


def load_llm(path: str | Path, *, dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu"):
    """-> (``LlamaForCausalLM`` in eval mode on ``device``, its tokenizer), read from ``path`` alone
    (offline). ``dtype`` defaults to float32; a name such as ``"bfloat16"`` works too."""
    d = check_llm_dir(path)
    _offline()  # before transformers is imported: it reads the offline switches once, at import
    from transformers import AutoTokenizer, LlamaForCausalLM

    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    try:
        model = LlamaForCausalLM.from_pretrained(str(d), dtype=dtype or torch.float32, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise Mv3dError(f"could not load the LLM in {d}: {e}. The folder must be a complete Hugging Face "
                        "Llama model; download it again if files are damaged") from e
    return model.to(device).eval(), tokenizer


def _as_list(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def stop_ids(tokenizer, model) -> list[int]:
    """Token ids that end an assistant turn, deduplicated in this order: the generation config's EOS ids
    (the model config's when it has none), the tokenizer's EOS, and ``<|eot_id|>`` when the vocabulary
    has it. ``model`` may be a PEFT wrapper."""
    gen = getattr(model, "generation_config", None)
    ids = _as_list(getattr(gen, "eos_token_id", None)) or _as_list(getattr(model.config, "eos_token_id", None))
    ids += _as_list(tokenizer.eos_token_id)
    vocab = tokenizer.get_vocab()
    if EOT in vocab:
        ids.append(int(vocab[EOT]))
    out = list(dict.fromkeys(ids))
    if not out:
        raise ConfigError("the LLM defines no end-of-turn token (no eos_token_id in its generation_config.json or "
                          "config.json, no eos_token in its tokenizer); use an Instruct model")
    return out


def describe_llm(path: str | Path) -> dict[str, Any]:
    """What a model card records about the LLM: name (folder, or the Hub id of a cache snapshot),
    architecture, hidden size, layers, vocabulary size and the SHA-256 of config.json."""
    d = Path(path).expanduser().resolve()
    raw = (d / "config.json").read_bytes()
    config = json.loads(raw)
    parts = d.parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        name = parts[-3][len("models--"):].replace("--", "/")  # a Hugging Face cache snapshot
    else:
        name = d.name
    return {"name": name, "architecture": (config.get("architectures") or [config.get("model_type")])[0],
            "hidden_size": config.get("hidden_size"), "layers": config.get("num_hidden_layers"),
            "vocab": config.get("vocab_size"), "config_sha256": hashlib.sha256(raw).hexdigest()}
