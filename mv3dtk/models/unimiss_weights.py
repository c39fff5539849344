"""Official UniMiSS checkpoints into :class:`mv3dtk.models.unimiss.UniMiSS`: the key mapping, position-table
resizing, and a loader that never executes code.

Official checkpoint keys
------------------------
The pre-training checkpoint (``UniMiSS/main.py``) is ``{'student': ..., 'teacher': ..., 'optimizer': ...,
'epoch': ..., 'args': argparse.Namespace, 'loss': ...}``. Student keys start with ``module.backbone.``, teacher
keys with ``backbone.``; the encoder lives under ``transformer.`` (the pre-training model ``MiT`` wraps it as
``self.transformer``). :func:`load_official_state_dict` takes the ``teacher`` (default; ``which='student'`` for
the student, which the official BCV fine-tuning uses), strips ``module.``/``backbone.``, keeps ``transformer.*``,
drops every 2D key (``*2D*``: ``patch_embed2D*``, ``pos_embed2D*``, ``attn.sr2D``) and everything outside the
encoder (decoder ``Dec*``, decoder ``norm``/``cls_tokens0-2``, DINO ``head.*``), then renames (``{i}`` = the
official stage number 1-4, ``{s} = i - 1``; the "3D" infix is optional, as in the BCV 3D-only encoder)::

    official (after transformer.)                 mv3d UniMiSS
    patch_embed3D0.conv.weight                    stem.conv.weight
    patch_embed3D0.norm.{weight,bias}             stem.norm.{weight,bias}
    patch_embed3D{i}.proj.conv.weight             stages.{s}.embed.conv.weight
    patch_embed3D{i}.proj.norm.{weight,bias}      stages.{s}.embed.norm.{weight,bias}
    pos_embed3D{i}      (1, 1+N_i, C_i)           stages.{s}.pos_embed  (1, 1+N, C); stage 4: (1, N, C),
                                                  class row dropped; patch part resized trilinearly
    cls_tokens1         (1, 1, 48)                stages.0.cls_token
    cls_tokens{2,3}.{weight,bias}                 stages.{1,2}.cls_proj.{weight,bias}
    cls_tokens4.{weight,bias}                     -- (unexpected: stage 4 has no class token)
    block{i}.{j}.norm1.*                          stages.{s}.blocks.{j}.norm1.*
    block{i}.{j}.attn.q.* / .kv.* / .proj.*       stages.{s}.blocks.{j}.attn.q.* / .kv.* / .proj.*
    block{i}.{j}.attn.sr3D.{weight,bias}          stages.{s}.blocks.{j}.attn.sr.{weight,bias}
    block{i}.{j}.attn.norm.{weight,bias}          stages.{s}.blocks.{j}.attn.sr_norm.{weight,bias}
    block{i}.{j}.norm2.*                          stages.{s}.blocks.{j}.norm2.*
    block{i}.{j}.mlp.fc1.* / mlp.fc2.*            stages.{s}.blocks.{j}.mlp.fc1.* / mlp.fc2.*
    --                                            norm.{weight,bias} (missing: mv3d's final norm)

Checkpoints are read with ``torch.load(path, map_location="cpu", weights_only=True)`` only;
``argparse.Namespace`` (the official ``args`` entry, a plain attribute bag) is the one class allow-listed.
"""

from __future__ import annotations

import argparse
import math
import pickle
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import Mv3dError
from .base import resize_pos_embed
from .unimiss import Grid, Stage, UniMiSS, _stage_grids

__all__ = ["load_official_checkpoint", "load_official_state_dict"]

_DINO_PREFIXES = ("module.", "backbone.")

_RENAMES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"^patch_embed0\.(conv|norm)\.(.+)$"), r"stem.\1.\2"),
    (re.compile(r"^patch_embed([1-4])\.proj\.(conv|norm)\.(.+)$"), r"stages.{s1}.embed.\2.\3"),
    (re.compile(r"^pos_embed([1-4])$"), r"stages.{s1}.pos_embed"),
    (re.compile(r"^cls_tokens(1)$"), r"stages.{s1}.cls_token"),
    (re.compile(r"^cls_tokens([2-4])\.(weight|bias)$"), r"stages.{s1}.cls_proj.\2"),
    (re.compile(r"^block([1-4])\.(\d+)\.attn\.sr\.(weight|bias)$"), r"stages.{s1}.blocks.\2.attn.sr.\3"),
    (re.compile(r"^block([1-4])\.(\d+)\.attn\.norm\.(weight|bias)$"), r"stages.{s1}.blocks.\2.attn.sr_norm.\3"),
    (re.compile(r"^block([1-4])\.(\d+)\."
                r"((?:norm1|norm2|attn\.q|attn\.kv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(?:weight|bias))$"),
     r"stages.{s1}.blocks.\2.\3"),
]


