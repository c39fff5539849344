"""`mv3d rewrite`: rules, ollama and openai backends end to end against a real loopback server,
driven by the real clients; the faithfulness guard, retries, cache, privacy, concurrency, kill."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import duckdb
import polars as pl
import pytest

from helpers import run_mv3d
from mv3dtk import Project
from mv3dtk.data.synth import make_synthetic_dataset
from mv3dtk.testing.fake_llm import Delay, Garbage, Reply, Status
from mv3dtk.text.labeler import label_text, rules_rewrite
from mv3dtk.text.prompts import FEW_SHOT, SYSTEM_PROMPT


@pytest.fixture(scope="module")
def prepped(tmp_path_factory):
    root = tmp_path_factory.mktemp("rw")
    data = make_synthetic_dataset(root / "data", n_train=5, n_valid=2, shape=(16, 32, 32), seed=3).root
    project = Project.init(root / "template")
    run_mv3d("-P", str(project.root), "prep", str(data), "--spacing", "3", "1.5", "1.5", "--size", "16", "16", "16")
    return project


@pytest.fixture
def project(prepped, tmp_path):
    shutil.copytree(prepped.root, tmp_path / "p")
    return Project(tmp_path / "p")


def _rewrite(project, *args, check=True, env=None):
    return run_mv3d("-P", str(project.root), "rewrite", *args, check=check, env=env)


def _reports(project) -> pl.DataFrame:
    return pl.read_parquet(project.root / "rewrite" / "reports.parquet")


def _ollama(fake_llm, *extra):
    return ["--backend", "ollama", "--host", fake_llm.url, "--model", "fake-llm", *extra]


def test_rules_backend_end_to_end(project):
    proc = _rewrite(project)
    reports = _reports(project)
    volumes = pl.read_parquet(project.root / "prep/volumes.parquet").filter(pl.col("status") == "ok")
    assert sorted(reports["volume_id"]) == sorted(volumes["volume_id"])
    for row in reports.iter_rows(named=True):
        assert row["enriched"] == rules_rewrite(row["source"]) and row["flagged"] is False
        assert row["backend"] == "rules" and row["llm_output"] is None
    regions = pl.read_parquet(project.root / "rewrite/region_texts.parquet")
    assert regions.columns[:3] == ["volume_id", "region", "anatomy"] and regions.height > reports.height
    assert "0 requested" in proc.stderr
    assert {"rewrite.reports", "rewrite.region_texts", "rewrite.cache"} <= set(project.manifest()["artifacts"])


def test_ollama_backend_sends_the_paper_prompt_and_caches(project, fake_llm):
    _rewrite(project, *_ollama(fake_llm, "--scope", "reports", "--seed", "7"))
    chats = fake_llm.chat_requests()
    n_unique = len(set(_reports(project)["source"]))
    assert len(chats) == n_unique  # reconstructions share a report: sent once
    msgs = chats[0].messages
    assert msgs[0] == {"role": "system", "content": SYSTEM_PROMPT}
    assert [m["content"] for m in msgs[1:5:2]] == [f"Findings: {s}" for s, _ in FEW_SHOT]
    assert [m["content"] for m in msgs[2:6:2]] == [t for _, t in FEW_SHOT]
    assert chats[0].body["options"] == {"temperature": 0.0, "seed": 7} and chats[0].body["model"] == "fake-llm"
    reports = _reports(project)
    assert set(reports["backend"]) == {"ollama"} and reports["prompt_sha"].n_unique() == 1
    ok = reports.filter(~pl.col("flagged"))
    assert ok.height > 0 and (ok["enriched"] == ok["llm_output"]).all()
    again = _rewrite(project, *_ollama(fake_llm, "--scope", "reports", "--seed", "7"))
    assert len(fake_llm.chat_requests()) == n_unique  # second run: entirely from the cache
    assert f"{n_unique} from the cache, 0 requested" in again.stderr
    with duckdb.connect(str(project.root / "rewrite/cache.duckdb"), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM replies").fetchall()[0][0] == n_unique


def test_openai_compatible_backend(project, fake_llm):
    env = {"OPENAI_API_KEY": "sk-secret-123"}
    _rewrite(project, "--backend", "openai", "--base-url", fake_llm.openai_url, "--model", "fake-llm", "--scope",
             "regions", "--limit", "5", env=env)
    chats = fake_llm.chat_requests()
    assert len(chats) == 5 and chats[0].path == "/v1/chat/completions"
    assert chats[0].headers.get("authorization") == "Bearer sk-secret-123"
    assert chats[0].body["temperature"] == 0.0 and chats[0].body["messages"][0]["content"] == SYSTEM_PROMPT
    regions = pl.read_parquet(project.root / "rewrite/region_texts.parquet")
    assert regions.height == 5 and set(regions["backend"]) == {"openai"}
    for f in project.root.rglob("*"):  # the key is never written anywhere
        if f.is_file() and f.suffix in (".json", ".txt", ".toml", ".parquet", ".duckdb"):
            assert b"sk-secret-123" not in f.read_bytes(), f


def test_guard_flags_invented_diseases_and_failed_requests(project, fake_llm):
    sources = _reports_sources(project)
    invent, broken, flaky = sources[0], sources[1], sources[2]
    attempts = {}

    def rule(text: str):
        if invent in text:
            return Reply(rules_rewrite(invent) + " A large pneumothorax is present.")
        if broken in text:
            return Garbage()
        if flaky in text:
            attempts[flaky] = attempts.get(flaky, 0) + 1
            return Status(500, "overloaded") if attempts[flaky] <= 2 else None
        return None

    fake_llm.rule = rule
    proc = _rewrite(project, *_ollama(fake_llm, "--scope", "reports", "--retries", "2"))
    by_source = {r["source"]: r for r in _reports(project).iter_rows(named=True)}
    bad = by_source[invent]
    assert bad["flagged"] and "Pneumothorax" in bad["flag_reason"] and "asserts" in bad["flag_reason"]
    assert bad["enriched"] == rules_rewrite(invent) and "pneumothorax" in bad["llm_output"].lower()
    assert label_text(bad["enriched"]).get("Pneumothorax") != "present"
    assert by_source[broken]["flagged"] and "no usable reply" in by_source[broken]["flag_reason"]
    assert by_source[broken]["enriched"] == rules_rewrite(broken)
    assert attempts[flaky] == 3 and not by_source[flaky]["flagged"]  # two 500s, then success
    assert "flagged and replaced" in proc.stderr
    n_broken = sum(1 for r in fake_llm.chat_requests() if broken in r.last_user_message)
    assert n_broken == 3  # 1 + 2 retries, then given up


def _reports_sources(project) -> list[str]:
    df = pl.read_parquet(project.root / "prep/volumes.parquet").filter(pl.col("status") == "ok")
    return sorted(set(df["report"]))


def test_timeouts_are_retried_then_flagged(project, fake_llm):
    slow = _reports_sources(project)[0]
    fake_llm.rule = lambda text: Delay(5) if slow in text else None
    t0 = time.monotonic()
    _rewrite(project, *_ollama(fake_llm, "--scope", "reports", "--timeout", "0.5", "--retries", "1"))
    assert time.monotonic() - t0 < 30
    row = _reports(project).filter(pl.col("source") == slow).row(0, named=True)
    assert row["flagged"] and "no usable reply" in row["flag_reason"]


def test_requests_overlap_at_concurrency_8(project, fake_llm):
    fake_llm.latency = 0.3
    t0 = time.monotonic()
    _rewrite(project, *_ollama(fake_llm, "--scope", "regions", "--limit", "16", "--concurrency", "8"))
    assert fake_llm.in_flight_max() >= 6
    assert time.monotonic() - t0 < 16 * 0.3  # far from serial


def test_remote_host_is_refused_without_allow_remote(project):
    proc = _rewrite(project, "--backend", "ollama", "--host", "http://10.20.30.40:11434", check=False)
    assert proc.returncode == 1 and "not this machine; nothing was sent" in proc.stderr and "--allow-remote" in proc.stderr
    env = {"OPENAI_API_KEY": "sk-x"}
    proc = _rewrite(project, "--backend", "openai", "--model", "gpt-4o-mini", check=False, env=env)
    assert proc.returncode == 1 and "api.openai.com" in proc.stderr and "--allow-remote" in proc.stderr


def test_unknown_model_stops_with_a_clear_error(project, fake_llm):
    proc = _rewrite(project, "--backend", "ollama", "--host", fake_llm.url, "--model", "nope", check=False)
    assert proc.returncode == 1 and "ollama pull nope" in proc.stderr


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_sends_nothing_twice(project, fake_llm):
    fake_llm.latency = 0.15
    cmd = [sys.executable, "-m", "mv3dtk", "-P", str(project.root), "rewrite", *_ollama(fake_llm, "--scope", "regions",
                                                                                       "--concurrency", "2")]
    env = {**os.environ, "NO_PROXY": "127.0.0.1,localhost"}
    p = subprocess.Popen(cmd, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 60
    while len(fake_llm.chat_requests()) < 12 and time.monotonic() < deadline:
        time.sleep(0.05)
    p.kill()
    p.wait()
    first = [r.last_user_message for r in fake_llm.chat_requests()]
    with duckdb.connect(str(project.root / "rewrite/cache.duckdb"), read_only=True) as con:
        cached = {s for (s,) in con.execute("SELECT source FROM replies").fetchall()}
    assert 0 < len(cached) < len(set(first)) + 3
    subprocess.run(cmd, check=True, capture_output=True, env=env)
    second = [r.last_user_message for r in fake_llm.chat_requests()][len(first):]
    assert not any(m.removeprefix("Findings: ") in cached for m in second)  # nothing finished is sent again
    assert len(second) + len(cached) >= len({m for m in first + second})  # and nothing is lost
    regions = pl.read_parquet(project.root / "rewrite/region_texts.parquet")
    assert regions["llm_output"].null_count() == 0
    dupes = len(first) + len(second) - len({*first, *second})
    # resent at most: per worker, the request in flight at the kill and one answered but not yet stored
    assert dupes <= 2 * 2


def test_refused_connections_are_retried_then_reported(project):
    import socket

    with socket.socket() as s:  # a port on this machine where nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = _rewrite(project, "--backend", "ollama", "--host", f"http://127.0.0.1:{port}", "--scope", "reports",
                    "--limit", "2", "--retries", "1", check=False)
    assert proc.returncode == 1 and "is the server running?" in proc.stderr
    reports = _reports(project)  # nothing lost: the rules rewrite stands in, flagged
    assert reports.height == 2 and reports["flagged"].all()
    assert (reports["enriched"] == reports["source"].map_elements(rules_rewrite, return_dtype=pl.String)).all()
