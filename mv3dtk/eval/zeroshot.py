"""Zero-shot abnormality detection with CT-CLIP's protocol (``shared/reference/ctclip-fvlm.md`` §3.2)
in three modes:

* ``global``: the volume's global embedding against each label's prompt pair
  ("X is present." / "X is not present."); P(present) = softmax over the pair of the logits
  (cosine x the model's logit scale), element 0. Each volume is encoded once, not once per prompt.
* ``local``: organ-level detection (fVLM's protocol, §5.4): the dual-pathway local embedding of the
  label's organ (:data:`LOCAL_ORGANS`) against the label's prompt pair; a volume whose mask lacks the
  organ gets probability 0 (fVLM scores its NaN as 0) and is counted in ``organ_missing``.
* ``global-crop``: the paper's global-only comparison: the volume cropped to the organ's mask
  bounding box, padded to the model input, encoded by the global pathway.

Organ modes score the whole volume's organ (MedVista3D's dual pathway pools the mask itself), not
fVLM's organ-centred windows. Their prompts default to the same CT-CLIP pair (``local_prompts="same"``):
MedVista3D aligns local embeddings with region sentences and their LLM rewrites, which are
presence/absence statements of that very form ("Pleural effusion is present.");
fVLM's short prompts ("Nodule." / "Not Nodule.", ``local_prompts="fvlm"``) match fVLM's own organ
texts and are there to reproduce its numbers.

Metrics per label (:mod:`mv3dtk.eval.metrics`): AUROC, the CT-CLIP threshold (100-point grid,
closest to the ROC corner, ties to the larger), support-weighted F1, binary precision, accuracy,
sensitivity, specificity; macro means; optional bootstrap intervals that resample volumes. Missing
labels (null in prep/volumes.parquet) are left out per label.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import polars as pl

from ..data.ctrate import ABNORMALITIES
from ..errors import ConfigError, DataError
from ..fs import atomic_path, atomic_write_json, atomic_write_text
from ..log import get_logger
from ..models.medvista3d import load_model
from ..text.zeroshot_prompts import CTCLIP_TEMPLATES, ctclip_prompts
from . import metrics as M
from .encode import encode_crops, encode_split, encode_texts, load_labels
from .plots import roc_grid
from .runs import clean_json, parse_choices

MODES = ("global", "local", "global-crop")
DEFAULT_MODES = ("global", "local")

LOCAL_ORGANS: dict[str, str] = {
    # lung field (fVLM ties Pleural effusion to the lung as well)
    "Emphysema": "lung", "Atelectasis": "lung", "Lung nodule": "lung", "Lung opacity": "lung",
    "Pulmonary fibrotic sequela": "lung", "Pleural effusion": "lung", "Mosaic attenuation pattern": "lung",
    "Peribronchial thickening": "lung", "Consolidation": "lung", "Bronchiectasis": "lung",
    "Interlobular septal thickening": "lung",
    "Cardiomegaly": "heart", "Pericardial effusion": "heart", "Coronary artery wall calcification": "heart",
    "Hiatal hernia": "esophagus",
    # fVLM's organ is the aorta, which RadGenome-ChestCT has no top-level region for: its aorta masks and
    # sentences sit under "mediastinum" (e.g. "mediastinum/aorta"), so mv3d scores this label there.
    "Arterial wall calcification": "mediastinum",
}
"""fVLM's organ <-> abnormality mapping (16 of the 18 labels; Medical material and Lymphadenopathy are
not evaluated locally), over mv3d's RadGenome region names. fVLM's four organs are lung, heart,
esophagus and aorta; mv3d has no ``aorta`` region (RadGenome puts the aorta under ``mediastinum``),
so Arterial wall calcification maps to ``mediastinum``."""

FVLM_SHORT_NAMES = {"Atelectasis": "Atelectatic", "Lung nodule": "Nodule", "Lung opacity": "Opacity",
                    "Pulmonary fibrotic sequela": "Pulmonary fibrotic"}

LOCAL_PROMPT_CHOICES = ("same", "fvlm")


@dataclass(frozen=True)
class Prompt:
    label: str
    positive: str
    negative: str


def fvlm_prompts(labels: Sequence[str] = tuple(LOCAL_ORGANS)) -> list[Prompt]:
    """fVLM's short organ prompts: "<Name>." / "Not <Name>.", with its special names (Atelectatic,
    Nodule, Opacity, Pulmonary fibrotic)."""
    out = []
    for label in labels:
        name = FVLM_SHORT_NAMES.get(label, label)
        out.append(Prompt(label, f"{name}.", f"Not {name}."))
    return out


def _ctclip(labels: Sequence[str], templates: Sequence[str] | str | None = None) -> list[Prompt]:
    if isinstance(templates, str):
        templates = tuple(templates.split("|"))
    pairs = ctclip_prompts(labels=tuple(labels), templates=tuple(templates or CTCLIP_TEMPLATES))
    return [Prompt(*row) for row in pairs]


def read_prompt_file(path: str | Path) -> list[Prompt]:
    """A prompt file: CSV with columns label,positive,negative, or JSON (a list of such objects, or
    {label: [positive, negative]}). Labels must be CT-RATE's abnormality names."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--prompts {path}: no such file; pass 'ctclip' or a CSV/JSON of label,positive,negative")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
            rows = ([{"label": k, "positive": v[0], "negative": v[1]} for k, v in data.items()]
                    if isinstance(data, dict) else list(data))
        else:
            rows = list(csv.DictReader(io.StringIO(text)))
        prompts = [Prompt(str(r["label"]).strip(), str(r["positive"]), str(r["negative"])) for r in rows]
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
        raise ConfigError(f"--prompts {path}: cannot read it ({type(e).__name__}: {e}); write a CSV with the header "
                          "label,positive,negative or a JSON list of {\"label\", \"positive\", \"negative\"}") from None
    bad = [p.label for p in prompts if p.label not in ABNORMALITIES]
    if bad or not prompts:
        what = f"unknown label {bad[0]!r}" if bad else "no prompts"
        raise ConfigError(f"--prompts {path}: {what}; labels must be CT-RATE abnormality names: "
                          f"{', '.join(ABNORMALITIES)}")
    return prompts


