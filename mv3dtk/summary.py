"""``mv3d summary``: the headline numbers of a project's latest evaluation on one screen.

Reads the ``metrics.json`` of the latest ``mv3d zeroshot`` and ``mv3d retrieve`` runs (the
manifest's ``zeroshot.run`` / ``retrieve.run`` artifacts, else the ``<task>/latest`` links) and
picks: per zero-shot mode the macro AUROC (random: 0.5), weighted F1 and accuracy; report -> volume
recall@5/@10, volume -> volume MAP@5 and region grounding top-10, each beside its random-embedding
baseline; and the paths of the plots (``roc.png``, the evaluated model's ``loss.png``) and of the
metrics files. Only the standard library: the metrics files are small JSON.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import MissingInputError
from .project import Project, stage_status

TASKS = ("zeroshot", "retrieve")
REPORT_KS = ("5", "10")
VOLUME_KS = ("5",)
GROUNDING_KS = ("10",)


def latest_run(project: Project, task: str) -> Path | None:
    """The folder of ``task``'s latest run that has a metrics.json: the manifest artifact
    ``<task>.run``, else the ``<task>/latest`` link; None when there is none."""
    for cand in (project.artifact_path(f"{task}.run"), project.root / task / "latest"):
        if cand is not None and (cand / "metrics.json").is_file():
            return cand.resolve()
    return None


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise MissingInputError(f"{path} is not valid JSON ({e}); rerun the stage that wrote it") from None


def _pick(values: dict | None, wanted: tuple[str, ...]) -> dict[str, float | None]:
    """The entries of ``values`` (JSON keys k -> value) for the wanted k, else all of them."""
    values = values or {}
    keys = [k for k in wanted if k in values] or list(values)
    return {k: values[k] for k in keys}


def _loss_plot(model: str | None) -> Path | None:
    """``pretrain/<run>/loss.png`` of a ``pretrain/<run>/model`` directory, if it is there."""
    if not model:
        return None
    plot = Path(model).parent / "loss.png"
    return plot if Path(model).name == "model" and plot.is_file() else None


def _zeroshot(run_dir: Path, m: dict) -> dict:
    modes = {name: {k: mode.get("macro", {}).get(k) for k in ("auroc", "f1_weighted", "accuracy", "n_classes")}
             for name, mode in m.get("modes", {}).items()}
    roc = run_dir / "roc.png"
    return {"run_dir": run_dir, "metrics": run_dir / "metrics.json", "roc": roc if roc.is_file() else None,
            "split": m.get("split"), "n_volumes": m.get("n_volumes"), "model": m.get("model"), "modes": modes}


def _retrieve(run_dir: Path, m: dict) -> dict:
    t = m.get("tasks", {})
    out: dict = {"run_dir": run_dir, "metrics": run_dir / "metrics.json", "split": m.get("split"),
                 "n_volumes": m.get("n_volumes"), "model": m.get("model")}
    if "report" in t:
        r = t["report"]
        out["report"] = {"recall": _pick(r.get("recall"), REPORT_KS), "random": _pick(r.get("random"), REPORT_KS),
                         "chance": _pick(r.get("expected_random"), REPORT_KS), "n_queries": r.get("n_queries"),
                         "pool": r.get("pool")}
    if "volume" in t:
        v = t["volume"]
        out["volume"] = {"map": _pick(v.get("map"), VOLUME_KS), "random": _pick(v.get("random"), VOLUME_KS),
                         "n_queries": v.get("n_queries"), "pool": v.get("pool")}
    if "region" in t:
        g = t["region"]
        out["region"] = {"top_k": _pick(g.get("top_k"), GROUNDING_KS), "random": _pick(g.get("random"), GROUNDING_KS),
                         "n_queries": g.get("n_queries"), "candidates": g.get("candidates")}
    return out


VQA_METRICS = ("bleu1", "meteor", "rouge_l", "cider", "accuracy")
VQA_NAMES = {"bleu1": "BLEU-1", "meteor": "METEOR", "rouge_l": "ROUGE-L", "cider": "CIDEr", "accuracy": "accuracy"}
VQA_CHANCE = {"mc": 0.25, "short": 0.5}


def _vqa(run_dir: Path, m: dict) -> dict:
    return {"run_dir": run_dir, "metrics": run_dir / "metrics.json", "split": m.get("split"),
            "n_items": m.get("n_items"), "model": m.get("model"),
            "per_task": {t: {k: v.get(k) for k in (*VQA_METRICS, "n")} for t, v in m.get("per_task", {}).items()}}


def _segment(run_dir: Path, m: dict) -> dict:
    return {"run_dir": run_dir, "metrics": run_dir / "metrics.json", "mean_dice": m.get("mean_dice"),
            "n_cases": m.get("n_cases"), "fold": m.get("fold"), "init": m.get("init"), "model": m.get("model"),
            "n_classes": len(m.get("per_class", {}))}


def summarize(project_root: str | os.PathLike) -> dict:
    """The summary of the project's latest zero-shot and retrieval runs: keys ``project``,
    ``zeroshot`` and ``retrieve`` (None for a task not run yet), ``loss_plots`` {model: loss.png}
    and ``status`` {task: stage status}. Raises :class:`MissingInputError` when neither ran."""
    project = Project(project_root).require()
    out: dict = {"project": project.root, "zeroshot": None, "retrieve": None, "vqa": None, "segment": None,
                 "loss_plots": {}, "status": {}}
    vqa_dir = latest_run(project, "vqa-eval")
    if vqa_dir is not None:
        out["vqa"] = _vqa(vqa_dir, _read(vqa_dir / "metrics.json"))
    seg_dir = latest_run(project, "segment")
    if seg_dir is not None:
        out["segment"] = _segment(seg_dir, _read(seg_dir / "metrics.json"))
    for task, read in (("zeroshot", _zeroshot), ("retrieve", _retrieve)):
        run_dir = latest_run(project, task)
        if run_dir is not None:
            out[task] = read(run_dir, _read(run_dir / "metrics.json"))
            out["status"][task] = stage_status(project, task)
            model = out[task]["model"]
            if model and model not in out["loss_plots"]:
                out["loss_plots"][model] = _loss_plot(model)
    if all(out[t] is None for t in ("zeroshot", "retrieve", "vqa", "segment")):
        p = project.root
        raise MissingInputError(f"nothing has been evaluated in {p} yet; run: mv3d -P {p} zeroshot --model "
                                f"pretrain/<run>/model  and  mv3d -P {p} retrieve --model pretrain/<run>/model "
                                "(after mv3d pretrain)")
    return out


def to_json(summary: dict) -> dict:
    """The summary with paths as strings (for ``--json``)."""
    if isinstance(summary, dict):
        return {str(k): to_json(v) for k, v in summary.items()}
    if isinstance(summary, (list, tuple)):
        return [to_json(v) for v in summary]
    return str(summary) if isinstance(summary, Path) else summary


# --------------------------------------------------------------------------- the table


def _f(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def _show(path) -> str:
    """A path relative to the working directory when it is inside it, else absolute."""
    if path is None:
        return "-"
    p = Path(path)
    try:
        return str(p.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(p)


def _rows(s: dict) -> list[tuple[str, str, str, str, str]]:
    rows = []
    zs, rt = s["zeroshot"], s["retrieve"]
    if zs:
        for mode, m in zs["modes"].items():
            n = f"{m['n_classes']} labels" if m.get("n_classes") is not None else ""
            rows += [(f"zero-shot {mode}", "AUC", _f(m["auroc"]), "0.500", n),
                     ("", "F1 (weighted)", _f(m["f1_weighted"]), "", ""),
                     ("", "accuracy", _f(m["accuracy"]), "", "")]
    if rt and "report" in rt:
        r = rt["report"]
        for i, k in enumerate(r["recall"]):
            note = f"{r['n_queries']} queries / {r['pool']} volumes" if i == 0 else ""
            chance = r["chance"].get(k)
            note += f"{'; ' if note else ''}chance {_f(chance)}" if chance is not None else ""
            rows.append(("report->volume" if i == 0 else "", f"R@{k}", _f(r["recall"][k]), _f(r["random"].get(k)),
                         note))
    if rt and "volume" in rt:
        v = rt["volume"]
        for i, k in enumerate(v["map"]):
            rows.append(("volume->volume" if i == 0 else "", f"MAP@{k}", _f(v["map"][k]), _f(v["random"].get(k)),
                         f"{v['n_queries']} queries / {v['pool']} volumes" if i == 0 else ""))
    if rt and "region" in rt:
        g = rt["region"]
        for i, k in enumerate(g["top_k"]):
            rows.append(("region grounding" if i == 0 else "", f"top-{k}", _f(g["top_k"][k]), _f(g["random"].get(k)),
                         f"{g['n_queries']} regions / {g['candidates']} texts" if i == 0 else ""))
    if s.get("vqa"):
        for task, m in s["vqa"]["per_task"].items():
            names = [k for k in VQA_METRICS if m.get(k) is not None]
            for i, k in enumerate(names):
                chance = VQA_CHANCE.get(task) if k == "accuracy" else None
                rows.append((f"VQA {task}" if i == 0 else "", VQA_NAMES[k], _f(m[k]),
                             _f(chance) if chance is not None else "", f"{m.get('n')} answers" if i == 0 else ""))
    if s.get("segment"):
        g = s["segment"]
        rows.append(("segmentation", "mean DSC", _f(g["mean_dice"]), "",
                     f"{g['n_classes']} structures, {g['n_cases']} validation cases (fold {g['fold']}, init {g['init']})"))
    return rows


def format_summary(s: dict) -> str:
    """The terminal table: header lines per task, the metrics beside their random baselines,
    the files to look at."""
    lines = [f"mv3d summary of {_show(s['project'])}"]
    for task in TASKS:
        t = s[task]
        if t is None:
            lines.append(f"{task:<9} not run yet; run: mv3d -P {_show(s['project'])} {task} "
                         "--model pretrain/<run>/model")
            continue
        state = s["status"].get(task)
        note = f" [{state}: rerun it]" if state == "stale" else ""
        lines.append(f"{task:<9} run {t['run_dir'].name}: {t['split']}, {t['n_volumes']} volumes, "
                     f"model {_show(t['model'])}{note}")
    if s.get("vqa"):
        v = s["vqa"]
        lines.append(f"{'vqa-eval':<9} run {v['run_dir'].parent.name}: {v['split']}, {v['n_items']} conversations, "
                     f"model {_show(v['model'])}")
    if s.get("segment"):
        g = s["segment"]
        lines.append(f"{'segment':<9} run {g['run_dir'].name}: fold {g['fold']}, model {_show(g['model'])}")
    models = {t["model"] for t in (s["zeroshot"], s["retrieve"]) if t}
    if len(models) > 1:
        lines.append("note: zeroshot and retrieve evaluated different models")
    header = ("task", "metric", "model", "random", "")
    rows = _rows(s)
    w = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    fmt = lambda r: f"{r[0]:<{w[0]}}  {r[1]:<{w[1]}}  {r[2]:>{w[2]}}  {r[3]:>{w[3]}}  {r[4]}".rstrip()  # noqa: E731
    lines += ["", fmt(header), "-" * (sum(w) + 6)] + [fmt(r) for r in rows] + [""]
    files = [("zero-shot metrics", s["zeroshot"] and s["zeroshot"]["metrics"]),
             ("ROC curves", s["zeroshot"] and s["zeroshot"]["roc"]),
             ("retrieval metrics", s["retrieve"] and s["retrieve"]["metrics"]),
             ("VQA metrics", s.get("vqa") and s["vqa"]["metrics"]),
             ("segmentation metrics", s.get("segment") and s["segment"]["metrics"])]
    files = [(name, path) for name, path in files + [("pretraining loss", p) for p in s["loss_plots"].values()] if path]
    width = max(len(name) for name, _ in files)
    lines += [f"{name:<{width}}  {_show(path)}" for name, path in files]
    return "\n".join(lines)