def _official_to_mv3d(key: str) -> str | None:
    """Canonical official encoder key (no ``transformer.``, no "3D" infix) -> mv3d key, or None."""
    for pat, repl in _RENAMES:
        m = pat.match(key)
        if m:
            if "{s1}" in repl:  # group 1 is the official stage number (1-4); ours counts from 0
                repl = repl.replace("{s1}", str(int(m.group(1)) - 1))
            return m.expand(repl)
    return None


def _strip_dino(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in _DINO_PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p):], True
    return key


def _select(state_dict: Mapping[str, Any], which: str) -> Mapping[str, Any]:
    if which not in ("teacher", "student"):
        raise ValueError(f"which must be 'teacher' or 'student', got {which!r}")
    if "teacher" in state_dict or "student" in state_dict:
        if which not in state_dict or not isinstance(state_dict[which], Mapping):
            have = [k for k in ("teacher", "student") if k in state_dict]
            raise Mv3dError(f"the UniMiSS checkpoint has no {which!r} weights (it has {have}); "
                            f"pass which={have[0]!r}")
        return state_dict[which]
    for k in ("state_dict", "model"):  # other common wrappers
        if k in state_dict and isinstance(state_dict[k], Mapping) and not isinstance(state_dict[k], torch.Tensor):
            return state_dict[k]
    return state_dict


def load_official_state_dict(model: UniMiSS, state_dict: Mapping[str, Any], *, which: str = "teacher",
                             source_input_size: Sequence[int] = (16, 96, 96)) -> tuple[list[str], list[str]]:
    """Load official UniMiSS weights (full DINO checkpoint dict or any part of it) into ``model``.

    Returns ``(missing, unexpected)``: mv3d keys that got no weights (normally only ``norm.weight`` and
    ``norm.bias``) and official encoder keys (DINO prefixes stripped) with no counterpart (normally
    ``transformer.cls_tokens4.weight``/``.bias``). 2D-only keys, the pre-training decoder and the DINO head
    are dropped silently. Position tables built for the model's own ``input_size`` or for
    ``source_input_size`` (the official pre-training crop, 16x96x96, by default) are recognised by their
    lengths (all stages together) and resized trilinearly to the model's grids; the stage-4 class-token
    position is dropped.
    """
    sd = _select(state_dict, which)
    items = [(_strip_dino(str(k)), v) for k, v in sd.items() if isinstance(v, torch.Tensor)]
    if any(k.startswith("transformer.") for k, _ in items):
        items = [(k, v) for k, v in items if k.startswith("transformer.")]
    own = model.state_dict()
    renamed: list[tuple[str, str, torch.Tensor]] = []
    unexpected: list[str] = []
    for key, val in items:
        canon = key.removeprefix("transformer.")
        if "2D" in canon:
            continue  # 2D modality: patch_embed2D*, pos_embed2D*, attn.sr2D
        target = _official_to_mv3d(canon.replace("3D", ""))
        if target is None or target not in own:
            unexpected.append(key)
        else:
            renamed.append((key, target, val))
    if not renamed:
        raise Mv3dError("no UniMiSS encoder weights found in the checkpoint (expected keys like "
                        "'backbone.transformer.block4.0.attn.q.weight'); is this an official UniMiSS file?")
    src_grids = _pos_source_grids(model, [(t, v) for _, t, v in renamed], source_input_size)
    mapped: dict[str, torch.Tensor] = {}
    notes: list[str] = []
    mismatched: list[str] = []
    for key, target, val in renamed:
        if target.endswith(".pos_embed"):
            s = int(target.split(".")[1])
            val = _adapt_pos(val, model.stages[s], src_grids[s], key, notes)
        if tuple(val.shape) != tuple(own[target].shape):
            mismatched.append(f"{key} {tuple(val.shape)} -> {target} {tuple(own[target].shape)}")
            continue
        mapped[target] = val.to(own[target].dtype)
    if mismatched:
        raise Mv3dError("the checkpoint does not fit this UniMiSS configuration (is it the right preset, e.g. "
                        "unimiss-small vs unimiss-tiny-paper?): " + "; ".join(mismatched[:6])
                        + (f"; and {len(mismatched) - 6} more" if len(mismatched) > 6 else ""))
    model.load_state_dict(mapped, strict=False)
    missing = [k for k in own if k not in mapped] + notes
    return missing, unexpected


