"""Finding a VQA run's model, and the terminal table of its evaluation."""

from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError, MissingInputError
from ..project import Project

COLUMNS = ("bleu1", "meteor", "rouge_l", "cider", "accuracy")
CHANCE = {"mc": 0.25, "short": 0.5}  # four options; yes or no


def resolve_vqa_model(project_root: str | Path, run: str | None) -> Path:
    """``vqa/<run>/model`` (``run`` None: the project's latest ``vqa.model``), checked to hold ``vqa.json``."""
    root = Path(project_root)
    if run is None:
        found = Project(root).artifact_path("vqa.model")
        if found is None or not (found / "vqa.json").is_file():
            raise MissingInputError("no --run given and the project has no trained VQA model; pass --run NAME or run: "
                                    "mv3d vqa-train --llm LLAMA_DIR --vqa CTRATE_ROOT")
        return found.resolve()
    if "/" in run or run.startswith("."):
        raise ConfigError(f"--run {run!r}: give the name of a folder under vqa/")
    model = root / "vqa" / run / "model"
    if not (model / "vqa.json").is_file():
        runs = sorted(p.parent.name for p in (root / "vqa").glob("*/model/vqa.json"))
        raise MissingInputError(f"vqa/{run}/model is not a finished VQA run (no vqa.json); finished runs: "
                                f"{', '.join(runs) or 'none'}. Finish it with: mv3d vqa-train --run {run} --resume")
    return model.resolve()


def _f(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def format_table(summary: dict) -> str:
    """Per task: n, BLEU-1, METEOR, ROUGE-L, CIDEr and accuracy (with chance where it has one)."""
    head = ("task", "n", "BLEU-1", "METEOR", "ROUGE-L", "CIDEr", "accuracy")
    rows = []
    for task, m in summary.get("per_task", {}).items():
        acc = m.get("accuracy")
        acc_s = "-" if acc is None else f"{acc:.3f}" + (f" (chance {CHANCE[task]:.2f})" if task in CHANCE else "")
        rows.append((task, str(m.get("n", 0)), *(_f(m.get(c)) for c in COLUMNS[:4]), acc_s))
    w = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    fmt = lambda r: "  ".join(f"{c:<{w[i]}}" if i == 0 else f"{c:>{w[i]}}" for i, c in enumerate(r))  # noqa: E731
    title = (f"vqa-eval on {summary.get('split')}: {summary.get('n_items')} conversations, {summary.get('n_turns')} "
             f"answers; model {summary.get('model')}")
    return "\n".join([title, "", fmt(head), "-" * (sum(w) + 2 * (len(w) - 1)), *map(fmt, rows)])