def resolve_prompts(spec: str, labels: Sequence[str], templates: Sequence[str] | str | None = None) -> list[Prompt]:
    """``ctclip`` (CT-CLIP's templates, or ``templates``: (positive, negative) with one ``{}`` each, or
    one string "POSITIVE|NEGATIVE") or a prompt file, restricted to ``labels`` in their order."""
    if spec == "ctclip":
        return _ctclip(labels, templates)
    by_label = {p.label: p for p in read_prompt_file(spec)}
    missing = [lab for lab in labels if lab not in by_label]
    if missing:
        raise ConfigError(f"--prompts {spec} has no prompt for {missing[0]!r}; add it or restrict --labels")
    return [by_label[lab] for lab in labels]


def resolve_labels(labels: Sequence[str] | str | None) -> list[str]:
    """None -> the 18 CT-RATE labels; else the given names (comma list or sequence), checked."""
    if labels is None:
        return list(ABNORMALITIES)
    names = [s.strip() for s in labels.split(",")] if isinstance(labels, str) else [str(s).strip() for s in labels]
    names = [n for n in names if n]
    lookup = {a.lower(): a for a in ABNORMALITIES}
    out = []
    for n in names:
        if n.lower() not in lookup:
            raise ConfigError(f"--labels: unknown abnormality {n!r}; choose from: {', '.join(ABNORMALITIES)}")
        if lookup[n.lower()] not in out:
            out.append(lookup[n.lower()])
    if not out:
        raise ConfigError("--labels is empty; name at least one abnormality or leave it out for all 18")
    return out


def resolve_modes(modes: Sequence[str] | str) -> list[str]:
    return parse_choices(modes, MODES, "--mode")


def pair_probability(img: np.ndarray, pos: np.ndarray, neg: np.ndarray, scale: float) -> np.ndarray:
    """img (V, L, E) (or (V, E), broadcast over labels), pos/neg (L, E) prompt embeddings ->
    (V, L) P(present): the softmax over the pair (positive, negative) of the logits cosine x scale."""
    if img.ndim == 2:
        img = img[:, None, :]  # (V, 1, E)
    lp = scale * np.einsum("vle,le->vl", img, pos)  # (V, L)
    ln = scale * np.einsum("vle,le->vl", img, neg)  # (V, L)
    m = np.maximum(lp, ln)
    ep, en = np.exp(lp - m), np.exp(ln - m)
    return ep / (ep + en)


