"""`mv3d index-texts`: a DuckDB index of the project's texts per encoder, incremental builds, search,
stats, the library API other stages use, bad input, and two writers at once (real processes)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import duckdb
import polars as pl
import pytest
import torch
import torch.nn.functional as F

from helpers import REPO, run_mv3d
from mv3dtk import Project
from mv3dtk.data.ctrate import ABNORMALITIES
from mv3dtk.data.synth import make_synthetic_dataset
from mv3dtk.errors import ConfigError, MissingInputError, Mv3dError, StageLockedError
from mv3dtk.text.zeroshot_prompts import ctclip_prompts
from mv3dtk import index as ix
from mv3dtk.text.encoders import HFEncoder, MV3DEncoder, resolve_encoder


@pytest.fixture(scope="module")
def minilm():
    return resolve_encoder("default", device="cpu")


@pytest.fixture(scope="module")
def prepped(tmp_path_factory):
    root = tmp_path_factory.mktemp("ix")
    data = make_synthetic_dataset(root / "data", n_train=3, n_valid=1, shape=(16, 32, 32), seed=1).root
    project = Project.init(root / "prepped")
    run_mv3d("-P", str(project.root), "prep", str(data), "--spacing", "3", "1.5", "1.5", "--size", "16", "16", "16")
    run_mv3d("-P", str(project.root), "rewrite")
    return project


@pytest.fixture(scope="module")
def built(prepped, tmp_path_factory):
    """``prepped`` indexed by the real console script (all origins, the default encoder)."""
    root = tmp_path_factory.mktemp("ixb") / "p"
    shutil.copytree(prepped.root, root)
    proc = run_mv3d("-P", str(root), "index-texts", "--device", "cpu", "--json")
    return Project(root), json.loads(proc.stdout)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    from mv3dtk.testing.tiny_models import make_tiny_bert

    texts = [f"{p.positive} {p.negative}" for p in ctclip_prompts()] + _sentences(40)
    return make_tiny_bert(tmp_path_factory.mktemp("tb") / "bert", texts, hidden=32, layers=1, heads=2,
                          intermediate=64)


def _copy(project: Project, dest: Path) -> Project:
    shutil.copytree(project.root, dest)
    return Project(dest)


def _sentences(n: int) -> list[str]:
    organs = ["liver", "spleen", "left lung", "right lung", "heart", "aorta", "trachea", "esophagus"]
    return [f"Finding {i}: the {organs[i % len(organs)]} shows change number {i}." for i in range(n)]


def _mini_project(root: Path, reports: list[str | None], regions: list[tuple[str, str, str]] = ()) -> Path:
    """Only what the library reads: prep/volumes.parquet and prep/region_texts.parquet."""
    (root / "prep").mkdir(parents=True)
    ids = [f"v{i}" for i in range(len(reports))]
    pl.DataFrame({"volume_id": ids, "split": ["train"] * len(ids), "status": ["ok"] * len(ids), "report": reports},
                 schema={"volume_id": pl.String, "split": pl.String, "status": pl.String, "report": pl.String}
                 ).write_parquet(root / "prep/volumes.parquet")
    pl.DataFrame({"volume_id": [r[0] for r in regions], "region": [r[1] for r in regions],
                  "anatomy": [r[1] for r in regions], "sentence": [r[2] for r in regions]},
                 schema={c: pl.String for c in ("volume_id", "region", "anatomy", "sentence")}
                 ).write_parquet(root / "prep/region_texts.parquet")
    return root


# --------------------------------------------------------------------------- build


def test_build_embeds_every_origin_once_and_records_the_run(built, prepped):
    project, summary = built
    vols = pl.read_parquet(project.root / "prep/volumes.parquet").filter(pl.col("status") == "ok")
    regions = pl.read_parquet(project.root / "prep/region_texts.parquet").filter(pl.col("region").is_not_null())
    rw = pl.read_parquet(project.root / "rewrite/reports.parquet")
    rw_regions = pl.read_parquet(project.root / "rewrite/region_texts.parquet")
    expected = {"report": vols.height, "enriched": rw.height, "prompt": 2 * len(ABNORMALITIES),
                "region": regions.unique(["volume_id", "region", "sentence"]).height,
                "region_enriched": rw_regions.unique(["volume_id", "region", "enriched"]).height}
    assert summary["origins"] == list(ix.ORIGINS) and summary["texts"] == expected
    assert summary["new_rows"] == sum(expected.values()) and summary["empty"] == dict.fromkeys(ix.ORIGINS, 0)
    every_text = set(vols["report"]) | set(rw["enriched"]) | set(regions["sentence"]) | set(rw_regions["enriched"])
    every_text |= {t for p in ctclip_prompts() for t in p[1:]}
    assert summary["encoded"] == len(every_text) < summary["new_rows"]  # reconstructions share their report
    assert project.manifest()["artifacts"]["index.texts"]["path"] == "index/texts.duckdb"
    assert project.manifest()["stages"]["index-texts"]["status"] == "done"
    with duckdb.connect(str(project.root / "index/texts.duckdb"), read_only=True) as con:
        cols = dict(con.execute("SELECT column_name, data_type FROM information_schema.columns "
                                "WHERE table_name = 'texts'").fetchall())
        assert {"text_id", "volume_id", "scope", "region", "origin", "text", "encoder"} <= set(cols)
        assert cols["embedding"] == "FLOAT[]"
        assert con.execute("SELECT DISTINCT len(embedding) FROM texts").fetchall() == [(384,)]
        scopes = dict(con.execute("SELECT origin, string_agg(DISTINCT scope) FROM texts GROUP BY origin").fetchall())
        assert scopes == {"report": "global", "enriched": "global", "prompt": "global", "region": "local",
                          "region_enriched": "local"}
        prompts = con.execute("SELECT label, text FROM texts WHERE origin = 'prompt' ORDER BY text").fetchall()
        assert ("Emphysema", "Emphysema is not present.") in prompts and len({p[0] for p in prompts}) == 18


def test_incremental_rebuild_encodes_only_new_texts_and_drops_stale_ones(built, minilm, tmp_path):
    project = _copy(built[0], tmp_path / "p")
    again = ix.build_index(project.root, encoder=minilm)
    assert (again.encoded, again.new_rows, again.removed) == (0, 0, 0)
    path = project.root / "prep/volumes.parquet"
    vols = pl.read_parquet(path)
    vid = vols.filter(pl.col("status") == "ok")["volume_id"][0]
    new_text = "A small sliding hiatal hernia is noted; otherwise unremarkable."
    vols.with_columns(pl.when(pl.col("volume_id") == vid).then(pl.lit(new_text)).otherwise("report")
                      .alias("report")).write_parquet(path)
    changed = ix.build_index(project.root, encoder=minilm, origins="report")
    assert (changed.encoded, changed.new_rows, changed.removed) == (1, 1, 1)
    with ix.open_index(ix.index_path(project.root)) as con:
        rows = con.execute("SELECT text, text_id FROM texts WHERE origin = 'report' AND volume_id = ?",
                           [vid]).fetchall()
    assert rows == [(new_text, ix.text_id("report", vid, None, new_text))]


def test_stored_embeddings_equal_the_encoders_output_and_fetch_by_id(built, minilm):
    project, _ = built
    db = ix.index_path(project.root)
    ids, texts, emb = ix.load_matrix(db, minilm.identity, origins=("report", "prompt"))
    assert emb.shape == (len(ids), 384) and len(ids) == len(texts) == len(set(ids))
    torch.testing.assert_close(emb, minilm.encode(texts), atol=2e-5, rtol=0)
    # another stage computes the ids of the reports it needs and fetches them, in its own order
    vols = pl.read_parquet(project.root / "prep/volumes.parquet").filter(pl.col("status") == "ok")
    wanted = [ix.text_id("report", v, None, r) for v, r in vols.select("volume_id", "report").iter_rows()][::-1]
    got = ix.fetch_embeddings(db, minilm, wanted)
    by_id = dict(zip(ids, emb))
    torch.testing.assert_close(got, torch.stack([by_id[i] for i in wanted]), atol=0, rtol=0)
    with pytest.raises(MissingInputError, match="1 of 2 texts are not in"):
        ix.fetch_embeddings(db, minilm.identity, [wanted[0], "no-such-id"])
    loose = ix.fetch_embeddings(db, minilm.identity, [wanted[0], "no-such-id"], strict=False)
    assert loose.isnan().any(1).tolist() == [False, True]
    with pytest.raises(MissingInputError, match="no embeddings made by encoder nope"):
        ix.load_matrix(db, "nope")


def test_search_and_stats_cli_read_without_recording_a_run(built, mv3d_cli):
    project, summary = built
    runs = sorted(p.name for p in project.runs_dir.iterdir())
    manifest = project.manifest()
    stats = json.loads(mv3d_cli(["index-texts", "stats", "--json"], project=project).stdout)
    assert stats["rows"] == summary["new_rows"] and [e["dim"] for e in stats["encoders"]] == [384]
    per_origin = {g["origin"]: g["rows"] for g in stats["groups"]}
    assert per_origin == summary["texts"]
    out = mv3d_cli(["index-texts", "search", "fluid in the pleural space", "-k", "3", "--scope", "local",
                    "--origin", "region,region_enriched", "--device", "cpu", "--json"], project=project).stdout
    hits = json.loads(out)  # stdout holds the JSON alone
    assert len(hits) == 3 and [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    assert {h["scope"] for h in hits} == {"local"} and {h["origin"] for h in hits} <= {"region", "region_enriched"}
    assert all(h["volume_ids"] and len(h["text_ids"]) >= len(h["volume_ids"]) for h in hits)
    table = mv3d_cli(["index-texts", "stats"], project=project).stdout
    assert "region_enriched" in table and "all-MiniLM-L6-v2" in table
    misplaced = mv3d_cli(["index-texts", "--encoder", "x", "stats"], project=project, ok=False)
    assert misplaced.exit_code == 2 and "do nothing with a subcommand" in misplaced.output
    assert sorted(p.name for p in project.runs_dir.iterdir()) == runs and project.manifest() == manifest


def test_searcher_filters_and_deduplicates(built, minilm):
    db = ix.index_path(built[0].root)
    lung = ix.TextSearcher(db, minilm, region="lung", origins="region").search(["lung nodule", "opacity"], k=2)
    assert len(lung) == 2 and all(h.region == "lung" and h.origin == "region" for hits in lung for h in hits)
    prompts = ix.TextSearcher(db, minilm, origins=["prompt"]).search("cardiomegaly", k=36)[0]
    assert len(prompts) == 36 and prompts[0].label == "Cardiomegaly" and prompts[0].volume_ids == []
    reports = ix.TextSearcher(db, minilm, origins="report").search("lungs", k=50)[0]
    assert len({h.text for h in reports}) == len(reports)  # a report shared by reconstructions is one hit
    assert sum(len(h.volume_ids) for h in reports) == built[1]["texts"]["report"]
    for kw in ({}, {"scope": "local", "origins": "region_enriched"}, {"region": "heart"}):  # torch path == SQL path
        torch_hits = ix.TextSearcher(db, minilm, **kw).search("pleural effusion", k=4)[0]
        sql_hits = ix.search(built[0].root, "pleural effusion", encoder=minilm, k=4, **kw)
        assert [(h.text, h.origin, h.volume_ids, h.text_ids) for h in torch_hits] == \
               [(h.text, h.origin, h.volume_ids, h.text_ids) for h in sql_hits]
        assert [h.score for h in torch_hits] == pytest.approx([h.score for h in sql_hits], abs=1e-5)


def test_search_ranks_a_paraphrase_above_unrelated_sentences(tmp_path, minilm):
    target = "Slight thickening of the pleura is seen on the right side."
    unrelated = ["The liver and spleen are of normal size.", "No hiatal hernia.", "The trachea is midline.",
                 "Degenerative changes of the thoracic spine."]
    root = _mini_project(tmp_path / "p", [target, *unrelated])
    ix.build_index(root, encoder=minilm, origins="report")
    hits = ix.search(root, "mild pleural thickening", encoder=minilm, k=5)
    assert hits[0].text == target and len(hits) == 5
    assert hits[0].score > max(h.score for h in hits[1:]) + 0.2
    q = minilm.encode(["mild pleural thickening"])[0]  # (E,)
    assert hits[0].score == pytest.approx(float(q @ minilm.encode([target])[0]), abs=1e-4)  # cosine


# --------------------------------------------------------------------------- bad input


def test_empty_texts_are_skipped_and_long_texts_truncated_with_counts(tmp_path, minilm):
    long = " ".join(["The right lower lobe shows patchy consolidation with air bronchograms."] * 60)
    root = _mini_project(tmp_path / "p", ["", "   ", None, long, "Normal chest CT."],
                         [("v4", "lung", "Consolidation in the right lung."), ("v4", "heart", " ")])
    s = ix.build_index(root, encoder=minilm)
    assert s.origins == ("report", "region", "prompt")  # no rewrite/: enriched origins skipped
    assert s.empty == {"report": 3, "region": 1, "prompt": 0} and s.truncated == 1
    assert s.texts == {"report": 2, "region": 1, "prompt": 36}
    with ix.open_index(ix.index_path(root)) as con:
        assert con.execute("SELECT volume_id FROM texts WHERE truncated").fetchall() == [("v3",)]
        assert con.execute("SELECT count(*) FROM texts WHERE trim(text) = ''").fetchall() == [(0,)]
    assert sum(g["truncated"] for g in ix.index_stats(ix.index_path(root))["groups"]) == 1


def test_rewrite_origins_asked_for_without_rewrite_name_the_stage(prepped, mv3d_cli, tmp_path):
    project = _copy(prepped, tmp_path / "p")
    shutil.rmtree(project.root / "rewrite")
    out = mv3d_cli(["index-texts", "--origins", "report,enriched"], project=project, ok=False).output
    assert "rewrite/reports.parquet" in out and f"mv3d -P {project.root} rewrite" in out
    assert "Traceback" not in out
    with pytest.raises(ConfigError, match="unknown origin 'reports'"):
        ix.build_index(project.root, origins="reports")


class _Narrow:
    """MiniLM's identity, but 16-d vectors: what a changed encoder with a stale identity would give."""

    kind, name, max_length, dim = "hf", "narrow", 256, 16

    def __init__(self, base, dim: int = 16, bad_norm: bool = False):
        self.base, self.identity, self.dim, self.bad_norm = base, base.identity, dim, bad_norm

    def encode(self, texts, batch_size=64):
        out = self.base.encode(texts, batch_size)[:, :16]  # (N, 16)
        return out if self.bad_norm else F.normalize(out, dim=-1)

    def n_tokens(self, texts):
        return self.base.n_tokens(texts)


