"""Evaluation metrics against independent computations: scikit-learn on fixed inputs, literal
re-implementations of the peers' loops (CT-CLIP's threshold search and its volume -> volume
script), constructed embeddings with known ranks, and perfect / random extremes."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from sklearn.metrics import (accuracy_score, confusion_matrix, f1_score, precision_score, recall_score,
                             roc_auc_score)

from mv3dtk.eval import metrics as M
from mv3dtk.eval.encode import crop_to_region
from mv3dtk.eval.retrieval import grounding_candidates, region_grounding, report_to_volume, volume_to_volume
from mv3dtk.errors import ConfigError
from mv3dtk.eval.zeroshot import LOCAL_ORGANS, fvlm_prompts, pair_probability, resolve_labels, resolve_prompts

RNG = np.random.default_rng(1234)
Y_FIXED = RNG.integers(0, 2, size=(60, 5)).astype(float)
P_FIXED = np.round(RNG.random((60, 5)) * 0.6 + 0.4 * Y_FIXED * RNG.random((60, 5)), 2)  # ties on purpose


def ctclip_find_threshold(probabilities, true_labels):
    """CT-CLIP's ``bootstrap_values.py::find_threshold``, written as the script does it."""
    best_threshold, best_roc = 0, 10000
    for threshold in np.linspace(0, 1, 100):
        predictions = (probabilities > threshold).astype(int)
        c = confusion_matrix(true_labels, predictions, labels=[0, 1])
        tpr = c[1, 1] / (c[1, 1] + c[1, 0])
        fpr = c[0, 1] / (c[0, 1] + c[0, 0])
        roc = math.sqrt(((1 - tpr) ** 2) + (fpr ** 2))
        if roc <= best_roc:
            best_roc, best_threshold = roc, threshold
    return best_threshold


# --------------------------------------------------------------------------- classification


@pytest.mark.parametrize("j", range(5))
def test_auroc_and_binary_metrics_equal_sklearn(j):
    y, p = Y_FIXED[:, j], P_FIXED[:, j]
    assert M.auroc(y, p) == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    t = M.ctclip_threshold(y, p)
    assert t == ctclip_find_threshold(p, y.astype(int))
    pred = (p > t).astype(int)
    got = M.binary_metrics(y, pred)
    assert got["f1_weighted"] == pytest.approx(f1_score(y, pred, average="weighted"), abs=1e-12)
    assert got["precision"] == pytest.approx(precision_score(y, pred, zero_division=0), abs=1e-12)
    assert got["accuracy"] == pytest.approx(accuracy_score(y, pred), abs=1e-12)
    assert got["sensitivity"] == pytest.approx(recall_score(y, pred), abs=1e-12)
    assert got["specificity"] == pytest.approx(recall_score(y, pred, pos_label=0), abs=1e-12)


def test_threshold_ties_go_to_the_larger_threshold():
    grid = np.linspace(0, 1, 100)
    # every t in [0.2, 0.8) separates perfectly: the largest grid point below 0.8 wins
    y, p = np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.8, 0.9])
    assert M.ctclip_threshold(y, p) == grid[79] == ctclip_find_threshold(p, y)
    # (TPR 1, FPR .5) for t in [0.3, 0.5) and (TPR .5, FPR 0) for t in [0.7, 0.9): both at distance .5
    y, p = np.array([0, 0, 1, 1]), np.array([0.3, 0.7, 0.5, 0.9])
    assert M.ctclip_threshold(y, p) == grid[89] == ctclip_find_threshold(p, y)


def test_binary_metrics_when_nothing_is_predicted_positive():
    y = np.array([0, 1, 1, 0, 0])
    pred = np.zeros(5, dtype=int)
    got = M.binary_metrics(y, pred)
    assert got["precision"] == 0.0 == precision_score(y, pred, zero_division=0)
    assert got["f1_weighted"] == pytest.approx(f1_score(y, pred, average="weighted", zero_division=0))


def test_per_class_leaves_out_missing_labels_and_single_class_columns():
    Y = Y_FIXED[:, :3].copy()
    Y[[0, 5, 9], 1] = np.nan
    Y[:, 2] = 1.0  # one class only: undefined
    rows = M.per_class_metrics(Y, P_FIXED[:, :3], ["a", "b", "c"])
    keep = ~np.isnan(Y[:, 1])
    assert rows[1]["n"] == 57
    assert rows[1]["auroc"] == pytest.approx(roc_auc_score(Y[keep, 1], P_FIXED[keep, 1]))
    assert all(math.isnan(rows[2][m]) for m in M.CLASS_METRICS)
    macro = M.macro_average(rows)
    assert macro["n_classes"] == 2
    assert macro["auroc"] == pytest.approx((rows[0]["auroc"] + rows[1]["auroc"]) / 2)
    assert macro["f1_weighted"] == pytest.approx((rows[0]["f1_weighted"] + rows[1]["f1_weighted"]) / 2)


