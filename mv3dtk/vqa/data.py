"""CT-CHAT VQA files: find them, read and check them, keep the items whose volume was prepped.

A file is a JSON list of LLaVA-style items (``dataset/vqa/{train,valid}_vqa.json`` on CT-RATE, and
what ``mv3d synth`` writes)::

    {"id": "...", "image": "train_1_a_1.nii.gz",
     "conversations": [{"from": "human", "value": "<image>\\n... <long_answer>", "type": "free_response"},
                       {"from": "gpt", "value": "..."}, ...]}

Every item is checked when read, so a malformed one stops the run at once with its file, index and
field instead of failing deep inside training.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable

from ..data.ctrate import vqa_json
from ..errors import ConfigError
from .chat import IMAGE_TEXT

__all__ = ["keep_prepped", "read_vqa", "split_of", "volume_id_of", "vqa_files"]

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".npz", ".npy")
_SPLIT = re.compile(r"^(train|valid|validation|val)(?:[_.\-]|$)", re.IGNORECASE)


def volume_id_of(image: str) -> str:
    """``"train_1_a_1.nii.gz"`` (or ``"some/folder/train_1_a_1.npz"``) -> ``"train_1_a_1"``."""
    name = Path(image.replace("\\", "/")).name
    for suffix in VOLUME_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _problem(item: Any) -> str | None:
    """What is wrong with one item (the field and why), or None."""
    if not isinstance(item, dict):
        return f"must be an object with \"image\" and \"conversations\", not {type(item).__name__}"
    image = item.get("image")
    if not isinstance(image, str) or not image.strip():
        return "field \"image\" must be the volume's file name (a non-empty string)"
    turns = item.get("conversations")
    if not isinstance(turns, list) or not turns:
        return "field \"conversations\" must be a non-empty list of turns"
    for k, turn in enumerate(turns):
        want = "human" if k % 2 == 0 else "gpt"
        if not isinstance(turn, dict) or turn.get("from") != want:
            got = turn.get("from") if isinstance(turn, dict) else type(turn).__name__
            return (f"conversations[{k}].from must be \"{want}\" (turns alternate human/gpt from a human one), "
                    f"not {got!r}")
        if not isinstance(turn.get("value"), str):
            return f"conversations[{k}].value must be a string"
    if len(turns) < 2:
        return "field \"conversations\" needs an answer (a gpt turn) after the first question"
    where = [k for k, turn in enumerate(turns) if IMAGE_TEXT in turn["value"]]
    if len(where) != 1 or where[0] % 2:
        found = ", ".join(f"conversations[{k}]" for k in where) or "no turn"
        return f"{IMAGE_TEXT} must appear in exactly one human turn (found in {found})"
    if turns[where[0]]["value"].count(IMAGE_TEXT) != 1:
        return f"conversations[{where[0]}].value holds {IMAGE_TEXT} more than once"
    return None


def read_vqa(path: str | Path) -> list[dict]:
    """The items of one VQA JSON file, each checked and given a ``"volume_id"`` (the image name
    without folder and .nii.gz/.nii/.npz/.npy). A malformed file or item is a ConfigError naming the
    file, the item's index (and id) and the field."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"cannot read the VQA file {p}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"the VQA file {p} is not UTF-8 text ({e.reason}); save it as UTF-8 JSON") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"the VQA file {p} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); "
                          "fix or re-download it") from None
    if not isinstance(data, list):
        raise ConfigError(f"the VQA file {p} must hold a JSON list of items (CT-CHAT format), "
                          f"not a {type(data).__name__}")
    items = []
    for i, item in enumerate(data):
        problem = _problem(item)
        if problem:
            name = f" (id {item['id']!r})" if isinstance(item, dict) and "id" in item else ""
            raise ConfigError(f"{p}: item {i}{name}: {problem}. Fix the item or leave it out of the file")
        items.append({**item, "volume_id": volume_id_of(item["image"])})
    return items


def vqa_files(source: str | Path) -> list[Path]:
    """The VQA files of ``source``: a JSON file as is; a CT-RATE-style root's ``dataset/vqa/*_vqa.json``;
    else the ``*.json`` files directly in the folder. Nothing found is a ConfigError."""
    p = Path(source).expanduser()
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise ConfigError(f"--vqa {source}: no such file or folder. Give a CT-CHAT VQA JSON file or a CT-RATE "
                          f"root with {vqa_json('train').parent}/*_vqa.json")
    found = sorted((p / vqa_json("train").parent).glob("*_vqa.json")) or sorted(p.glob("*.json"))
    if not found:
        raise ConfigError(f"--vqa {source}: no VQA file found (looked for {vqa_json('train').parent}/*_vqa.json "
                          "and *.json in the folder). Give the JSON file itself or its folder")
    return found


def split_of(path: str | Path) -> str | None:
    """``"train"`` or ``"valid"`` when the file name says so (``train_vqa.json``, ``valid_vqa.json``,
    ``validation.json``, ``val-set.json``), else None."""
    m = _SPLIT.match(Path(path).name)
    if not m:
        return None
    return "train" if m.group(1).lower() == "train" else "valid"


def keep_prepped(items: Iterable[dict], volume_ids: Iterable[str]) -> tuple[list[dict], int]:
    """-> (the items whose ``volume_id`` is in ``volume_ids``, how many were skipped)."""
    have = set(volume_ids)
    kept, skipped = [], 0
    for item in items:
        if item["volume_id"] in have:
            kept.append(item)
        else:
            skipped += 1
    return kept, skipped
