"""`mv3d rewrite`: rules, ollama and openai backends end to end against a real loopback server,
driven by the real clients; the faithfulness guard, retries, cache, concurrency, kill. The remote-host
rule: test_remote_hosts.py."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import polars as pl
import pytest

from helpers import copy_project, make_prepped_project, run_mv3d
from mv3dtk import Project
from mv3dtk.testing.fake_llm import Delay, Garbage, Reply, Status
from mv3dtk.text.labeler import label_text, rules_rewrite
from mv3dtk.text.prompts import FEW_SHOT, SYSTEM_PROMPT


@pytest.fixture(scope="module")
def prepped(tmp_path_factory):
    return make_prepped_project(tmp_path_factory.mktemp("rw"), n_train=5, n_valid=2, seed=3)


@pytest.fixture
def project(prepped, tmp_path):
    return copy_project(prepped, tmp_path / "p")


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
    fake_llm.rule = lambda text: Delay(3600) if slow in text else None  # never answered (cut off at teardown)
    _rewrite(project, *_ollama(fake_llm, "--scope", "reports", "--timeout", "1", "--retries", "1"))
    sent = [r for r in fake_llm.chat_requests() if slow in r.last_user_message]
    assert len(sent) == 2 and all(r.status is None for r in sent)  # 1 + 1 retry, both given up by the client
    row = _reports(project).filter(pl.col("source") == slow).row(0, named=True)
    assert row["flagged"] and row["flag_reason"] == "no usable reply (ReadTimeout: timed out)"
    assert row["enriched"] == rules_rewrite(slow)


def _start(project, *args) -> tuple[subprocess.Popen, Path]:
    """Start `mv3d rewrite` without waiting; its stderr goes to the returned file."""
    err = project.root.parent / f"rewrite-{time.monotonic_ns()}.err"
    cmd = [sys.executable, "-m", "mv3dtk", "-P", str(project.root), "rewrite", *args]
    with open(err, "w") as fh:
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=fh), err


def test_requests_overlap_at_concurrency_8(project, fake_llm):
    fake_llm.hold()  # every request waits at the server: the client must have 8 out at once to go on
    proc, err = _start(project, *_ollama(fake_llm, "--scope", "regions", "--limit", "16", "--concurrency", "8"))
    try:
        fake_llm.wait_for(lambda: fake_llm.held() >= 8 or proc.poll() is not None, timeout=60,
                          what="8 requests in flight at once")
        assert fake_llm.held() == 8, err.read_text()
        fake_llm.release()
        assert proc.wait(timeout=120) == 0, err.read_text()
    finally:
        proc.kill()
    chats = fake_llm.chat_requests()
    regions = pl.read_parquet(project.root / "rewrite/region_texts.parquet")
    assert regions.height == 16 and len(chats) == regions["source"].n_unique() > 8
    assert fake_llm.in_flight_max() == 8  # 8 overlapped, never more
    first = chats[:8]  # the server's own timestamps: all 8 intervals overlap
    assert max(r.started for r in first) < min(r.finished for r in first)


def test_unknown_model_stops_with_a_clear_error(project, fake_llm):
    proc = _rewrite(project, "--backend", "ollama", "--host", fake_llm.url, "--model", "nope", check=False)
    assert proc.returncode == 1 and "ollama pull nope" in proc.stderr


def _stored(err: Path) -> int:
    """Replies the run has stored in its cache, from its progress lines ("rewrite: 3/40, ...")."""
    return max((int(n) for n in re.findall(r"rewrite: (\d+)/\d+,", err.read_text())), default=0)


def _cached_sources(project) -> set[str]:
    with duckdb.connect(str(project.root / "rewrite/cache.duckdb"), read_only=True) as con:
        return {s for (s,) in con.execute("SELECT source FROM replies").fetchall()}


def test_sigkill_mid_run_then_resume_equals_an_uninterrupted_run(project, prepped, fake_llm, tmp_path):
    sources = set(pl.read_parquet(project.root / "prep/region_texts.parquet")
                  .filter(pl.col("region").is_not_null())["sentence"])
    n = len(sources)
    args = _ollama(fake_llm, "--scope", "regions", "--concurrency", "2")
    fake_llm.hold(after=n // 2)  # half the texts are answered, then the server holds the run where it is
    proc, err = _start(project, *args)
    try:
        fake_llm.wait_for(lambda: (_stored(err) >= 1 and fake_llm.held() == 2) or proc.poll() is not None,
                          timeout=60, what="some replies stored, the next two requests held")
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, err.read_text()
    answered = [r.last_user_message for r in fake_llm.chat_requests() if r.status == 200]
    cached = _cached_sources(project)
    assert 1 <= len(cached) <= len(answered) == n // 2 < n  # the kill landed mid-run: partial work on disk
    assert not (project.root / "rewrite/region_texts.parquet").exists()

    fake_llm.release()
    before = len(fake_llm.chat_requests())
    _rewrite(project, *args)  # resume
    resent = [r.last_user_message.removeprefix("Findings: ") for r in fake_llm.chat_requests()[before:]]
    assert len(resent) == n - len(cached) and not cached & set(resent)  # nothing stored is sent again
    assert cached | set(resent) == sources

    fresh = Project(shutil.copytree(prepped.root, tmp_path / "fresh"))
    _rewrite(fresh, *args)  # the same run, never interrupted
    resumed = pl.read_parquet(project.root / "rewrite/region_texts.parquet")
    assert resumed.height > 0 and resumed["llm_output"].null_count() == 0
    assert resumed.equals(pl.read_parquet(fresh.root / "rewrite/region_texts.parquet"))


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