def test_bootstrap_really_resamples_and_is_seeded():
    names = list("abcde")
    a = M.bootstrap(Y_FIXED, P_FIXED, names, n=40, seed=7)
    b = M.bootstrap(Y_FIXED, P_FIXED, names, n=40, seed=7)
    c = M.bootstrap(Y_FIXED, P_FIXED, names, n=40, seed=8)
    assert a == b and a != c
    ci = a["macro"]["auroc"]
    assert ci["std"] > 0 and ci["lo"] < ci["hi"]
    full = M.macro_average(M.per_class_metrics(Y_FIXED, P_FIXED, names))["auroc"]
    assert ci["lo"] <= full <= ci["hi"] and ci["mean"] != full
    assert set(a["per_class"]) == set(names)
    # the draws are rows sampled with replacement by default_rng(seed).integers(0, V, V)
    seen = []
    M.bootstrap(Y_FIXED, P_FIXED, names, n=3, seed=5, statistic=lambda y, p: seen.append(y) or {"x": 0.0})
    rng = np.random.default_rng(5)
    for y in seen:
        np.testing.assert_array_equal(y, Y_FIXED[rng.integers(0, 60, 60)])


def test_perfect_and_random_scores_give_the_extremes():
    y = np.tile([0.0, 1.0], 500)
    perfect = M.class_metrics(y, y * 0.9 + 0.05)
    assert perfect["auroc"] == 1.0 and perfect["f1_weighted"] == 1.0 and perfect["accuracy"] == 1.0
    assert perfect["precision"] == 1.0 and perfect["sensitivity"] == perfect["specificity"] == 1.0
    rnd = M.class_metrics(y, np.random.default_rng(0).random(len(y)))
    assert abs(rnd["auroc"] - 0.5) < 0.05
    inverted = M.class_metrics(y, 1 - y)
    assert inverted["auroc"] == 0.0


