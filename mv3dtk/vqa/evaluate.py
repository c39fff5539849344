"""``mv3d vqa-eval``'s library: load a trained ``vqa/<run>/model``, answer CT-CHAT conversations turn by
turn with greedy decoding, and score them per task the way CT-CHAT does.

    summary = run_vqa_eval(root, root / "vqa/run1/model", root / "vqa/run1/eval-valid", split="valid", log=log)

* Each conversation is answered turn by turn: the prompt of turn k holds the earlier questions and the
  model's own earlier answers (as a user talking to it would see them). A turn of a task that was not
  asked for (``--tasks``) is not generated; its ground-truth answer stands in the history.
* The task of a turn comes from its ``type`` (:func:`mv3dtk.vqa.metrics.task_of`).
* Items are those of the run's ``--vqa`` sources (or the ones given here) whose volume is in ``split``;
  the volumes' tokens come from the token cache of the run's encoder (filled here when missing, after
  checking that the encoder is still the one the run was trained with).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
from pathlib import Path
from typing import Any, Sequence

import torch

from ..errors import ConfigError, MissingInputError
from ..fs import atomic_path, atomic_write_json
from .chat import encode_prompt
from .features import FeatureCache, build_cache, cache_dir
from .llm import load_llm, stop_ids
from .metrics import TASKS, score, task_of
from .model import Projector, VqaModel

TASK_TOKEN = re.compile(r"\s*<(long_answer|short_answer|multiple_choice|report_generation)>\s*")


def read_card(model_dir: str | Path) -> dict:
    path = Path(model_dir) / "vqa.json"
    if not path.is_file():
        raise MissingInputError(f"{model_dir} is not a trained VQA model (no vqa.json); point at vqa/<run>/model, "
                                "made by: mv3d vqa-train")
    return json.loads(path.read_text())


def load_vqa_model(model_dir: str | Path, *, device: torch.device | str = "cpu", precision: str = "bf16",
                   llm_dir: str | Path | None = None):
    """-> (VqaModel in eval mode, tokenizer, card). The LLM is the one the card names (or ``llm_dir``);
    the adapter and the projector are read from safetensors only."""
    from safetensors.torch import load_file

    model_dir, device = Path(model_dir), torch.device(device)
    card = read_card(model_dir)
    dtype = torch.bfloat16 if device.type == "cuda" and precision == "bf16" else torch.float32
    llm, tok = load_llm(llm_dir or card["llm"], dtype=dtype, device=device)
    if (model_dir / "adapter").is_dir():
        from peft import PeftModel

        llm = PeftModel.from_pretrained(llm, str(model_dir / "adapter"))
    projector = Projector(int(card["feature_dim"]), llm.config.hidden_size)
    projector.load_state_dict(load_file(str(model_dir / "projector.safetensors")))
    model = VqaModel(llm, projector).to(device).eval()
    return model, tok, card


def eval_cache(project_root: Path, card: dict, volume_ids: Sequence[str], *, device, precision: str,
               log: logging.Logger) -> FeatureCache:
    """The run's token cache with ``volume_ids`` in it (encoded here with the run's encoder when missing)."""
    cache = FeatureCache(cache_dir(project_root, card["image_identity"], card.get("token_pool")))
    todo = [v for v in volume_ids if not cache.has(v)]
    if todo:
        from ..models.medvista3d import load_model

        encoder = load_model(card["encoder"], map_location=device)
        if encoder.image_identity != card["image_identity"]:
            raise ConfigError(f"the encoder {card['encoder']} has changed since this VQA model was trained "
                              f"(identity {encoder.image_identity}, trained with {card['image_identity']}); "
                              "evaluate with the encoder it was trained on, or retrain")
        cache = build_cache(encoder, project_root, todo, pool=card.get("token_pool"), device=device,
                            precision=precision, log=log)
    return cache


def clean_question(text: str) -> str:
    """The question as a person reads it: without ``<image>`` and the task token."""
    return TASK_TOKEN.sub(" ", text.replace("<image>", "")).strip()


def _stops_and_pad(tok, model: VqaModel) -> tuple[list[int], int]:
    """The ids that end an answer, and a padding id (the tokenizer's, else the first stop id: Llama-3
    defines no pad token; padded positions are masked anyway)."""
    stops = stop_ids(tok, model.llm)
    return stops, tok.pad_token_id if tok.pad_token_id is not None else stops[0]


def _answer(model: VqaModel, tok, histories: list[list[dict]], feats: list[torch.Tensor], *, max_new_tokens: int,
            stops: list[int], pad: int) -> list[str]:
    prompts = [encode_prompt(tok, h) for h in histories]
    out = model.generate(prompts, feats, max_new_tokens=max_new_tokens, stop_ids=stops, pad_id=pad)
    return [tok.decode(ids, skip_special_tokens=True).strip() for ids in out]


def answer_items(model: VqaModel, tok, items: list[dict], cache: FeatureCache, *, tasks: Sequence[str],
                 max_new_tokens: int, batch_size: int = 4, log: logging.Logger | None = None) -> list[dict]:
    """Greedy answers to every asked turn of ``items``; -> one row per answered turn."""
    log = log or logging.getLogger("mv3d")
    device = next(model.parameters()).device
    stops, pad = _stops_and_pad(tok, model)
    rows: list[dict] = []
    for start in range(0, len(items), batch_size):
        group = items[start:start + batch_size]
        feats = [cache.read(it["volume_id"]).to(device) for it in group]
        histories: list[list[dict]] = [[] for _ in group]
        pairs = [[(c[i], c[i + 1]) for i in range(0, len(c) - 1, 2)] for c in (it["conversations"] for it in group)]
        for k in range(max(len(p) for p in pairs)):
            live = [i for i, p in enumerate(pairs) if k < len(p)]
            asked = [i for i in live if task_of(pairs[i][k][0].get("type")) in tasks]
            answers = dict(zip(asked, _answer(model, tok, [histories[i] + [pairs[i][k][0]] for i in asked],
                                              [feats[i] for i in asked], max_new_tokens=max_new_tokens, stops=stops,
                                              pad=pad))) if asked else {}
            for i in live:
                human, gpt = pairs[i][k]
                said = answers.get(i, gpt["value"])
                histories[i] += [human, {"from": "gpt", "value": said}]
                if i in answers:
                    rows.append({"id": group[i].get("id", ""), "volume_id": group[i]["volume_id"], "turn": k,
                                 "type": human.get("type"), "task": task_of(human.get("type")),
                                 "question": clean_question(human["value"]), "answer": gpt["value"],
                                 "prediction": said})
        log.info("vqa-eval: %d/%d conversations answered", min(start + batch_size, len(items)), len(items))
    return rows


def run_vqa_eval(project_root: str | Path, model_dir: str | Path, out_dir: str | Path, *, split: str = "valid",
                 tasks: Sequence[str] = TASKS, max_new_tokens: int = 512, vqa: Sequence[str] = (),
                 batch_size: int = 4, device: str | None = None, precision: str = "bf16", limit: int | None = None,
                 log: logging.Logger | None = None) -> dict[str, Any]:
    """Answer and score the ``split``'s VQA items; writes ``metrics.json``, ``per_task.csv`` and
    ``predictions.jsonl`` into ``out_dir``; -> the metrics."""
    from ..eval.encode import resolve_device
    from .train import prepped_volumes, vqa_items

    log = log or logging.getLogger("mv3d")
    root, dev = Path(project_root), resolve_device(device)
    card = read_card(model_dir)
    sources = list(vqa) or card.get("vqa") or []
    if not sources:
        raise ConfigError("the run was trained without --vqa sources; pass --vqa CTRATE_ROOT or FILE.json")
    items = vqa_items(sources, prepped_volumes(root), split, log)
    if limit:
        items = items[:limit]
    if not items:
        raise ConfigError(f"no VQA item of {', '.join(map(str, sources))} has a prepped volume in split {split!r}; "
                          "pick another --split or prep those volumes")
    cache = eval_cache(root, card, sorted({it["volume_id"] for it in items}), device=dev, precision=precision, log=log)
    items = [it for it in items if cache.has(it["volume_id"])]
    model, tok, _ = load_vqa_model(model_dir, device=dev, precision=precision)
    rows = answer_items(model, tok, items, cache, tasks=tasks, max_new_tokens=max_new_tokens, batch_size=batch_size,
                        log=log)
    metrics = score(rows)
    summary = {"split": split, "model": str(Path(model_dir).resolve()), "n_items": len(items), "n_turns": len(rows),
               "tasks": list(tasks), "max_new_tokens": max_new_tokens, **metrics}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "predictions.jsonl") as tmp:
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    with atomic_path(out / "per_task.csv") as tmp:
        tmp.write_text(per_task_csv(metrics))
    atomic_write_json(out / "metrics.json", summary)
    return summary


def per_task_csv(metrics: dict) -> str:
    cols = ["task", "n", "bleu1", "meteor", "rouge_l", "cider", "accuracy"]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(cols)
    for task, m in metrics.get("per_task", {}).items():
        w.writerow([task] + ["" if m.get(c) is None else m.get(c) for c in cols[1:]])
    return buf.getvalue()


def ask(project_root: str | Path, model_dir: str | Path, volume_id: str, question: str, *,
        max_new_tokens: int = 512, device: str | None = None, precision: str = "bf16",
        log: logging.Logger | None = None) -> str:
    """One question about one prepped volume -> the model's answer."""
    from ..eval.encode import resolve_device
    from .train import prepped_volumes

    log = log or logging.getLogger("mv3d")
    root, dev = Path(project_root), resolve_device(device)
    card = read_card(model_dir)
    if volume_id not in set(prepped_volumes(root)["volume_id"].to_list()):
        raise ConfigError(f"volume {volume_id!r} is not in prep/volumes.parquet (or failed prep); give a prepped "
                          "volume_id")
    cache = eval_cache(root, card, [volume_id], device=dev, precision=precision, log=log)
    model, tok, _ = load_vqa_model(model_dir, device=dev, precision=precision)
    text = question if "<image>" in question else f"<image>\n{question}"
    stops, pad = _stops_and_pad(tok, model)
    return _answer(model, tok, [[{"from": "human", "value": text}]], [cache.read(volume_id).to(dev)],
                   max_new_tokens=max_new_tokens, stops=stops, pad=pad)[0]
