"""DESIGN §3–§4: inputs checked before a run, run records, manifest, status, mv3d.toml defaults
and their precedence, atomic outputs on failure, the per-stage lock. Uses a real test plugin
distribution (tests/helpers.py) discovered through the real entry-point machinery."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time

import click
import pytest

from helpers import run_mv3d


def _runs(project):
    return sorted(p for p in project.runs_dir.iterdir() if p.is_dir())


def _status(mv3d_cli, project):
    return {r["stage"]: r["status"] for r in json.loads(mv3d_cli(["status", "--json"], project=project).output)}


def test_missing_input_names_the_stage_to_run_first(teststages, mv3d_project, mv3d_cli):
    res = mv3d_cli(["use-a"], project=mv3d_project, ok=False)
    assert res.exit_code == 1
    assert f"Error: stage 'use-a' needs 'make-a.data' (made by 'make-a'); run: mv3d -P {mv3d_project.root} make-a" in res.output
    assert _runs(mv3d_project) == []  # nothing recorded for a run that never started


def test_stage_outside_a_project_is_refused(teststages, tmp_path, mv3d_cli):
    res = mv3d_cli(["make-a"], project=tmp_path / "nothing", ok=False)
    assert "mv3d init" in res.output


def test_run_record_manifest_and_status(teststages, mv3d_project, mv3d_cli):
    mv3d_cli(["make-a", "--value", "7"], project=mv3d_project)
    (run,) = _runs(mv3d_project)
    assert run.name.endswith("-make-a")
    rec = json.loads((run / "run.json").read_text())
    assert rec["status"] == "done" and rec["stage"] == "make-a" and rec["distribution"] == "mv3d-teststages"
    assert rec["config"]["value"] == {"value": 7, "source": "commandline"}
    assert rec["config"]["wait_for"] == {"value": None, "source": "default"}
    assert rec["versions"]["mv3d"] and rec["versions"]["click"] and rec["duration_s"] >= 0
    assert rec["outputs"]["make-a.data"]["path"] == "make-a/data.txt"
    assert "make-a writing value 7" in (run / "log.txt").read_text()
    m = mv3d_project.manifest()
    assert m["artifacts"]["make-a.data"]["run"] == run.name
    assert m["artifacts"]["make-a.data"]["fingerprint"]["size"] == len("value=7\n")
    assert m["stages"]["make-a"]["status"] == "done"
    status = _status(mv3d_cli, mv3d_project)
    assert {k: status[k] for k in ("make-a", "use-a", "forgetful")} == {"make-a": "done", "use-a": "missing",
                                                                        "forgetful": "missing"}
    mv3d_cli(["use-a"], project=mv3d_project)
    assert (mv3d_project.root / "use-a/result.txt").read_text() == "VALUE=7\n"
    table = mv3d_cli(["status"], project=mv3d_project).output
    assert "use-a" in table and "use-a/result.txt" in table


def test_rerunning_an_input_makes_downstream_stale(teststages, mv3d_project, mv3d_cli):
    mv3d_cli(["make-a"], project=mv3d_project)
    mv3d_cli(["use-a"], project=mv3d_project)
    assert _status(mv3d_cli, mv3d_project)["use-a"] == "done"
    mv3d_cli(["make-a", "--value", "2"], project=mv3d_project)
    assert _status(mv3d_cli, mv3d_project)["use-a"] == "stale"
    mv3d_cli(["use-a"], project=mv3d_project)
    assert _status(mv3d_cli, mv3d_project)["use-a"] == "done"
    (mv3d_project.root / "use-a/result.txt").unlink()
    assert _status(mv3d_cli, mv3d_project)["use-a"] == "missing"


def test_failed_run_keeps_the_old_output_and_is_recorded(teststages, mv3d_project, mv3d_cli):
    mv3d_cli(["make-a", "--value", "1"], project=mv3d_project)
    out = mv3d_project.root / "make-a/data.txt"
    before = out.read_bytes()
    res = mv3d_cli(["make-a", "--value", "9", "--fail-after-partial"], project=mv3d_project, ok=False)
    assert isinstance(res.exception, RuntimeError)  # a bug, not a user error: raised, with traceback
    assert out.read_bytes() == before
    assert [p.name for p in out.parent.iterdir()] == ["data.txt"]  # no temporary left behind
    last = json.loads((_runs(mv3d_project)[-1] / "run.json").read_text())
    assert last["status"] == "failed" and "crashed half-way" in last["error"]
    assert _status(mv3d_cli, mv3d_project)["make-a"] == "failed"
    m = mv3d_project.manifest()
    assert m["artifacts"]["make-a.data"]["run"] == _runs(mv3d_project)[0].name  # still the good run's


def test_user_error_is_one_line_exit_1(teststages, mv3d_project):
    proc = run_mv3d("-P", str(mv3d_project.root), "make-a", "--user-error", check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == "Error: bad value; pass --value 5"
    assert "Traceback" not in proc.stderr


def test_declared_output_not_written_fails_the_run(teststages, mv3d_project, mv3d_cli):
    res = mv3d_cli(["forgetful"], project=mv3d_project, ok=False)
    assert "finished without writing its output 'forgetful.out'" in res.output
    assert _status(mv3d_cli, mv3d_project)["forgetful"] == "failed"


def test_settings_precedence_commandline_env_toml_default(teststages, mv3d_project, mv3d_cli):
    def value_and_source(args=(), env=None):
        mv3d_cli(["make-a", *args], project=mv3d_project, env=env)
        rec = json.loads((_runs(mv3d_project)[-1] / "run.json").read_text())
        return (mv3d_project.root / "make-a/data.txt").read_text().strip(), rec["config"]["value"]["source"]

    assert value_and_source() == ("value=1", "default")
    mv3d_project.settings_path.write_text('[stages.make-a]\nvalue = 2\n')
    assert value_and_source() == ("value=2", "default_map")
    assert value_and_source(env={"MV3D_MAKE_A_VALUE": "3"}) == ("value=3", "environment")
    assert value_and_source(["--value", "4"], env={"MV3D_MAKE_A_VALUE": "3"}) == ("value=4", "commandline")


def test_unknown_setting_is_refused_with_a_suggestion(teststages, mv3d_project, mv3d_cli):
    mv3d_project.settings_path.write_text('[stages.make-a]\nvalu = 2\n')
    res = mv3d_cli(["make-a"], project=mv3d_project, ok=False)
    assert "[stages.make-a] has no option 'valu'; did you mean 'value'?" in res.output


def test_secrets_in_settings_are_refused_and_never_recorded(teststages, mv3d_project, mv3d_cli):
    mv3d_project.settings_path.write_text('[stages.make-a]\napi-key = "sk-123"\n')
    res = mv3d_cli(["make-a"], project=mv3d_project, ok=False)
    assert "looks like a secret" in res.output and "sk-123" not in res.output
    mv3d_project.settings_path.write_text("")
    mv3d_cli(["make-a", "--api-key", "sk-live-999"], project=mv3d_project)
    run = _runs(mv3d_project)[-1]
    rec = json.loads((run / "run.json").read_text())
    assert rec["config"]["api_key"]["value"] == "***"
    assert "sk-live-999" not in json.dumps(rec["config"]) + (run / "log.txt").read_text()
    assert "sk-live-999" not in mv3d_project.manifest_path.read_text()
    for args in (["--api-key", "sk-live-777"], ["--api-key=sk-live-777"]):  # argv is recorded too
        run_mv3d("-P", str(mv3d_project.root), "make-a", *args)
        text = (_runs(mv3d_project)[-1] / "run.json").read_text()
        assert "sk-live-777" not in text and "***" in json.loads(text)["argv"][-1]


def test_invalid_toml_is_a_clear_error(teststages, mv3d_project, mv3d_cli):
    mv3d_project.settings_path.write_text("[stages.make-a\n")
    res = mv3d_cli(["make-a"], project=mv3d_project, ok=False)
    assert "is not valid TOML" in res.output


def _wait_for_run_log(project, proc) -> None:
    """Until the run has taken its lock and recorded itself (its log.txt exists)."""
    deadline = time.monotonic() + 120
    while not list(project.runs_dir.glob("*/log.txt")):
        assert proc.poll() is None, f"the run exited {proc.returncode} before it was recorded"
        assert time.monotonic() < deadline, "the run did not start within 120 s"
        time.sleep(0.02)


def test_two_processes_running_the_same_stage_fail_cleanly(teststages, mv3d_project, tmp_path):
    exe = [sys.executable, "-m", "mv3dtk", "-P", str(mv3d_project.root)]
    gate = tmp_path / "gate"
    slow = subprocess.Popen([*exe, "make-a", "--value", "1", "--wait-for", str(gate)], stderr=subprocess.PIPE,
                            text=True)
    try:
        _wait_for_run_log(mv3d_project, slow)  # holds the lock, waits at the gate
        status = subprocess.run([*exe, "status", "--json"], capture_output=True, text=True, timeout=60)
        assert {r["stage"]: r["status"] for r in json.loads(status.stdout)}["make-a"] == "running"
        second = subprocess.run([*exe, "make-a", "--value", "2"], capture_output=True, text=True, timeout=60)
        assert second.returncode == 1
        assert f"Error: stage 'make-a' in project {mv3d_project.root} is in use by pid {slow.pid} " in second.stderr
        assert slow.poll() is None  # the refusal came while the first run held the lock
        gate.touch()
        assert slow.wait(timeout=60) == 0, slow.stderr.read()
    finally:
        slow.kill()
    assert (mv3d_project.root / "make-a/data.txt").read_text() == "value=1\n"
    assert len(_runs(mv3d_project)) == 1  # the refused process left no run record
    # the lock is released at exit: the next run goes through
    assert subprocess.run([*exe, "make-a", "--value", "3"], capture_output=True).returncode == 0


def test_a_killed_run_releases_its_lock(teststages, mv3d_project, tmp_path):
    exe = [sys.executable, "-m", "mv3dtk", "-P", str(mv3d_project.root)]
    p = subprocess.Popen([*exe, "make-a", "--wait-for", str(tmp_path / "never")], stderr=subprocess.DEVNULL)
    _wait_for_run_log(mv3d_project, p)
    p.kill()
    p.wait()
    assert p.returncode == -signal.SIGKILL  # killed while it held the lock
    proc = subprocess.run([*exe, "make-a", "--value", "5"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    statuses = [json.loads((r / "run.json").read_text())["status"] for r in _runs(mv3d_project)]
    assert statuses == ["killed", "done"]  # the killed run's record says it never finished


def test_distributed_non_main_rank_does_not_write_records(teststages, mv3d_project, mv3d_cli):
    mv3d_cli(["make-a"], project=mv3d_project, env={"RANK": "1", "WORLD_SIZE": "2"})
    assert _runs(mv3d_project) == [] and mv3d_project.manifest()["stages"] == {}


@pytest.mark.parametrize("bad", ["stage_lock", "Make-a", "1st", "-lead", "make a", "../escape", ""])
def test_invalid_stage_names_are_refused(bad):
    from mv3dtk import Stage

    cmd = click.Command("x")
    with pytest.raises(ValueError, match=f"^stage name {re.escape(repr(bad))} must be lowercase letters, digits "
                                         "and '-'$"):
        Stage(bad, cmd)
    assert Stage("make-a2", cmd).name == "make-a2"
    with pytest.raises(TypeError, match="stage 'make-a': command must be a click.Command"):
        Stage("make-a", lambda: None)


@pytest.mark.parametrize("key", ["stage_lock", "prep", "Prep.volumes", ".volumes", "prep/volumes", ""])
def test_invalid_artifact_keys_are_refused(key):
    from mv3dtk import Artifact

    with pytest.raises(ValueError, match=f"^artifact key {re.escape(repr(key))} must look like '<stage>.<name>'$"):
        Artifact(key)


@pytest.mark.parametrize("path", ["../escape", "prep/../../escape", "/etc/passwd"])
def test_artifact_paths_outside_the_project_are_refused(path):
    from mv3dtk import Artifact

    with pytest.raises(ValueError, match=f"^artifact 'x.y': path {re.escape(repr(path))} must stay inside the "
                                         "project$"):
        Artifact("x.y", path)
    assert Artifact("x.y").path == "x/y" and Artifact("x.y.z", "x/a..b").path == "x/a..b"