def test_a_changed_dimension_for_the_same_encoder_is_refused(tmp_path, minilm):
    root = _mini_project(tmp_path / "p", ["No pleural effusion.", "Cardiomegaly."])
    ix.build_index(root, encoder=minilm, origins="report")
    with pytest.raises(Mv3dError, match=r"2 embeddings of dimension 384 .* gives 16-d .*--rebuild"):
        ix.build_index(root, encoder=_Narrow(minilm), origins="report")
    db = ix.index_path(root)
    assert ix.load_matrix(db, minilm.identity)[2].shape == (2, 384)  # untouched
    s = ix.build_index(root, encoder=_Narrow(minilm), origins="report", rebuild=True)
    assert (s.dropped, s.encoded) == (2, 2) and ix.load_matrix(db, minilm.identity)[2].shape == (2, 16)
    with pytest.raises(Mv3dError, match=r"returned shape \(2, 16\) for 2 texts, not \(2, 20\)"):
        ix.build_index(root, encoder=_Narrow(minilm, dim=20), origins="report", rebuild=True)
    with pytest.raises(Mv3dError, match="L2-normalise"):
        ix.build_index(root, encoder=_Narrow(minilm, bad_norm=True), origins="report", rebuild=True)
    s = ix.build_index(root, encoder=minilm, origins="report")  # no rows left: registers again at 384
    assert s.encoded == 2 and ix.load_matrix(db, minilm.identity)[2].shape == (2, 384)


