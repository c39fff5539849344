"""`mv3d pretrain` end to end on CPU: outputs, resume after SIGKILL, torchrun, bad situations."""

from __future__ import annotations

import json
import math
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from helpers import SMALL_PRETRAIN, copy_project, make_pretrain_project, pretrain, run_mv3d
from mv3dtk import Project, load_model

SMALL = SMALL_PRETRAIN


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    return make_pretrain_project(tmp_path_factory.mktemp("pt"))


@pytest.fixture
def project(template, tmp_path):
    return copy_project(template[0], tmp_path / "p"), template[1]


_pretrain = pretrain


def _losses(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_pretrain_writes_metrics_checkpoints_and_a_loadable_model(project):
    p, bert = project
    proc = _pretrain(p, bert, "--max-steps", "4", "--checkpoint-every", "2", "--run", "r1", "--report-to",
                     "tensorboard")
    run = p.root / "pretrain" / "r1"
    rows = _losses(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert {"loss", "global", "local", "global_semantic", "local_semantic", "lr", "temperature", "volumes_per_s",
            "data_wait", "run_volumes_per_s"} <= set(rows[0])
    assert f"{rows[-1]['run_volumes_per_s']:.1f} volumes/s over the run" in proc.stderr
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))  # --report-to tensorboard
    assert sorted(c.name for c in (run / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]
    _assert_plot(run / "loss.png", ["loss", "global", "local", "global_semantic", "local_semantic"])
    model = load_model(run / "model")
    assert model.config["image"]["backbone"] == "vit"
    art = p.manifest()["artifacts"]["pretrain.model"]
    assert art["path"] == "pretrain/r1/model"
    again = _pretrain(p, bert, "--max-steps", "4", "--run", "r1", check=False)
    assert again.returncode == 1 and "--resume" in again.stderr


def _assert_plot(png, terms):
    """``png`` decodes to the 640x360 figure plot_metrics draws, not blank, with a line in each term's colour."""
    import matplotlib.colors
    import matplotlib.image

    img = matplotlib.image.imread(png)  # (H, W, 4) floats in [0, 1]
    assert img.shape[:2] == (360, 640) and img[..., :3].std() > 0.05
    rgb = (img[..., :3] * 255).round().astype(np.uint8).reshape(-1, 3)
    assert len(np.unique(rgb, axis=0)) > 100  # lines, antialiasing, text: not a flat image
    for i, term in enumerate(terms):  # matplotlib's colour cycle, in plot order: one line per term
        colour = (np.array(matplotlib.colors.to_rgb(f"C{i}")) * 255).round().astype(np.uint8)
        assert (rgb == colour).all(1).sum() > 50, f"no line of {term} (colour C{i}) in {png}"


def test_losses_switch_off_and_missing_rewrite_falls_back(project):
    p, bert = project
    shutil.rmtree(p.root / "rewrite")
    proc = _pretrain(p, bert, "--max-steps", "1", "--losses", "global,local", "--run", "gl")
    assert "rewrite/ has not run" not in proc.stderr  # no semantic term, no need for rewrite
    assert set(_losses(p.root / "pretrain" / "gl")[0]) >= {"global", "local"}
    assert "global_semantic" not in _losses(p.root / "pretrain" / "gl")[0]
    proc = _pretrain(p, bert, "--max-steps", "1", "--run", "sem")
    assert "rewrite/ has not run" in proc.stderr


def test_freeze_text_init_from_and_rsmb_warm_start_from_the_index(project):
    from mv3dtk.models.text import TextEncoder

    p, bert = project
    _pretrain(p, bert, "--max-steps", "2", "--freeze-text", "--run", "base")
    model = load_model(p.root / "pretrain" / "base" / "model")
    before = TextEncoder(bert).model.state_dict()
    assert all(torch.equal(v, before[k]) for k, v in model.text.model.state_dict().items())  # frozen: untouched

    P, warm = ("-P", str(p.root)), ["pretrain", *SMALL, "--init-from", "pretrain/base/model", "--rsmb-init", "index"]
    proc = run_mv3d(*P, *warm, "--max-steps", "1", "--run", "w0", check=False, timeout=600)
    assert proc.returncode == 1 and "mv3d index-texts --encoder pretrain/<run>/model" in proc.stderr
    run_mv3d(*P, "index-texts", "--encoder", "pretrain/base/model", "--origins", "enriched,region_enriched",
             timeout=600)
    proc = run_mv3d(*P, *warm, "--max-steps", "1", "--run", "w1", timeout=600)
    assert "initialised from" in proc.stderr
    n = int(proc.stderr.split("RSMB warm-started with ")[1].split()[0])
    assert 0 < n <= 64  # the bank's size (--rsmb-size 64 in SMALL)
    assert load_model(p.root / "pretrain" / "w1" / "model").config["image"] == model.config["image"]


def test_sigkill_then_resume_reproduces_the_uninterrupted_loss_sequence(project):
    p, bert = project
    _pretrain(p, bert, "--max-steps", "6", "--checkpoint-every", "2", "--run", "straight")
    straight = [r["loss"] for r in _losses(p.root / "pretrain" / "straight")]
    cmd = [sys.executable, "-m", "mv3dtk", "-P", str(p.root), "pretrain", *SMALL, "--text-encoder", str(bert),
           "--max-steps", "6", "--checkpoint-every", "2", "--run", "killed"]
    proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
    metrics = p.root / "pretrain" / "killed" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL  # killed, not already finished
    assert 3 <= len(metrics.read_text().splitlines()) < 6  # really interrupted mid-run
    _pretrain(p, bert, "--max-steps", "6", "--checkpoint-every", "2", "--run", "killed", "--resume")
    resumed = [r["loss"] for r in _losses(p.root / "pretrain" / "killed")]
    assert resumed == pytest.approx(straight, rel=1e-5, abs=1e-6)
    bad = _pretrain(p, bert, "--max-steps", "8", "--run", "killed", "--resume", "--lr", "5e-4", check=False)
    assert bad.returncode == 1 and "other settings" in bad.stderr


def _without_dropout(bert, dst):
    """The tiny BERT with its dropout off: dropout masks are drawn per process, so no multi-process run can
    draw the masks one process draws for the whole batch (equal in distribution, not in value)."""
    shutil.copytree(bert, dst)
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["hidden_dropout_prob"] > 0 and cfg["attention_probs_dropout_prob"] > 0  # what is switched off here
    (dst / "config.json").write_text(json.dumps({**cfg, "hidden_dropout_prob": 0.0,
                                                 "attention_probs_dropout_prob": 0.0}))
    return dst


@pytest.mark.slow
def test_two_processes_equal_one_process_on_the_same_global_batch(project, tmp_path):
    """--nproc 2 (real torchrun, gloo) against one process, global batch 4: every loss term of every step
    equal to 1e-5, over 3 steps (an epoch boundary, the RSMB filling, two optimizer updates before the last
    loss) and with --global-text statements (statements padded per rank, repeats dropped after the gather).
    A rank that trained on the other rank's data, a BatchNorm on the local batch, a gather in another
    order or a bank fed one rank's texts would each change the losses. What is left is summation order."""
    p, bert = project
    bert = _without_dropout(bert, tmp_path / "bert-nodrop")
    pairs = {("one", "ddp"): ["--max-steps", "3"],
             ("one-st", "ddp-st"): ["--max-steps", "2", "--global-text", "statements"]}
    for (single, multi), args in pairs.items():
        _pretrain(p, bert, *args, "--run", single)
        _pretrain(p, bert, *args, "--nproc", "2", "--run", multi)
        a, b = _losses(p.root / "pretrain" / single), _losses(p.root / "pretrain" / multi)
        assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, int(args[1]) + 1))
        for ra, rb in zip(a, b):
            for term in ("loss", "global", "local", "global_semantic", "local_semantic", "lr", "temperature"):
                assert rb[term] == pytest.approx(ra[term], rel=1e-5, abs=1e-6), (multi, rb["step"], term)
        assert a[-1]["global_semantic"] > 0 and a[-1]["local_semantic"] > 0  # the bank was queried
        assert [json.loads((p.root / "pretrain" / r / "config.json").read_text())["world_size"]
                for r in (single, multi)] == [1, 2]
    assert load_model(p.root / "pretrain" / "ddp" / "model").config["image"]["backbone"] == "vit"
    # one run record per command, each finished cleanly (a launcher's ranks record nothing themselves)
    records = [json.loads(f.read_text()) for f in sorted(p.runs_dir.glob("*-pretrain/run.json"))]
    assert sorted(r["config"]["run_name"]["value"] for r in records) == sorted(sum(pairs, ()))
    for r in records:
        name = r["config"]["run_name"]["value"]
        assert (r["status"], r["error"]) == ("done", None), name
        assert r["config"]["nproc"]["value"] == (2 if name.startswith("ddp") else 1), name
        assert r["outputs"]["pretrain.model"]["path"] == f"pretrain/{name}/model"