def test_pair_probability_is_the_softmax_over_the_prompt_pair():
    g = torch.nn.functional.normalize(torch.randn(4, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    t = torch.nn.functional.normalize(torch.randn(6, 8, generator=torch.Generator().manual_seed(1)), dim=-1)
    pos, neg = t[:3], t[3:]
    want = torch.stack([torch.softmax(torch.stack([g @ pos[j], g @ neg[j]], -1) * 14.3, -1)[:, 0]
                        for j in range(3)], -1)
    got = pair_probability(g.numpy(), pos.numpy(), neg.numpy(), 14.3)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5)
    local = np.repeat(g.numpy()[:, None], 3, 1)  # (V, L, E) gives the same
    np.testing.assert_allclose(pair_probability(local, pos.numpy(), neg.numpy(), 14.3), got, rtol=1e-6)


def test_organ_mapping_and_fvlm_prompts():
    assert len(LOCAL_ORGANS) == 16 and "Medical material" not in LOCAL_ORGANS and "Lymphadenopathy" not in LOCAL_ORGANS
    assert LOCAL_ORGANS["Arterial wall calcification"] == "mediastinum"
    assert LOCAL_ORGANS["Pleural effusion"] == "lung" and LOCAL_ORGANS["Hiatal hernia"] == "esophagus"
    assert {v for v in LOCAL_ORGANS.values()} == {"lung", "heart", "esophagus", "mediastinum"}
    p = {x.label: x for x in fvlm_prompts()}
    assert (p["Lung nodule"].positive, p["Lung nodule"].negative) == ("Nodule.", "Not Nodule.")
    assert p["Atelectasis"].positive == "Atelectatic." and p["Emphysema"].negative == "Not Emphysema."
    assert p["Pulmonary fibrotic sequela"].positive == "Pulmonary fibrotic."


def test_prompts_from_templates_and_files(tmp_path):
    (p,) = resolve_prompts("ctclip", ["Emphysema"], templates="{} is seen.|No {}.")
    assert (p.positive, p.negative) == ("Emphysema is seen.", "No Emphysema.")
    csv_file = tmp_path / "p.csv"
    csv_file.write_text("label,positive,negative\nCardiomegaly,Big heart.,Normal heart.\nEmphysema,E.,Not E.\n")
    json_file = tmp_path / "p.json"
    json_file.write_text('{"Emphysema": ["E.", "Not E."], "Cardiomegaly": ["Big heart.", "Normal heart."]}')
    for f in (csv_file, json_file):
        got = resolve_prompts(str(f), ["Emphysema", "Cardiomegaly"])
        assert [(x.label, x.positive, x.negative) for x in got] == [
            ("Emphysema", "E.", "Not E."), ("Cardiomegaly", "Big heart.", "Normal heart.")]
    with pytest.raises(ConfigError, match="no prompt for 'Lung nodule'"):
        resolve_prompts(str(csv_file), ["Lung nodule"])
    json_file.write_text('[{"label": "Broken leg", "positive": "a", "negative": "b"}]')
    with pytest.raises(ConfigError, match="unknown label 'Broken leg'"):
        resolve_prompts(str(json_file), ["Emphysema"])
    assert resolve_labels("lung nodule, Emphysema,Lung nodule") == ["Lung nodule", "Emphysema"]


def test_crop_to_region_centres_the_box_on_background():
    img = torch.arange(8 * 8 * 8, dtype=torch.float32).reshape(1, 8, 8, 8)
    region = torch.zeros(8, 8, 8, dtype=torch.bool)
    region[2:4, 1:6, 3] = True  # box 2 x 5 x 1
    out = crop_to_region(img, region, (4, 4, 4))
    assert out.shape == (1, 4, 4, 4)
    # depth 2 -> rows 1..2 of 4; height 5 > 4 -> centre-cropped to 1..4 (4 rows); width 1 -> column 1
    torch.testing.assert_close(out[0, 1:3, :, 1], img[0, 2:4, 1:5, 3])
    assert (out[0, 0] == -1).all() and (out[0, 3] == -1).all() and (out[0, :, :, [0, 2, 3]] == -1).all()
    assert crop_to_region(img, torch.zeros_like(region), (4, 4, 4)) is None


# --------------------------------------------------------------------------- retrieval


def test_target_ranks_with_known_ranks_and_ties_to_the_lower_index():
    sim = np.array([[0.9, 0.1, 0.5, 0.5],   # target 0: best -> rank 0
                    [0.9, 0.1, 0.5, 0.5],   # target 1: worst -> rank 3
                    [0.9, 0.1, 0.5, 0.5],   # target 2: ties with 3, lower index first -> rank 1
                    [0.9, 0.1, 0.5, 0.5]])  # target 3: after its tie -> rank 2
    ranks = M.target_ranks(sim, np.arange(4))
    np.testing.assert_array_equal(ranks, [0, 3, 1, 2])
    assert M.hit_rate_at_k(ranks, [1, 2, 3, 4]) == {1: 0.25, 2: 0.5, 3: 0.75, 4: 1.0}
    # the same order as CT-CLIP's sorted(enumerate(values), key=..., reverse=True)
    for i, row in enumerate(sim):
        order = [j for j, _ in sorted(enumerate(row), key=lambda x: x[1], reverse=True)]
        assert order.index(i) == ranks[i]
        np.testing.assert_array_equal(M.top_k_indices(sim[i:i + 1], 3)[0], order[:3])


def test_top_k_indices_equals_a_stable_full_sort_with_ties_at_the_cut():
    sim = np.round(np.random.default_rng(3).random((50, 40)), 1)  # many ties
    for k in (1, 5, 17, 40, 60):
        np.testing.assert_array_equal(M.top_k_indices(sim, k), np.argsort(-sim, 1, kind="stable")[:, :min(k, 40)])


def ctclip_volume_to_volume(image, labels, k_list):
    """CT-CLIP's ``volume_to_volume_new.py`` loop (pool: volumes with a positive label; the running
    list of per-query means is never reset between k values)."""
    pool = [k for k in range(len(image)) if labels[k].sum() != 0]
    ratios_external, outs = [], []
    for return_n in k_list:
        for i in range(len(image)):
            crosses = [float(image[i] @ image[k] / (np.linalg.norm(image[i]) * np.linalg.norm(image[k])))
                       for k in pool]
            top = [j for j, _ in sorted(enumerate(crosses), key=lambda x: x[1], reverse=True)[:return_n]]
            ratios = []
            for j in top:
                a, b = labels[i], labels[pool[j]]
                both, one = int(((a == 1) & (b == 1)).sum()), int((a != b).sum())
                ratios.append(both / (both + one))
            ratios_external.append(np.mean(ratios))
        outs.append(np.mean(ratios_external))
    return outs


def test_map_at_k_jaccard_matches_ctclips_script_and_a_hand_example():
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((30, 6))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    labels = (rng.random((30, 18)) < 0.15).astype(float)
    labels[:4] = 0  # queries with no positive: in the queries, not in the pool
    ks = [1, 5, 10]
    enc = SimpleNamespace(global_=emb.astype(np.float32), volume_ids=[f"v{i:02d}" for i in range(30)])
    res = volume_to_volume(enc, labels, ks, seed=0)
    assert res.metrics["pool"] == int((labels.sum(1) > 0).sum()) <= 26 and res.metrics["n_queries"] == 30
    want = ctclip_volume_to_volume(emb, labels, ks)
    np.testing.assert_allclose([res.metrics["map_ctclip"][k] for k in ks], want, rtol=1e-6)
    # by hand: two queries, pool of three, Jaccard rows [1, 1/3, 0] and [0, 1/2, 1]
    q = np.array([[1, 1, 0], [0, 0, 1]], float)
    p = np.array([[1, 1, 0], [1, 0, 1], [0, 0, 1]], float)
    sim = np.array([[3, 2, 1], [1, 2, 3]], float)
    assert M.map_at_k_jaccard(sim, q, p, [1, 2]) == pytest.approx({1: 1.0, 2: (2 / 3 + 3 / 4) / 2})
    running = (1 + 1 + 2 / 3 + 3 / 4) / 4  # @2 averages the @1 and the @2 values of both queries
    assert M.map_at_k_jaccard(sim, q, p, [1, 2], cumulative=True) == pytest.approx({1: 1.0, 2: running})
    assert M.map_at_k_jaccard(-sim, q, p, [1]) == {1: 0.0}


def _encoded(global_, reports, local=None, present=None, region_texts=None, region_valid=None):
    V = len(global_)
    return SimpleNamespace(volume_ids=[f"v{i}" for i in range(V)], regions=["heart", "lung"], global_=global_,
                           reports=reports, local=local, present=present, region_texts=region_texts,
                           region_valid=region_valid)


def test_report_to_volume_perfect_random_and_missing_reports():
    V, E = 200, 256
    img = M.random_embeddings(V, E, 11)
    reports = [f"r{i}" for i in range(V)]
    reports[7] = "  "  # no report: not a query, still in the pool
    perfect = report_to_volume(_encoded(img, reports), img.copy(), [1, 5, 10, 50, 100], seed=0)
    assert perfect.metrics["n_queries"] == 199 and perfect.metrics["pool"] == 200
    assert perfect.metrics["recall"] == {1: 1.0, 5: 1.0, 10: 1.0, 50: 1.0, 100: 1.0}
    rnd = report_to_volume(_encoded(img, reports), M.random_embeddings(V, E, 12), [10, 50, 100], seed=0)
    for k in (10, 50, 100):  # chance is k / V
        assert abs(rnd.metrics["recall"][k] - k / V) < 0.1
        assert abs(rnd.metrics["random"][k] - k / V) < 0.1
    assert [r["rank"] for r in perfect.rankings] == [1] * 199
    # a report whose embedding equals volume 3's: its rank is known
    txt = img.copy()
    txt[0] = img[3]
    res = report_to_volume(_encoded(img, reports), txt, [1], seed=0)
    assert res.rankings[0]["rank"] > 1 and res.rankings[0]["top"][0] == "v3"


def test_region_grounding_with_known_ranks_and_duplicate_texts():
    E = 4
    local = np.zeros((3, 2, E), np.float32)
    local[0, 0] = [1, 0.5, 0, 0]  # its text (candidate 0) first
    local[0, 1] = [0, 1, 0, 0]  # candidate 1 first
    local[1, 0] = [0, 0, 0.5, 1]  # its text, candidate 2, second after candidate 3
    local[2, 1] = [0.1, 0, 1, 0.5]  # its text, candidate 3, second after candidate 2
    present = np.array([[True, True], [True, False], [False, True]])
    texts = [["heart A", "lung B"], ["heart C", "lung B"], ["", "lung D"]]
    valid = np.array([[True, True], [True, True], [False, True]])
    enc = _encoded(np.zeros((3, E), np.float32), [""] * 3, local, present, texts, valid)
    cand, keys, queries = grounding_candidates(enc)
    assert cand == ["heart A", "lung B", "heart C", "lung D"]  # "lung B" once: duplicates are one candidate
    assert keys == ["v0/heart", "v0/lung", "v1/heart", "v2/lung"]
    assert queries == [(0, 0, 0), (0, 1, 1), (1, 0, 2), (2, 1, 3)]  # v1/lung: region not in the mask
    res = region_grounding(enc, np.eye(E, dtype=np.float32), keys, queries, [1, 2], seed=0)
    assert [r["rank"] for r in res.rankings] == [1, 1, 2, 2]
    assert res.rankings[3]["top"] == ["v1/heart", "v2/lung"]
    assert res.metrics["top_k"] == {1: 0.5, 2: 1.0}
    assert res.metrics["per_region"]["heart"] == {"n_queries": 2, "top_k": {1: 0.5, 2: 1.0}}
    assert res.metrics["per_region"]["lung"] == {"n_queries": 2, "top_k": {1: 0.5, 2: 1.0}}