# --------------------------------------------------------------------------- encoders


def test_hf_directory_and_mv3d_model_encoders_share_one_index(tmp_path, tiny_bert):
    from mv3dtk.models.factory import get_model_config
    from mv3dtk.models.medvista3d import MedVista3D

    root = _mini_project(tmp_path / "p", ["No pleural effusion.", "Lung nodule in the right upper lobe."])
    cfg = get_model_config("vit-tiny")
    cfg["text"] = {"model": str(tiny_bert), "pooling": "mean", "max_length": 64}
    torch.manual_seed(0)
    model = MedVista3D(cfg).eval()
    model.save(root / "pretrain/run1/model")

    hf = resolve_encoder(str(tiny_bert), project_root=root, device="cpu")
    mv = resolve_encoder("pretrain/run1", project_root=root, device="cpu")
    assert isinstance(hf, HFEncoder) and (hf.kind, hf.dim) == ("hf", 32)
    assert isinstance(mv, MV3DEncoder) and (mv.identity, mv.dim) == (model.text_identity, 64)
    ix.build_index(root, encoder=str(tiny_bert), origins="report,prompt", device="cpu")
    ix.build_index(root, encoder="pretrain/run1/model", origins="report", device="cpu")
    stats = ix.index_stats(ix.index_path(root))
    assert {(e["kind"], e["dim"], e["rows"]) for e in stats["encoders"]} == {("hf", 32, 38), ("mv3d", 64, 2)}
    _, texts, emb = ix.load_matrix(ix.index_path(root), model.text_identity)
    with torch.inference_mode():
        torch.testing.assert_close(emb, model.encode_text(texts), atol=2e-5, rtol=0)  # projected + normalised
    with pytest.raises(Mv3dError, match="runs with a model in .*: run1"):
        resolve_encoder("pretrain/run2", project_root=root)