def test_a_diverging_loss_stops_with_a_clear_message(project):
    p, bert = project
    proc = _pretrain(p, bert, "--max-steps", "6", "--lr", "1e30", "--warmup-steps", "0", "--run", "nan", check=False)
    assert proc.returncode == 1 and "the loss became" in proc.stderr and "lower --lr" in proc.stderr


def test_pretrain_needs_prep_first(tmp_path):
    project = Project.init(tmp_path / "empty")
    proc = run_mv3d("-P", str(project.root), "pretrain", *SMALL, check=False)
    assert proc.returncode == 1 and "needs 'prep.manifest' (made by 'prep')" in proc.stderr


def test_global_texts_draw_statements_reproducibly_and_know_their_positives():
    from mv3dtk.train.targets import global_texts, positives_from_ids, statement_ids

    batch = {"index": torch.tensor([0, 1, 2]), "report": ["r0", "r1", "r2"],
             "enriched": ["Emphysema is present. Atelectasis is not present.",
                          "Emphysema is not present. Atelectasis is not present.",
                          "Cardiomegaly is present."]}
    assert global_texts(batch, "report", 0, 5) == ["r0", "r1", "r2"]
    assert global_texts(batch, "enriched", 0, 5) == batch["enriched"]
    draws = [global_texts(batch, "statement", 0, step) for step in range(40)]
    # a draw depends only on (seed, step, volume): pinned, so a process-salted hash or a global RNG would fail
    assert draws[7] == ["Emphysema is present.", "Emphysema is not present.", "Cardiomegaly is present."]
    assert global_texts(batch, "statement", 1, 7) != draws[7] or global_texts(batch, "statement", 1, 8) != draws[8]
    assert {d[1] for d in draws} == {"Emphysema is not present.", "Atelectasis is not present."}
    assert all(d[2] == "Cardiomegaly is present." for d in draws)
    mixed = [global_texts(batch, "mixed", 0, step)[0] for step in range(40)]
    assert batch["enriched"][0] in mixed and "Emphysema is present." in mixed

    texts = ["Atelectasis is not present.", "Atelectasis is not present.", "Cardiomegaly is present."]
    pos = positives_from_ids(*statement_ids(batch, texts))
    assert pos.tolist() == [[True, True, False], [True, True, False], [False, False, True]]
    whole = positives_from_ids(*statement_ids(batch, batch["enriched"]))
    assert whole.tolist() == torch.eye(3, dtype=torch.bool).tolist()  # a whole report is true of its own volume only
    empty = positives_from_ids(*statement_ids(batch, ["", "Atelectasis is not present.", ""]))
    assert not empty[:, 0].any() and not empty[:, 2].any()  # an empty text matches nobody's padding