@dataclass
class ModeResult:
    """One mode's outputs: rows follow ``volume_ids``, columns ``labels``."""

    mode: str
    labels: list[str]
    volume_ids: list[str]
    probs: np.ndarray  # (V, L)
    targets: np.ndarray  # (V, L) float, NaN where missing
    organs: list[str | None]  # (L,) the organ of each label (local modes), else None
    organ_present: np.ndarray | None  # (V, L) bool (local modes)
    prompts: list[Prompt]
    per_class: list[dict] = field(default_factory=list)
    macro: dict = field(default_factory=dict)
    bootstrap: dict | None = None

    def metrics(self, split: str) -> dict:
        per = {r["label"]: {k: v for k, v in r.items() if k != "label"} for r in self.per_class}
        out = {"mode": self.mode, "split": split, "n_volumes": len(self.volume_ids), "labels": self.labels,
               "macro": self.macro, "per_class": per,
               "prompts": [{"label": p.label, "positive": p.positive, "negative": p.negative} for p in self.prompts]}
        if self.organ_present is not None:
            missing = (~self.organ_present).sum(0)
            out["organs"] = dict(zip(self.labels, self.organs))
            out["organ_missing"] = {lab: int(n) for lab, n in zip(self.labels, missing)}
            for lab, n in out["organ_missing"].items():
                per[lab]["organ_missing"] = n
        if self.bootstrap is not None:
            out["bootstrap"] = self.bootstrap
            for lab, ci in self.bootstrap["per_class"].items():
                per[lab]["auroc_lo"], per[lab]["auroc_hi"] = ci["lo"], ci["hi"]
        return out


def _text_pairs(model, prompts: list[Prompt], device, precision) -> tuple[np.ndarray, np.ndarray]:
    emb = encode_texts(model, [p.positive for p in prompts] + [p.negative for p in prompts], device=device,
                       precision=precision)  # (2L, E)
    return emb[: len(prompts)], emb[len(prompts):]


def _score(result: ModeResult, bootstrap: int, seed: int) -> ModeResult:
    result.per_class = M.per_class_metrics(result.targets, result.probs, result.labels)
    result.macro = M.macro_average(result.per_class)
    if bootstrap:
        result.bootstrap = M.bootstrap(result.targets, result.probs, result.labels, n=bootstrap, seed=seed)
    return result


def _organ_embeddings(model, project_root, mode: str, split: str, organs: list[str], encoded, **opts):
    """(volume_ids, img (V, L, E), present (V, L)) for the organ of each label: the local embedding
    (``local``) or the encoded organ crop (``global-crop``)."""
    if mode == "local":
        if not encoded.present.any():
            raise DataError(f"no volume of split {split!r} has region masks; --mode local needs RadGenome region "
                            "masks (prep with masks), or use --mode global")
        cols = [encoded.region_index(o) for o in organs]
        return encoded.volume_ids, encoded.local[:, cols], encoded.present[:, cols]
    uniq = list(dict.fromkeys(organs))
    ids, crops, present = encode_crops(model, project_root, split, uniq, **opts)  # (V, C, E), (V, C)
    cols = [uniq.index(o) for o in organs]
    return ids, crops[:, cols], present[:, cols]


