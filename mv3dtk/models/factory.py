"""Model configs (one JSON per architecture, open_clip style) and the backbone registry
(``mv3d.backbones`` entry points, timm-style names)."""

from __future__ import annotations

import copy
import json
from importlib import metadata
from pathlib import Path

from ..errors import ConfigError

CONFIG_DIR = Path(__file__).with_name("configs")
BACKBONES_GROUP = "mv3d.backbones"


def list_models() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def get_model_config(name_or_path: str | Path) -> dict:
    """A config by name (``vit-b``, ``unimiss-small``, ``vit-tiny``, ``unimiss-tiny``) or JSON path."""
    path = Path(name_or_path)
    if not path.suffix == ".json":
        path = CONFIG_DIR / f"{name_or_path}.json"
    if not path.is_file():
        raise ConfigError(f"unknown model config {str(name_or_path)!r}; built in: {', '.join(list_models())}, "
                          "or pass the path of a JSON file")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from e


def backbone_classes() -> dict[str, metadata.EntryPoint]:
    return {ep.name: ep for ep in metadata.entry_points(group=BACKBONES_GROUP)}


def build_backbone(cfg: dict):
    """``{"backbone": "vit", **kwargs}`` -> the backbone module."""
    cfg = copy.deepcopy(cfg)
    name = cfg.pop("backbone", None)
    eps = backbone_classes()
    if name not in eps:
        raise ConfigError(f"unknown backbone {name!r}; installed: {', '.join(sorted(eps))}")
    try:
        return eps[name].load()(**cfg)
    except TypeError as e:
        raise ConfigError(f"backbone {name!r} rejected its config {cfg}: {e}") from e