@pytest.mark.parametrize("mode", ["mixed", "statements"])
def test_pretrain_with_statements_as_the_global_text(project, mode, monkeypatch, mv3d_cli):
    """What the text tower encodes for the global term (decoded from the tokens the model's forward gets):
    ``statements``: each distinct sentence of the batch's enriched reports, once, in order; ``mixed``:
    per volume one sentence of its enriched report or the whole of it, both seen. Never the source report."""
    from mv3dtk.models.medvista3d import MedVista3D
    from mv3dtk.train import loop

    p, bert = project
    batches, fed = [], []
    real_texts, real_forward = loop.global_texts, MedVista3D.forward

    def spy_texts(batch, *args):
        batches.append({"enriched": list(batch["enriched"]), "report": list(batch["report"])})
        return real_texts(batch, *args)

    def spy_forward(self, image, masks, report, *rest):
        fed.append(self.text.tokenizer.batch_decode(report["input_ids"], skip_special_tokens=True))
        return real_forward(self, image, masks, report, *rest)

    monkeypatch.setattr(loop, "global_texts", spy_texts)
    monkeypatch.setattr(MedVista3D, "forward", spy_forward)
    mv3d_cli(["pretrain", *SMALL, "--text-encoder", str(bert), "--max-steps", "2", "--global-text", mode,
              "--run", mode], project=p)
    assert len(fed) == len(batches) == 2

    def norm(text):  # the tokenizer lower-cases and splits off punctuation
        return re.sub(r"\W+", " ", text.lower()).strip()

    def sentences(text):
        return [s.strip() for s in re.split(r"(?<=\.)\s+", text) if s.strip()]

    kinds = set()
    for batch, texts in zip(batches, fed):
        got = [norm(t) for t in texts]
        assert all(len(sentences(t)) > 1 for t in batch["enriched"])  # a statement is not a whole report here
        assert not {norm(r) for r in batch["report"]} & set(got)
        if mode == "statements":
            want = list(dict.fromkeys(norm(s) for t in batch["enriched"] for s in sentences(t)))
            assert got == want and len(got) > len(batch["enriched"])
            continue
        assert len(got) == len(batch["enriched"])
        for text, enriched in zip(got, batch["enriched"]):
            kind = "whole" if text == norm(enriched) else "sentence"
            assert kind == "whole" or text in {norm(s) for s in sentences(enriched)}, (text, enriched)
            kinds.add(kind)
    assert kinds == (set() if mode == "statements" else {"whole", "sentence"})
    rows = _losses(p.root / "pretrain" / mode)
    assert len(rows) == 2 and all(math.isfinite(r["global"]) and r["global"] > 0 for r in rows)
    cfg = json.loads((p.root / "pretrain" / mode / "config.json").read_text())
    assert cfg["train"]["global_text"] == mode  # part of what a resume must match