def evaluate(model, project_root: str | Path, *, split: str = "valid", modes: Sequence[str] | str = DEFAULT_MODES,
             prompts: str = "ctclip", templates: Sequence[str] | str | None = None, local_prompts: str = "same",
             labels: Sequence[str] | str | None = None, bootstrap: int = 0, seed: int = 0, batch_size: int = 4,
             workers: int = 0, device=None, precision: str = "bf16", encoded=None, log=None) -> list[ModeResult]:
    """Zero-shot probabilities and metrics of ``model`` on ``split`` for each mode. ``encoded``
    (an :class:`~mv3dtk.eval.encode.EncodedSplit` of the same split) skips the volume encoding."""
    log = log or get_logger("zeroshot")
    modes, labels = resolve_modes(modes), resolve_labels(labels)
    if local_prompts not in LOCAL_PROMPT_CHOICES and not Path(local_prompts).is_file():
        raise ConfigError(f"--local-prompts {local_prompts!r}: choose same, fvlm or a prompt file")
    scale = float(model.scale().detach().float().cpu())
    if encoded is None and ("global" in modes or "local" in modes):
        encoded = encode_split(model, project_root, split, batch_size=batch_size, workers=workers, device=device,
                               precision=precision, use_masks="local" in modes, log=log)
    results = []
    for mode in modes:
        if mode == "global":
            ps = resolve_prompts(prompts, labels, templates)
            pos, neg = _text_pairs(model, ps, device, precision)
            ids, probs = encoded.volume_ids, pair_probability(encoded.global_, pos, neg, scale)
            res = ModeResult(mode, labels, ids, probs, load_labels(project_root, ids, labels), [None] * len(labels),
                             None, ps)
        else:
            loc_labels = [lab for lab in labels if lab in LOCAL_ORGANS]
            if not loc_labels:
                raise ConfigError(f"--mode {mode}: none of --labels has an organ; organ-level labels are "
                                  f"{', '.join(LOCAL_ORGANS)}")
            ps = (fvlm_prompts(loc_labels) if local_prompts == "fvlm"
                  else resolve_prompts(prompts if local_prompts == "same" else local_prompts, loc_labels, templates))
            pos, neg = _text_pairs(model, ps, device, precision)
            organs = [LOCAL_ORGANS[lab] for lab in loc_labels]
            ids, img, present = _organ_embeddings(model, project_root, mode, split, organs, encoded,
                                                  batch_size=batch_size, workers=workers, device=device,
                                                  precision=precision, log=log)  # (V, L, E), (V, L)
            probs = np.where(present, pair_probability(img, pos, neg, scale), 0.0)  # absent organ: 0, as fVLM
            res = ModeResult(mode, loc_labels, ids, probs, load_labels(project_root, ids, loc_labels), organs,
                             present, ps)
        results.append(_score(res, bootstrap, seed))
        log.info("zero-shot %s: macro AUROC %.3f, F1 %.3f over %d labels, %d volumes", mode,
                 res.macro["auroc"], res.macro["f1_weighted"], res.macro["n_classes"], len(res.volume_ids))
    return results


def zero_shot(model, project_root: str | Path, *, split: str = "valid", mode: str = "global", prompts: str = "ctclip",
              templates: Sequence[str] | str | None = None, local_prompts: str = "same",
              labels: Sequence[str] | str | None = None, bootstrap: int = 0, seed: int = 0, batch_size: int = 4,
              device=None, log=None) -> dict:
    """The metrics dict of one zero-shot mode (``global``, ``local`` or ``global-crop``) of ``model``
    on ``split`` of the project: ``macro`` (auroc, f1_weighted, precision, accuracy, sensitivity,
    specificity, n_classes), ``per_class`` {label: {...}}, ``n_volumes``, ``prompts``, and for the
    organ modes ``organs`` / ``organ_missing``."""
    (res,) = evaluate(model, project_root, split=split, modes=[mode], prompts=prompts, templates=templates,
                      local_prompts=local_prompts, labels=labels, bootstrap=bootstrap, seed=seed,
                      batch_size=batch_size, device=device, log=log)
    return clean_json(res.metrics(split))


# --------------------------------------------------------------------------- the stage's run


def run_zeroshot(project_root: str | Path, model_dir: str | Path, out_dir: str | Path, *, split: str = "valid",
                 modes: Sequence[str] | str = DEFAULT_MODES, prompts: str = "ctclip",
                 templates: Sequence[str] | str | None = None, local_prompts: str = "same",
                 labels: Sequence[str] | str | None = None, bootstrap: int = 0, seed: int = 0, batch_size: int = 4,
                 workers: int = 0, device=None, precision: str = "bf16", plot: bool = True, log=None) -> dict:
    """Load the model, evaluate, write ``out_dir``/{metrics.json, per_class.csv, probabilities.parquet,
    roc.png} (each atomically; metrics.json last) and return the metrics dict."""
    log = log or get_logger("zeroshot")
    model = load_model(model_dir)
    results = evaluate(model, project_root, split=split, modes=modes, prompts=prompts, templates=templates,
                       local_prompts=local_prompts, labels=labels, bootstrap=bootstrap, seed=seed,
                       batch_size=batch_size, workers=workers, device=device, precision=precision, log=log)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_probabilities(out / "probabilities.parquet", results)
    _write_per_class(out / "per_class.csv", results, split)
    if plot:
        roc_grid(out / "roc.png", results)
    summary = clean_json({
        "task": "zeroshot", "split": split, "model": str(Path(model_dir)), "n_volumes": len(results[0].volume_ids),
        "logit_scale": float(model.scale().detach().float().cpu()), "local_prompts": local_prompts,
        "prompts": prompts, "templates": templates, "bootstrap": bootstrap, "seed": seed,
        "modes": {r.mode: r.metrics(split) for r in results},
    })
    atomic_write_json(out / "metrics.json", summary)
    return summary


