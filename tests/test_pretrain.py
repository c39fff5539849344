"""`mv3d pretrain` end to end on CPU: outputs, resume after SIGKILL, torchrun, bad situations."""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from helpers import make_pretrain_project, run_mv3d
from mv3dtk import Project, load_model

SMALL = ["--backbone", "vit", "--model-config", "vit-tiny", "--batch-size", "4", "--workers", "0", "--lr", "1e-3",
         "--warmup-steps", "2", "--rsmb-size", "64"]


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    return make_pretrain_project(tmp_path_factory.mktemp("pt"))


@pytest.fixture
def project(template, tmp_path):
    shutil.copytree(template[0].root, tmp_path / "p")
    return Project(tmp_path / "p"), template[1]


def _pretrain(project, bert, *args, check=True):
    return run_mv3d("-P", str(project.root), "pretrain", *SMALL, "--text-encoder", str(bert), *args, check=check,
                    timeout=600)


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
    assert (run / "loss.png").read_bytes()[:4] == b"\x89PNG"
    model = load_model(run / "model")
    assert model.config["image"]["backbone"] == "vit"
    art = p.manifest()["artifacts"]["pretrain.model"]
    assert art["path"] == "pretrain/r1/model"
    again = _pretrain(p, bert, "--max-steps", "4", "--run", "r1", check=False)
    assert again.returncode == 1 and "--resume" in again.stderr


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


@pytest.mark.slow
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
    proc.wait()
    assert len(metrics.read_text().splitlines()) < 6  # really interrupted
    _pretrain(p, bert, "--max-steps", "6", "--checkpoint-every", "2", "--run", "killed", "--resume")
    resumed = [r["loss"] for r in _losses(p.root / "pretrain" / "killed")]
    assert resumed == pytest.approx(straight, rel=1e-5, abs=1e-6)
    bad = _pretrain(p, bert, "--max-steps", "8", "--run", "killed", "--resume", "--lr", "5e-4", check=False)
    assert bad.returncode == 1 and "other settings" in bad.stderr


@pytest.mark.slow
def test_two_processes_with_nproc(project):
    p, bert = project
    _pretrain(p, bert, "--max-steps", "2", "--nproc", "2", "--run", "ddp", "--batch-size", "4")
    cfg = json.loads((p.root / "pretrain" / "ddp" / "config.json").read_text())
    assert cfg["world_size"] == 2 and len(_losses(p.root / "pretrain" / "ddp")) == 2
    # --global-text statements: each rank pads its statements to a fixed count for the gather
    _pretrain(p, bert, "--max-steps", "1", "--nproc", "2", "--run", "ddp-st", "--batch-size", "4",
              "--global-text", "statements")
    assert all(math.isfinite(r["global"]) for r in _losses(p.root / "pretrain" / "ddp-st"))
    runs = sorted(p.runs_dir.glob("*-pretrain/run.json"))
    assert json.loads(runs[-1].read_text())["status"] == "done"
    assert load_model(p.root / "pretrain" / "ddp" / "model").config["image"]["backbone"] == "vit"


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
def test_pretrain_with_statements_as_the_global_text(project, mode):
    p, bert = project
    _pretrain(p, bert, "--max-steps", "2", "--global-text", mode, "--run", mode)
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