def test_ctclip_prompts_are_the_papers():
    pairs = ctclip_prompts()
    assert [p.label for p in pairs] == list(ABNORMALITIES)
    assert pairs[2] == ("Cardiomegaly", "Cardiomegaly is present.", "Cardiomegaly is not present.")
    assert ctclip_prompts(["Emphysema"], ("There is {}.", "No {}.")) == [("Emphysema", "There is Emphysema.",
                                                                          "No Emphysema.")]
    with pytest.raises(ConfigError):
        ctclip_prompts(templates=("{} is present.",))


# --------------------------------------------------------------------------- concurrency


WRITER = textwrap.dedent("""
    import sys, time
    from mv3dtk.errors import Mv3dError
    from mv3dtk.text.encoders import HFEncoder
    from mv3dtk.index import build_index

    project, model, marker, gate, wait = sys.argv[1:6]

    def allowed():  # how many batches the test lets through so far
        try:
            with open(gate) as fh:
                return int(fh.read())
        except (OSError, ValueError):
            return 0

    class Gated(HFEncoder):  # records each batch, then waits at the gate
        done = 0

        def encode(self, texts, batch_size=64):
            with open(marker, "a") as fh:
                fh.write(f"{len(texts)}\\n")
            deadline = time.monotonic() + 120
            while allowed() <= self.done:
                if time.monotonic() > deadline:
                    sys.exit(f"the gate {gate} stayed closed at batch {self.done + 1}")
                time.sleep(0.01)
            self.done += 1
            return super().encode(texts, batch_size)

    encoder = Gated(model, device="cpu") if gate != "-" else model
    try:
        s = build_index(project, encoder=encoder, origins="report", batch_size=4, chunk=8, wait=float(wait))
    except Mv3dError as e:
        print(f"ERROR {e}")
        sys.exit(3)
    print(f"OK {s.encoded} {s.new_rows}")
""")


