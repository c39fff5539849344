"""The whole chain learns (issue #6, Deliver 6): synthetic CT-RATE -> prep -> rewrite (rules) ->
pretrain (vit-tiny, CPU, about 6 minutes) -> zero-shot with the CT-CLIP protocol. Untrained, every AUC
sits at 0.5 +- noise. The issue's target, a mean global AUC of 0.80, is asserted; on this seed the chain
measures 0.847 (0.813 on seed 1), see docs/learnability.md. A broken loss, a
text/image misalignment in the loader, a wrong mask bit, a prompt/label mix-up or a lost lung window
all take it below."""

from __future__ import annotations

import json

import pytest

from helpers import run_mv3d

GRID = ["--spacing", "6", "1.5", "1.5"]
SIZE = ["--size", "32", "64", "64"]


@pytest.mark.slow
def test_tiny_pretraining_on_synthetic_data_beats_chance_in_zero_shot(tmp_path):
    import torch

    from mv3dtk import load_model
    from mv3dtk.eval.zeroshot import zero_shot

    data, proj = tmp_path / "data", tmp_path / "project"
    run_mv3d("synth", str(data), "--n-train", "960", "--n-valid", "120", "--shape", "32", "64", "64", *GRID,
             "--seed", "0", timeout=600)
    run_mv3d("init", str(proj))
    run_mv3d("-P", str(proj), "prep", str(data), *GRID, *SIZE, "--workers", "2", timeout=600)
    run_mv3d("-P", str(proj), "rewrite", "--backend", "rules", timeout=600)
    run_mv3d("-P", str(proj), "pretrain", "--backbone", "vit", "--model-config", "vit-tiny", "--freeze-text",
             "--global-text", "statements", "--batch-size", "16", "--epochs", "8", "--warmup-steps", "20",
             "--lr", "1e-3", "--workers", "1", "--run", "learn", timeout=1200)
    rows = [json.loads(x) for x in (proj / "pretrain" / "learn" / "metrics.jsonl").read_text().splitlines()]
    first, last = rows[0], rows[-1]
    assert last["global"] < first["global"] - 0.6  # the contrastive loss really goes down (measured 3.65 -> 2.33)

    torch.manual_seed(0)
    model = load_model(proj / "pretrain" / "learn" / "model").eval()
    glob = zero_shot(model, proj, mode="global")
    loc = zero_shot(model, proj, mode="local")
    assert glob["n_volumes"] == 160 and glob["macro"]["n_classes"] == 18
    # measured on this seed: global 0.847, local 0.849 (benchmarks/learnability.py)
    assert glob["macro"]["auroc"] >= 0.80, glob["per_class"]
    assert loc["macro"]["auroc"] >= 0.78, loc["per_class"]
    # the large or bright findings are learnt (measured: 0.986-1.000 for these seven on seeds 0 and 1;
    # cardiomegaly and hiatal hernia vary with the seed, see docs/learnability.md)
    easy = {k: glob["per_class"][k]["auroc"] for k in (
        "Medical material", "Arterial wall calcification", "Pericardial effusion",
        "Coronary artery wall calcification", "Lymphadenopathy", "Atelectasis", "Pleural effusion")}
    assert min(easy.values()) >= 0.9, easy
    # textural lung findings seen through the lung window (measured: 0.871, 0.977, 0.971)
    lung = {k: glob["per_class"][k]["auroc"] for k in ("Emphysema", "Consolidation", "Interlobular septal thickening")}
    assert min(lung.values()) >= 0.8, lung
    # organ level (measured: 1.000, 1.000, 1.000)
    organ = [loc["per_class"][k]["auroc"] for k in ("Hiatal hernia", "Pericardial effusion", "Arterial wall calcification")]
    assert min(organ) >= 0.9, organ