def _write_probabilities(path: Path, results: list[ModeResult]) -> None:
    frames = []
    for r in results:
        V, L = r.probs.shape
        present = r.organ_present if r.organ_present is not None else np.ones((V, L), dtype=bool)
        frames.append(pl.DataFrame({
            "volume_id": np.repeat(np.array(r.volume_ids, dtype=object), L).tolist(),
            "mode": [r.mode] * (V * L),
            "label": list(r.labels) * V,
            "organ": list(r.organs) * V,
            "organ_present": present.ravel().tolist() if r.organ_present is not None else [None] * (V * L),
            "probability": r.probs.ravel().astype(np.float32),
            "target": [None if math.isnan(t) else int(t) for t in r.targets.ravel()],
        }, schema={"volume_id": pl.String, "mode": pl.String, "label": pl.String, "organ": pl.String,
                   "organ_present": pl.Boolean, "probability": pl.Float32, "target": pl.Int8}))
    with atomic_path(path) as tmp:
        pl.concat(frames).write_parquet(tmp)


PER_CLASS_COLUMNS = ("mode", "label", "organ", "n", "positives", "organ_missing", "auroc", "threshold",
                     "f1_weighted", "precision", "accuracy", "sensitivity", "specificity", "auroc_lo", "auroc_hi")


def _write_per_class(path: Path, results: list[ModeResult], split: str) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=PER_CLASS_COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in results:
        m = clean_json(r.metrics(split))
        for lab, row in m["per_class"].items():
            w.writerow({"mode": r.mode, "label": lab, "organ": m.get("organs", {}).get(lab, ""),
                        **{k: ("" if row.get(k) is None else row.get(k)) for k in PER_CLASS_COLUMNS[3:]}})
    atomic_write_text(path, buf.getvalue())


def format_table(summary: dict) -> str:
    """A terminal table: one row per label, AUROC / F1 / precision / accuracy per mode, macro last."""
    modes = summary["modes"]
    labels = list(dict.fromkeys(lab for m in modes.values() for lab in m["labels"]))
    width = max(len(x) for x in labels + ["macro"]) + 2
    cols = ("AUROC", "F1", "Prec", "Acc")
    head1 = " " * width + "".join(f"| {name:<{7 * len(cols)}}" for name in modes)
    head2 = f"{'label':<{width}}" + ("| " + "".join(f"{c:<7}" for c in cols)) * len(modes)
    rule = "-" * len(head2.rstrip())
    lines = [f"zero-shot on {summary['split']} ({summary['n_volumes']} volumes), model {summary['model']}",
             head1, head2, rule]

    def cell(d: dict | None) -> str:
        vals = [None] * len(cols) if d is None else [d.get(k) for k in ("auroc", "f1_weighted", "precision",
                                                                           "accuracy")]
        return "| " + "".join(f"{_f(v):<7}" for v in vals)

    for lab in labels:
        lines.append(f"{lab:<{width}}" + "".join(cell(m["per_class"].get(lab)) for m in modes.values()))
    lines.append(rule)
    lines.append(f"{'macro':<{width}}" + "".join(cell(m["macro"]) for m in modes.values()))
    lines.append(f"{'classes scored':<{width}}" + "".join(f"| {m['macro'].get('n_classes', 0):<{7 * len(cols)}}"
                                                          for m in modes.values()))
    for name, m in modes.items():
        if "organ_missing" in m:
            n = sum(m["organ_missing"].values())
            lines.append(f"{name}: {n} (volume, label) pairs had no organ mask and scored 0")
        if "bootstrap" in m:
            ci = m["bootstrap"]["macro"]["auroc"]
            lines.append(f"{name}: macro AUROC {_f(ci['mean'])} [{_f(ci['lo'])}, {_f(ci['hi'])}] "
                         f"({m['bootstrap']['n']} bootstrap resamples, {m['bootstrap']['confidence']:.0%} interval)")
    return "\n".join(line.rstrip() for line in lines)


def _f(v) -> str:
    return "-" if v is None else f"{v:.3f}"
