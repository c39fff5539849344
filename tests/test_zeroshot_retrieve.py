"""`mv3d zeroshot` and `mv3d retrieve` on a small synthetic project: the real CLI with --json, the
files and their schemas, the numbers in the files agreeing with each other and with scikit-learn,
and a perfect (oracle) model through the Python API scoring exactly at the top."""

from __future__ import annotations

import csv
import hashlib
import json
import os

import numpy as np
import polars as pl
import pytest
import torch
from sklearn.metrics import roc_auc_score

from helpers import run_mv3d
from test_summary import assert_summary_matches_runs
from mv3dtk import Project
from mv3dtk.data.ctrate import ABNORMALITIES, read_csv_rows, reports_csv
from mv3dtk.data.datasets import PretrainDataset
from mv3dtk.data.store import VolumeStore
from mv3dtk.data.synth import make_synthetic_dataset
from mv3dtk.eval import retrieval
from mv3dtk.eval.encode import load_labels
from mv3dtk.text.zeroshot_prompts import ctclip_prompts
from mv3dtk.eval.runs import resolve_model_dir
from mv3dtk.eval.zeroshot import LOCAL_ORGANS, PER_CLASS_COLUMNS, zero_shot
from mv3dtk.models.factory import get_model_config
from mv3dtk.models.medvista3d import MedVista3D
from mv3dtk.testing.tiny_models import make_tiny_bert

MODEL = "pretrain/tiny/model"


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("zs")
    data = make_synthetic_dataset(root / "data", n_train=2, n_valid=8, shape=(32, 64, 64), seed=0).root
    proj = Project.init(root / "project")
    run_mv3d("-P", str(proj.root), "prep", str(data), "--size", "32", "64", "64", "--spacing", "3", "0.75", "0.75")
    texts = [r["Findings_EN"] for r in read_csv_rows(data / reports_csv("train"))]
    bert = make_tiny_bert(root / "bert", texts, vocab_size=300, seed=0)
    torch.manual_seed(0)
    cfg = get_model_config("vit-tiny")
    cfg["text"] = {"model": str(bert), "pooling": "mean", "max_length": 64}
    MedVista3D(cfg).save(proj.root / MODEL)
    return proj


def _valid_ids(root) -> list[str]:
    v = pl.read_parquet(root / "prep/volumes.parquet")
    return sorted(v.filter((pl.col("split") == "valid") & (pl.col("status") == "ok"))["volume_id"].to_list())


@pytest.fixture(scope="module")
def zeroshot_z1(project):
    return run_mv3d("-P", str(project.root), "zeroshot", "--model", MODEL, "--mode", "global,local,global-crop",
                    "--bootstrap", "5", "--run", "z1", "--json")


@pytest.fixture(scope="module")
def retrieve_r1(project):
    return run_mv3d("-P", str(project.root), "retrieve", "--model", MODEL, "--run", "r1", "--json", "-k", "1,5,10")