def _wait_for(cond, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _open_gate(gate: Path, batches: int) -> None:
    tmp = gate.with_name(gate.name + ".tmp")
    tmp.write_text(str(batches))
    os.replace(tmp, gate)  # the writer never reads a half-written number


def _index(root: Path, identity: str) -> tuple[list[str], list[str], torch.Tensor]:
    """(text ids, texts, embeddings) of the index's report rows, by text id."""
    ids, texts, emb = ix.load_matrix(ix.index_path(root), identity, origins="report")
    order = sorted(range(len(ids)), key=ids.__getitem__)
    return [ids[i] for i in order], [texts[i] for i in order], emb[order]


@pytest.mark.timeout(300)
def test_two_writers_serialise_readers_fail_clearly_and_a_killed_writer_resumes(tmp_path, tiny_bert):
    """40 texts, batches of 4, a commit every 8. The first writer is held at a gate inside its first
    batch while a second writer and a reader are refused, naming it, and a third waits for the lock;
    it is let through 4 batches (2 commits: 16 rows) and SIGKILLed inside the 5th. The waiting
    writer then gets the lock, embeds only the 24 missing texts, and the index equals one built
    without interruption."""
    reports = _sentences(40)
    root = _mini_project(tmp_path / "p", reports)
    script, marker, gate = tmp_path / "writer.py", tmp_path / "batches.txt", tmp_path / "gate"
    script.write_text(WRITER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}

    def writer(gated: bool, wait: float) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, str(script), str(root), str(tiny_bert), str(marker),
                                 str(gate) if gated else "-", str(wait)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env)

    def batches() -> int:
        return len(marker.read_text().splitlines()) if marker.exists() else 0

    first = writer(gated=True, wait=0)
    _wait_for(lambda: batches() >= 1 or first.poll() is not None, "the first writer's first batch")
    assert first.poll() is None, first.communicate()
    holder = f"mv3d index-texts \\(pid {first.pid} "
    with pytest.raises(StageLockedError, match=f"the text index .* is in use by {holder}"):
        ix.build_index(root, encoder=str(tiny_bert), origins="report", wait=0)
    with pytest.raises(Mv3dError, match=f"is being written by {holder}.*wait for that build to finish"):
        ix.index_stats(ix.index_path(root))
    patient = writer(gated=False, wait=120)
    _open_gate(gate, 4)
    _wait_for(lambda: batches() >= 5 or first.poll() is not None, "the first writer's 5th batch")
    assert first.poll() is None and patient.poll() is None, (first.communicate(), patient.communicate())
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert first.returncode == -signal.SIGKILL and batches() == 5  # killed inside its 5th batch
    out, err = patient.communicate(timeout=120)  # got the lock when the first writer died; resumed
    assert patient.returncode == 0, (out, err)
    assert out.split() == ["OK", "24", "24"]  # the killed writer's 2 commits (16 of 40 rows) were kept
    clean = _mini_project(tmp_path / "clean", reports)
    ix.build_index(clean, encoder=str(tiny_bert), origins="report", batch_size=4, chunk=8, device="cpu")
    identity = HFEncoder(str(tiny_bert), device="cpu").identity
    ids, texts, emb = _index(root, identity)
    clean_ids, clean_texts, clean_emb = _index(clean, identity)
    assert ids == clean_ids and texts == clean_texts and len(set(ids)) == 40  # every text once
    torch.testing.assert_close(emb, clean_emb, atol=2e-5, rtol=0)