def test_statements_of_the_batch_are_distinct_and_know_which_volumes_they_describe():
    from mv3dtk.train.targets import MAX_STATEMENTS, distinct_statements, global_texts, pad_ids, statement_ids

    rank0 = {"index": torch.tensor([0, 1]), "report": ["r0", "r1"],
             "enriched": ["Emphysema is present. Atelectasis is not present.",
                          "Emphysema is not present. Atelectasis is not present."]}
    rank1 = {"index": torch.tensor([2, 3]), "report": ["r2", "r3"],
             "enriched": ["Cardiomegaly is present. Emphysema is not present.", ""]}
    parts = []
    for r, batch in enumerate((rank0, rank1)):  # what each rank sends to the all-gather
        texts = global_texts(batch, "statements", 0, 3)
        ids, true = statement_ids(batch, texts)
        emb = torch.tensor([[10.0 * r + k] for k in range(len(texts))])  # (T_r, 1): rank r's k-th statement
        pad = 2 * MAX_STATEMENTS - len(texts)
        parts.append((torch.nn.functional.pad(emb, (0, 0, 0, pad)), pad_ids(ids, pad), true, texts))
    assert parts[0][3] == ["Emphysema is present.", "Atelectasis is not present.", "Emphysema is not present."]
    assert parts[1][3] == ["Cardiomegaly is present.", "Emphysema is not present."]
    text, pos = distinct_statements(*(torch.cat([p[k] for p in parts]) for k in range(3)))
    # each statement once, first copy kept (rank 0's "Emphysema is not present.", not rank 1's), padding dropped
    assert text[:, 0].tolist() == [0.0, 1.0, 2.0, 10.0]
    assert pos.tolist() == [[True, True, False, False], [False, True, True, False],
                            [False, False, True, True], [False, False, False, False]]  # volume 3: nothing known
    assert global_texts({"enriched": ["", ""]}, "statements", 0, 0) == [""]  # dropped by the loss (padding id)


def test_a_run_killed_before_its_first_checkpoint_starts_over(project):
    p, bert = project
    run = p.root / "pretrain" / "early"
    (run / "checkpoints").mkdir(parents=True)  # what a kill between the first step and the first checkpoint leaves
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 99.0}\n')
    assert "no checkpoint" in _pretrain(p, bert, "--max-steps", "2", "--run", "early", "--resume", check=False).stderr
    _pretrain(p, bert, "--max-steps", "2", "--run", "early")
    assert [r["step"] for r in _losses(run)] == [1, 2] and _losses(run)[0]["loss"] != 99.0