def test_zeroshot_cli_writes_consistent_outputs(project, zeroshot_z1):
    root = project.root
    proc = zeroshot_z1
    out = json.loads(proc.stdout)  # stdout holds the JSON only
    assert "macro" in proc.stderr and "AUROC" in proc.stderr  # the table went to stderr
    run = root / "zeroshot" / "z1"
    assert out["run_dir"] == str(run)
    assert json.loads((run / "metrics.json").read_text()) == {k: v for k, v in out.items() if k != "run_dir"}
    ids = _valid_ids(root)
    assert out["n_volumes"] == len(ids) and set(out["modes"]) == {"global", "local", "global-crop"}
    assert out["modes"]["global"]["labels"] == list(ABNORMALITIES)
    assert out["modes"]["local"]["labels"] == [a for a in ABNORMALITIES if a in LOCAL_ORGANS]
    assert out["modes"]["global"]["prompts"][9] == {"label": "Lung nodule", "positive": "Lung nodule is present.",
                                                    "negative": "Lung nodule is not present."}
    for m in out["modes"].values():
        assert {"auroc", "f1_weighted", "precision", "accuracy", "n_classes"} <= set(m["macro"])
        assert m["bootstrap"]["n"] == 5 and m["bootstrap"]["macro"]["auroc"]["lo"] is not None

    probs = pl.read_parquet(run / "probabilities.parquet")
    assert probs.schema == {"volume_id": pl.String, "mode": pl.String, "label": pl.String, "organ": pl.String,
                            "organ_present": pl.Boolean, "probability": pl.Float32, "target": pl.Int8}
    assert probs.height == len(ids) * (18 + 16 + 16)
    assert probs["probability"].is_between(0, 1).all()
    assert probs.filter(pl.col("mode") == "global")["volume_id"].unique(maintain_order=True).to_list() == ids
    local = probs.filter(pl.col("mode") == "local")
    assert (local.filter(~pl.col("organ_present"))["probability"] == 0).all()
    missing = out["modes"]["local"]["organ_missing"]
    assert sum(missing.values()) == local.filter(~pl.col("organ_present")).height

    with open(run / "per_class.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0]) == PER_CLASS_COLUMNS and len(rows) == 18 + 16 + 16
    for row in rows:  # every AUROC in the CSV is sklearn's on the saved probabilities
        sel = probs.filter((pl.col("mode") == row["mode"]) & (pl.col("label") == row["label"]))
        y, p = sel["target"].to_numpy(), sel["probability"].to_numpy()
        if len(np.unique(y)) == 2:
            assert float(row["auroc"]) == pytest.approx(roc_auc_score(y, p), abs=1e-6)
        else:
            assert row["auroc"] == ""
    _assert_roc_plot(run / "roc.png", n_panels=18, n_modes=3)
    assert project.manifest()["artifacts"]["zeroshot.run"]["path"] == "zeroshot/z1"
    assert os.readlink(root / "zeroshot" / "latest") == "z1"


def _assert_roc_plot(path, *, n_panels: int, n_modes: int) -> None:
    """roc.png decodes to the grid's size (6 panels a row, 2.6 in each at 110 dpi) and shows a
    curve of each mode in its own colour (matplotlib's C0, C1, ...) on a white figure."""
    import matplotlib.image as mpimg
    from matplotlib.colors import to_rgb

    img = mpimg.imread(path)[..., :3]  # (H, W, 3) floats in [0, 1]
    cols = min(6, n_panels)
    assert img.shape == (round(2.6 * 110 * -(-n_panels // cols)), round(2.6 * 110 * cols), 3)
    assert (img == 1).all(-1).mean() > 0.5 and img.std() > 0.1  # a white page, not a blank one
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 50  # text, axes, antialiased curves
    ink = (1 - img).reshape(-1, 3)  # how far each pixel is from white
    for i in range(n_modes):  # an antialiased line pixel is its colour blended with white: ink = a * (1 - C)
        d = 1 - np.array(to_rgb(f"C{i}"))
        a = ink @ d / (d @ d)
        line = (a > 0.5) & (np.abs(ink - a[:, None] * d).max(-1) < 0.04)
        assert line.sum() > 300, f"{path}: no curve drawn in colour C{i} ({line.sum()} pixels)"


def test_retrieve_cli_writes_metrics_and_rankings(project, retrieve_r1):
    root = project.root
    proc = retrieve_r1
    out = json.loads(proc.stdout)
    assert "random" in proc.stderr and "report->volume" in proc.stderr
    ids = _valid_ids(root)
    tasks = out["tasks"]
    assert set(tasks) == {"report", "volume", "region"}
    assert set(tasks["report"]["recall"]) == set(tasks["report"]["random"]) == {"1", "5", "10"}
    assert set(tasks["volume"]["map"]) == {"1", "5", "10", "50"} and set(tasks["region"]["top_k"]) == {"10", "50"}
    rk = pl.read_parquet(root / "retrieve/r1/rankings.parquet")
    assert rk.schema == {"task": pl.String, "query": pl.String, "target": pl.String, "rank": pl.Int64,
                         "score": pl.Float64, "top": pl.List(pl.String)}
    rep = rk.filter(pl.col("task") == "report")
    assert rep["query"].to_list() == ids == rep["target"].to_list()
    for k in (1, 5, 10):  # the recall in metrics.json is the one the rankings give
        assert tasks["report"]["recall"][str(k)] == pytest.approx((rep["rank"] <= k).mean())
    assert rep["top"].list.len().to_list() == [10] * len(ids)
    assert rk.filter(pl.col("task") == "region").height == tasks["region"]["n_queries"] > 0
    assert rk.filter(pl.col("task") == "volume").height == tasks["volume"]["n_queries"]
    assert project.manifest()["artifacts"]["retrieve.run"]["path"] == "retrieve/r1"


def test_summary_reads_the_real_runs_back(project, zeroshot_z1, retrieve_r1):
    """`mv3d summary` after the real runs above: its table and --json hold what their files hold."""
    root = project.root
    assert_summary_matches_runs(root, run_mv3d("-P", str(root), "summary").stdout, "z1", "r1")
    data = json.loads(run_mv3d("-P", str(root), "summary", "--json").stdout)
    z, r = json.loads(zeroshot_z1.stdout), json.loads(retrieve_r1.stdout)
    for mode, m in z["modes"].items():
        assert data["zeroshot"]["modes"][mode] == {k: m["macro"][k] for k in ("auroc", "f1_weighted", "accuracy",
                                                                              "n_classes")}
    assert data["retrieve"]["report"]["recall"] == {k: r["tasks"]["report"]["recall"][k] for k in ("5", "10")}
    assert data["retrieve"]["volume"]["map"] == {"5": r["tasks"]["volume"]["map"]["5"]}
    assert data["retrieve"]["region"]["top_k"] == {"10": r["tasks"]["region"]["top_k"]["10"]}
    assert data["zeroshot"]["roc"] == str(root / "zeroshot/z1/roc.png")
    assert data["status"] == {"zeroshot": "done", "retrieve": "done"}
    assert data["loss_plots"] == {str(root / MODEL): None}  # a model saved without pretraining has no loss plot


def test_user_errors_exit_1_with_the_fix(project, mv3d_cli):
    res = mv3d_cli(["zeroshot"], project=project, ok=False)
    assert "no --model given" in res.output and "mv3d pretrain" in res.output
    res = mv3d_cli(["zeroshot", "--model", MODEL, "--labels", "Lung nodule,Broken leg"], project=project, ok=False)
    assert "unknown abnormality 'Broken leg'" in res.output
    res = mv3d_cli(["retrieve", "--model", MODEL, "--tasks", "report,bogus"], project=project, ok=False)
    assert "choose from report, volume, region" in res.output
    res = mv3d_cli(["zeroshot", "--model", "nowhere"], project=project, ok=False)
    assert "not a saved mv3d model" in res.output
    res = mv3d_cli(["zeroshot", "--model", MODEL, "--split", "test"], project=project, ok=False)
    assert "no volume with status ok" in res.output
    assert resolve_model_dir(project.root, MODEL) == (project.root / MODEL).resolve()
    project.update_manifest(lambda m: m["artifacts"].__setitem__("pretrain.model", {"path": MODEL}))
    try:  # no --model: the project's latest pretrained model
        assert resolve_model_dir(project.root, None) == project.root / MODEL
    finally:
        project.update_manifest(lambda m: m["artifacts"].pop("pretrain.model"))


class Oracle(torch.nn.Module):
    """A perfect model: it recognises each volume by its voxels and embeds it next to its labels'
    positive (or negative) prompt, its report and its region texts."""

    def __init__(self, root, scale: float = 10.0):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # .to(device) / .eval() work as on a model
        ds = PretrainDataset(root, split="valid", enriched=False)
        store, ids, L = VolumeStore(root), ds.volume_ids, len(ABNORMALITIES)
        y = load_labels(root, ids, ABNORMALITIES)  # (V, 18)
        items = [ds[i] for i in range(len(ds))]
        region_texts = sorted({t for it in items for t in it["region_texts"] if t})
        V, T = len(ids), len(region_texts)
        E = 2 * L + V + T
        self.config = {"image": {"input_size": [32, 64, 64]}}
        self.text_identity = "oracle"
        self._scale = scale
        self.text: dict[str, torch.Tensor] = {}
        for j, p in enumerate(ctclip_prompts()):
            self.text[p.positive], self.text[p.negative] = torch.eye(E)[2 * j], torch.eye(E)[2 * j + 1]
        for i, it in enumerate(items):
            self.text[it["report"]] = self.text.get(it["report"], torch.zeros(E)) + torch.eye(E)[2 * L + i]
        for t, text in enumerate(region_texts):
            self.text[text] = torch.eye(E)[2 * L + V + t]
        lab = torch.zeros(V, 2 * L)
        lab[:, 0::2], lab[:, 1::2] = torch.tensor(np.nan_to_num(y)), torch.tensor(np.nan_to_num(1 - y))
        self.glob = torch.cat([lab, torch.eye(V), torch.zeros(V, T)], 1)  # (V, E)
        R = len(ds.regions)
        self.loc = torch.zeros(V, R, E)
        for r, region in enumerate(ds.regions):
            cols = [2 * j + s for j, a in enumerate(ABNORMALITIES) if LOCAL_ORGANS.get(a) == region for s in (0, 1)]
            self.loc[:, r, cols] = lab[:, cols]
            for i, it in enumerate(items):
                if it["region_texts"][r]:
                    self.loc[i, r, 2 * L + V + region_texts.index(it["region_texts"][r])] = 1.0
        self.by_hash = {self._key(np.asarray(store.read_volume(v), np.float32)): i for i, v in enumerate(ids)}

    @staticmethod
    def _key(arr: np.ndarray) -> str:
        return hashlib.sha1(np.ascontiguousarray(arr).tobytes()).hexdigest()

    def scale(self) -> torch.Tensor:
        return torch.tensor(self._scale)

    def encode_image(self, x, masks=None):
        idx = [self.by_hash[self._key(x[b, 0].cpu().numpy())] for b in range(len(x))]
        R = self.loc.shape[1]
        present = (torch.zeros(len(x), R, dtype=torch.bool) if masks is None else
                   ((masks.long()[:, None] >> torch.arange(R)[None, :, None, None, None]) & 1).flatten(2).any(-1))
        nrm = torch.nn.functional.normalize
        return {"global": nrm(self.glob[idx], dim=-1), "local": nrm(self.loc[idx], dim=-1) * present[..., None],
                "present": present}

    def encode_text(self, texts):
        return torch.nn.functional.normalize(torch.stack([self.text[t] for t in texts]), dim=-1)


def test_a_perfect_model_scores_at_the_top_through_the_api(project):
    root = project.root
    oracle = Oracle(root)
    g = zero_shot(oracle, root, split="valid", mode="global", bootstrap=3)
    assert g["macro"]["n_classes"] >= 10
    assert g["macro"]["auroc"] == 1.0 and g["macro"]["f1_weighted"] == 1.0 and g["macro"]["accuracy"] == 1.0
    local = zero_shot(oracle, root, mode="local", labels="Cardiomegaly,Lung nodule,Hiatal hernia,Medical material")
    assert local["labels"] == ["Cardiomegaly", "Lung nodule", "Hiatal hernia"]
    assert local["macro"]["auroc"] == 1.0 and sum(local["organ_missing"].values()) == 0
    # swapped templates put the negative prompt first: a perfect model becomes perfectly wrong
    swapped = zero_shot(oracle, root, mode="global", templates="{} is not present.|{} is present.")
    assert swapped["macro"]["auroc"] == 0.0

    _, res = retrieval.evaluate(oracle, root, split="valid", ks=[1, 5], grounding_ks=[1, 10])
    m = {r.name: r.metrics for r in res}
    reports = [PretrainDataset(root, split="valid", enriched=False)[i]["report"] for i in range(len(_valid_ids(root)))]
    first = np.mean([reports.index(r) == i for i, r in enumerate(reports)])  # a shared report: only its 1st wins @1
    assert first < 1.0  # the synthetic data has reconstructions sharing a report
    assert m["report"]["recall"] == {1: pytest.approx(first), 5: 1.0}
    assert m["region"]["top_k"] == {1: 1.0, 10: 1.0}
    y = load_labels(root, _valid_ids(root), ABNORMALITIES)
    assert m["volume"]["map"][1] == pytest.approx((y > 0).any(1).mean())  # its nearest neighbour is itself


def test_report_embeddings_come_from_the_text_index_of_the_same_model(project):
    from mv3dtk import load_model
    from mv3dtk.eval.encode import encode_texts

    root = project.root
    run_mv3d("-P", str(root), "index-texts", "--encoder", MODEL, "--origins", "report")
    model = load_model(root / MODEL)
    ds = PretrainDataset(root, split="valid", enriched=False)
    emb, found = retrieval.index_report_embeddings(root, model.text_identity, ds.volume_ids, ds.reports)
    assert found.all()
    np.testing.assert_allclose(emb, encode_texts(model, ds.reports, device="cpu"), atol=1e-5)
    edited = [ds.reports[0] + " Edited since."] + ds.reports[1:]  # a stale row is never used
    _, found = retrieval.index_report_embeddings(root, model.text_identity, ds.volume_ids, edited)
    assert not found[0] and found[1:].all()
    assert retrieval.index_report_embeddings(root, "another-encoder", ds.volume_ids, ds.reports) is None
    _, res = retrieval.evaluate(model, root, tasks="report", ks=[1, 5])
    assert res[0].metrics["from_index"] == len(ds)