def _pos_source_grids(model: UniMiSS, renamed: list[tuple[str, torch.Tensor]],
                      source_input_size: Sequence[int]) -> list[Grid]:
    """The grids the checkpoint's position tables were built on, decided for all stages at once: the model's
    own grids if every table fits them (N or 1+N rows), else those of ``source_input_size``."""
    tables = {int(t.split(".")[1]): v for t, v in renamed if t.endswith(".pos_embed")}
    own = [st.pos_grid for st in model.stages]
    src = _stage_grids(source_input_size)[1:]
    for grids in (own, src):
        if all(v.ndim == 3 and v.shape[1] - math.prod(grids[s]) in (0, 1) for s, v in tables.items()):
            return grids
    rows = {f"stage {s + 1}": int(v.shape[1]) if v.ndim == 3 else tuple(v.shape) for s, v in sorted(tables.items())}
    raise Mv3dError(
        f"the checkpoint's position tables ({rows} rows) fit neither this model's grids {own} nor those of "
        f"source_input_size={tuple(source_input_size)} {src}; pass source_input_size=(D, H, W) of the crop "
        f"the checkpoint was built for (the official pre-training used 16x96x96)")


def _adapt_pos(val: torch.Tensor, st: Stage, grid: Grid, key: str, notes: list[str]) -> torch.Tensor:
    """Official (1, [1+]N0, C) table on ``grid`` -> this stage's (1, P + N, C), resized trilinearly."""
    if val.ndim != 3 or val.shape[0] != 1 or val.shape[2] != st.pos_embed.shape[2]:
        return val  # reported as a shape mismatch by the caller
    has_cls = val.shape[1] == math.prod(grid) + 1
    table = resize_pos_embed(val.float(), grid, st.pos_grid, num_prefix=int(has_cls))  # (1, [1+]N, C)
    if st.num_prefix == 0 and has_cls:
        table = table[:, 1:]  # stage 4: drop the class-token position
    elif st.num_prefix == 1 and not has_cls:  # a class-free table (BCV fine-tuning): keep our class position
        table = torch.cat([st.pos_embed.detach()[:, :1].float().cpu(), table], dim=1)
        notes.append(f"{key}[class position] (not in the checkpoint; kept as initialised)")
    return table


def load_official_checkpoint(model: UniMiSS, path: str | Path, *, which: str = "teacher",
                             source_input_size: Sequence[int] = (16, 96, 96)) -> tuple[list[str], list[str]]:
    """Read an official UniMiSS ``.pth`` safely (``weights_only=True``) and load it; see
    :func:`load_official_state_dict`."""
    path = Path(path)
    if not path.is_file():
        raise Mv3dError(f"UniMiSS checkpoint {path} does not exist; download UniMiss_small.pth (links in the "
                        f"UniMiSS README) and give its path")
    try:
        # The official checkpoint stores its argparse arguments under 'args'; a Namespace is a plain attribute
        # bag, so it is the only class allowed beyond tensors and containers. No code is ever unpickled.
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, EOFError, ValueError) as e:
        lines = [re.sub(r"\x1b\[[0-9;]*m", "", ln).strip() for ln in str(e).splitlines()]
        why = [ln for ln in lines if "Unsupported" in ln or "GLOBAL" in ln] or [ln for ln in lines if ln]
        first = (why[0] if why else type(e).__name__).split(" Please use")[0]
        raise Mv3dError(
            f"{path} is not a plain PyTorch state dict that can be loaded with weights_only=True ({first}). "
            f"mv3d never unpickles code from a checkpoint. If you trust the file, re-save only its tensors once, "
            f"outside mv3d (torch.save({{'teacher': <its teacher state dict>}}, 'clean.pth')), and pass clean.pth"
        ) from e
    if not isinstance(obj, Mapping):
        raise Mv3dError(f"{path} holds a {type(obj).__name__}, not a state dict; save model.state_dict() "
                        f"(or the official {{'teacher': ..., 'student': ...}} dict) instead")
    return load_official_state_dict(model, obj, which=which, source_input_size=source_input_size)
