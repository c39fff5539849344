"""`mv3d summary`: the headline numbers of the latest zeroshot and retrieve runs, read from
metrics.json files shaped exactly as `mv3d zeroshot` / `mv3d retrieve` write them.

Real runs are read back too, with :func:`assert_summary_matches_runs`: after the real `zeroshot`
and `retrieve` CLI runs of test_zeroshot_retrieve.py, and after the scaled-down quickstart recipe
(test_recipes.py), which pretrains the model it evaluates."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from mv3dtk.project import fingerprint
from mv3dtk.summary import format_summary, summarize

ROW = re.compile(r"^(zero-shot \S+|report->volume|volume->volume|region grounding)?\s+"  # task, or "" below it
                 r"(AUC|F1 \(weighted\)|accuracy|R@\d+|MAP@\d+|top-\d+)\s+"  # metric
                 r"(-|\d\.\d{3})(?:\s+(\d\.\d{3}))?(?:\s+(.*))?$")  # model, random, note


def table_rows(text: str) -> dict[tuple[str, str], tuple[str, str | None, str | None]]:
    """The summary table as {(task, metric): (model, random, note)}, a row without a task name
    belonging to the task above it."""
    rows, task = {}, None
    for line in text.splitlines():
        m = ROW.match(line)
        if m:
            task = m.group(1) or task
            rows[(task, m.group(2))] = (m.group(3), m.group(4), m.group(5))
    return rows


def assert_summary_matches_runs(root: Path, text: str, zeroshot: str, retrieve: str) -> None:
    """``text`` (what `mv3d summary` printed) shows the numbers that the files of the real run
    folders ``zeroshot/<zeroshot>`` and ``retrieve/<retrieve>`` hold, recomputed from the
    per-label table and the rankings (not only copied from metrics.json)."""
    text = text[text.index("mv3d summary of"):]  # a recipe's output: only what summary printed
    rows = table_rows(text)

    def row(task: str, metric: str) -> tuple[str, str | None, str | None]:
        assert (task, metric) in rows, f"the summary has no row {metric!r} under {task!r}:\n{text}"
        return rows[(task, metric)]

    for task, run in (("zeroshot", zeroshot), ("retrieve", retrieve)):
        assert f"{task:<9} run {run}: valid, " in text, f"the summary shows no {task} run {run}:\n{text}"
    zdir, rdir = root / "zeroshot" / zeroshot, root / "retrieve" / retrieve
    zm, rm = (json.loads((d / "metrics.json").read_text()) for d in (zdir, rdir))
    assert f"zeroshot  run {zeroshot}: valid, {zm['n_volumes']} volumes" in text
    assert f"retrieve  run {retrieve}: valid, {rm['n_volumes']} volumes" in text
    per_class = pl.read_csv(zdir / "per_class.csv", infer_schema_length=0)  # strings, "" = undefined
    assert zm["modes"]
    for mode in zm["modes"]:  # macro = the mean over the labels where the metric is defined
        mine = per_class.filter(pl.col("mode") == mode)

        def mean(column: str) -> float:
            vals = np.array([float(v) for v in mine[column].to_list() if v not in (None, "", "nan")])
            assert vals.size, f"no label of mode {mode} has a {column}: the run is too small to check"
            return float(vals.mean())

        n = sum(v not in (None, "") for v in mine["auroc"].to_list())
        assert row(f"zero-shot {mode}", "AUC") == (f"{mean('auroc'):.3f}", "0.500", f"{n} labels")
        assert row(f"zero-shot {mode}", "F1 (weighted)")[0] == f"{mean('f1_weighted'):.3f}"
        assert row(f"zero-shot {mode}", "accuracy")[0] == f"{mean('accuracy'):.3f}"
    rk = pl.read_parquet(rdir / "rankings.parquet")
    report, region = rk.filter(pl.col("task") == "report"), rk.filter(pl.col("task") == "region")
    for k in ("5", "10"):  # recall@k: the share of reports whose volume ranks in the top k
        hit = (report["rank"] <= int(k)).mean()
        assert row("report->volume", f"R@{k}")[:2] == (f"{hit:.3f}", f"{rm['tasks']['report']['random'][k]:.3f}")
    assert row("report->volume", "R@5")[2].startswith(f"{report.height} queries / {rm['n_volumes']} volumes")
    vol = rm["tasks"]["volume"]
    assert row("volume->volume", "MAP@5")[:2] == (f"{vol['map']['5']:.3f}", f"{vol['random']['5']:.3f}")
    assert region.height > 0 and row("region grounding", "top-10")[0] == f"{(region['rank'] <= 10).mean():.3f}"
    assert len(rows) == 3 * len(zm["modes"]) + 4, text  # and no other row
    assert str(zdir / "metrics.json") in text and str(zdir / "roc.png") in text and str(rdir / "metrics.json") in text


MODEL = "pretrain/quickstart/model"


def _macro(auroc, f1, acc, n):
    return {"auroc": auroc, "f1_weighted": f1, "precision": 0.3, "accuracy": acc, "sensitivity": 0.7,
            "specificity": 0.6, "n_classes": n}


def zeroshot_metrics(root) -> dict:
    """What eval/zeroshot.run_zeroshot writes (clean_json: int keys are strings, NaN is null)."""
    per = {"Cardiomegaly": {"n": 48, "positives": 10, "auroc": 0.9, "threshold": 0.51, "f1_weighted": 0.8,
                            "precision": 0.6, "accuracy": 0.85, "sensitivity": 0.8, "specificity": 0.87}}
    prompts = [{"label": "Cardiomegaly", "positive": "Cardiomegaly is present.",
                "negative": "Cardiomegaly is not present."}]
    glob = {"mode": "global", "split": "valid", "n_volumes": 48, "labels": ["Cardiomegaly"],
            "macro": _macro(0.712, 0.688, 0.655, 17), "per_class": per, "prompts": prompts}
    local = {**glob, "mode": "local", "macro": _macro(0.745, 0.701, 0.676, 15),
             "per_class": {"Cardiomegaly": {**per["Cardiomegaly"], "organ_missing": 0}},
             "organs": {"Cardiomegaly": "heart"}, "organ_missing": {"Cardiomegaly": 0}}
    return {"task": "zeroshot", "split": "valid", "model": str(root / MODEL), "n_volumes": 48, "logit_scale": 14.3,
            "local_prompts": "same", "prompts": "ctclip", "templates": None, "bootstrap": 0, "seed": 0,
            "modes": {"global": glob, "local": local}}


def retrieve_metrics(root) -> dict:
    """What eval/retrieval.run_retrieve writes."""
    ks = ("5", "10", "50", "100")
    report = {"n_queries": 48, "pool": 48, "no_report": 0,
              "recall": dict(zip(ks, (0.25, 0.4375, 1.0, 1.0))), "random": dict(zip(ks, (0.0833, 0.2083, 1.0, 1.0))),
              "expected_random": dict(zip(ks, (5 / 48, 10 / 48, 1.0, 1.0))), "from_index": 0}
    vks = ("1", "5", "10", "50")
    volume = {"n_queries": 48, "pool": 40, "missing_labels": 0, "map": dict(zip(vks, (0.5, 0.41, 0.38, 0.3))),
              "map_ctclip": dict(zip(vks, (0.5, 0.45, 0.42, 0.39))), "random": dict(zip(vks, (0.2, 0.22, 0.21, 0.2)))}
    region = {"n_queries": 300, "candidates": 280, "top_k": {"10": 0.12, "50": 0.4},
              "random": {"10": 0.036, "50": None},
              "per_region": {"lung": {"n_queries": 96, "top_k": {"10": 0.2, "50": 0.5}}}}
    return {"task": "retrieve", "split": "valid", "model": str(root / MODEL), "n_volumes": 48, "seed": 0,
            "tasks": {"report": report, "volume": volume, "region": region}}


def write_run(project, task: str, run: str, metrics: dict, *, manifest: bool = True, latest: bool = True):
    """A finished run folder as the stage leaves it: files, the <task>/latest link, the manifest."""
    d = project.root / task / run
    d.mkdir(parents=True)
    (d / "metrics.json").write_text(json.dumps(metrics, indent=2))
    if task == "zeroshot":
        (d / "roc.png").write_bytes(b"\x89PNG")
    if latest:
        os.symlink(run, project.root / task / "latest")
    if manifest:
        def change(m):
            m["artifacts"][f"{task}.run"] = {"path": f"{task}/{run}", "fingerprint": fingerprint(d), "stage": task,
                                             "run": f"20260101T000000.000Z-{task}", "created": "2026-01-01T00:00:00Z"}
            m["stages"][task] = {"status": "done", "last_run": f"20260101T000000.000Z-{task}", "error": None,
                                 "inputs": {}, "outputs": [f"{task}.run"]}

        project.update_manifest(change)
    return d


@pytest.fixture
def evaluated(mv3d_project):
    root = mv3d_project.root
    (root / MODEL).mkdir(parents=True)
    (root / "pretrain/quickstart/loss.png").write_bytes(b"\x89PNG")
    write_run(mv3d_project, "zeroshot", "quickstart", zeroshot_metrics(root))
    write_run(mv3d_project, "retrieve", "quickstart", retrieve_metrics(root))
    return mv3d_project


def test_table_has_the_headline_numbers_and_baselines(evaluated, mv3d_cli):
    out = mv3d_cli(["summary"], project=evaluated).output
    lines = out.splitlines()
    row = lambda prefix: next(line for line in lines if line.startswith(prefix)).split()  # noqa: E731
    assert row("zero-shot global") == ["zero-shot", "global", "AUC", "0.712", "0.500", "17", "labels"]
    assert row("zero-shot local")[3:5] == ["0.745", "0.500"]
    assert "0.688" in out and "0.701" in out and "0.655" in out and "0.676" in out  # F1 and accuracy
    assert row("report->volume")[1:4] == ["R@5", "0.250", "0.083"] and "chance 0.104" in out
    r10 = next(line for line in lines if "R@10" in line).split()
    assert r10[:3] == ["R@10", "0.438", "0.208"] and "R@50" not in out
    assert row("volume->volume")[1:4] == ["MAP@5", "0.410", "0.220"] and "MAP@1 " not in out
    assert row("region grounding")[2:5] == ["top-10", "0.120", "0.036"] and "top-50" not in out
    root = evaluated.root
    assert str(root / "zeroshot/quickstart/roc.png") in out
    assert str(root / "zeroshot/quickstart/metrics.json") in out
    assert str(root / "retrieve/quickstart/metrics.json") in out
    assert str(root / "pretrain/quickstart/loss.png") in out
    assert "run quickstart: valid, 48 volumes" in out and "not run yet" not in out


def test_json(evaluated, mv3d_cli):
    data = json.loads(mv3d_cli(["summary", "--json"], project=evaluated).output)
    assert data["zeroshot"]["modes"]["global"] == {"auroc": 0.712, "f1_weighted": 0.688, "accuracy": 0.655,
                                                   "n_classes": 17}
    assert data["retrieve"]["report"]["recall"] == {"5": 0.25, "10": 0.4375}
    assert data["retrieve"]["region"]["random"] == {"10": 0.036}
    assert data["loss_plots"] == {str(evaluated.root / MODEL): str(evaluated.root / "pretrain/quickstart/loss.png")}
    assert data["status"] == {"zeroshot": "done", "retrieve": "done"}


def test_only_zeroshot_gives_a_partial_summary_with_the_next_step(mv3d_project, mv3d_cli):
    write_run(mv3d_project, "zeroshot", "z1", zeroshot_metrics(mv3d_project.root))
    out = mv3d_cli(["summary"], project=mv3d_project).output
    assert "0.712" in out and "report->volume" not in out
    assert f"retrieve  not run yet; run: mv3d -P {mv3d_project.root} retrieve --model" in out


def test_latest_link_is_used_without_a_manifest_entry(mv3d_project):
    write_run(mv3d_project, "retrieve", "r1", retrieve_metrics(mv3d_project.root), manifest=False)
    s = summarize(mv3d_project.root)
    assert s["zeroshot"] is None and s["retrieve"]["run_dir"] == mv3d_project.root / "retrieve/r1"
    assert "zeroshot  not run yet" in format_summary(s)


def test_the_manifest_wins_over_an_older_latest_link(mv3d_project):
    root = mv3d_project.root
    write_run(mv3d_project, "zeroshot", "old", zeroshot_metrics(root), manifest=False)
    new = zeroshot_metrics(root)
    new["modes"]["global"]["macro"]["auroc"] = 0.801
    write_run(mv3d_project, "zeroshot", "new", new, latest=False)
    assert summarize(root)["zeroshot"]["modes"]["global"]["auroc"] == 0.801


def test_nothing_evaluated_is_an_error_with_the_fix(mv3d_project, mv3d_cli):
    res = mv3d_cli(["summary"], project=mv3d_project, ok=False)
    assert res.exit_code == 1
    assert "nothing has been evaluated" in res.output and "run: mv3d -P" in res.output
    assert "zeroshot --model pretrain/<run>/model" in res.output and "Traceback" not in res.output


def test_not_a_project_is_an_error(tmp_path, mv3d_cli):
    res = mv3d_cli(["summary"], project=tmp_path / "nowhere", ok=False)
    assert res.exit_code == 1 and "mv3d init" in res.output
