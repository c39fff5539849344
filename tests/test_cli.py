"""The root command and the built-ins: help, version, init, status, stages, plugins."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers import run_mv3d
from mv3dtk.errors import NotAProjectError
from mv3dtk.project import Project

HEAVY = ("torch", "monai", "transformers", "duckdb", "nnunetv2", "polars", "numpy", "peft", "nibabel")


def test_help_lists_stages_with_summaries_and_builtins(mv3d_cli):
    out = mv3d_cli(["--help"]).output
    assert "Stages:" in out and "Commands:" in out
    for name in ("synth", "stats", "init", "status", "stages", "plugins"):
        assert f"  {name}  " in out or f"  {name} " in out
    assert "Write a synthetic CT-RATE" in out  # the stage's one-line summary
    assert "-P, --project" in out and "--debug" in out


def test_help_and_every_stage_help_import_nothing_heavy():
    code = (
        "import sys\n"
        "from mv3dtk.cli import cli\n"
        "from mv3dtk.registry import get_registry\n"
        "for args in [['--help']] + [[s, '--help'] for s in get_registry().stages]:\n"
        "    try:\n"
        "        cli(args, prog_name='mv3d')\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0, (args, e.code)\n"
        f"print('HEAVY=' + ','.join(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip().splitlines()[-1] == "HEAVY=", proc.stdout.strip().splitlines()[-1]


def test_console_script_and_module_entry_agree():
    a = run_mv3d("--version").stdout.strip()
    b = subprocess.run([sys.executable, "-m", "mv3dtk", "--version"], capture_output=True, text=True, check=True)
    from mv3dtk import __version__

    assert a == b.stdout.strip() == f"mv3d {__version__}"


def test_init_creates_skeleton_and_is_idempotent(tmp_path, mv3d_cli):
    d = tmp_path / "proj"
    assert "Initialised project" in mv3d_cli(["init", str(d)]).output
    assert (d / "mv3d.toml").is_file() and (d / "runs").is_dir()
    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest == {"schema_version": 1, "artifacts": {}, "stages": {}}
    (d / "mv3d.toml").write_text("[stages.synth]\nseed = 3\n")
    assert "already exists" in mv3d_cli(["init", str(d)]).output
    assert (d / "mv3d.toml").read_text() == "[stages.synth]\nseed = 3\n"  # user settings kept


def test_init_refuses_a_file_and_says_why(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    proc = run_mv3d("init", str(f), check=False)
    assert proc.returncode == 2, proc.stderr  # a usage error, not a crash
    assert f"Error: Invalid value for '[DIRECTORY]': Directory '{f}' is a file." in proc.stderr
    assert "Try 'mv3d init --help' for help." in proc.stderr and "Traceback" not in proc.stderr
    assert f.read_text() == "x" and [p.name for p in tmp_path.iterdir()] == ["file"]  # nothing written
    # the library's own guard, for callers that bypass Click (prep creating its project in place)
    with pytest.raises(NotAProjectError, match=r"exists and is a file; choose another project directory"):
        Project.init(f)


def test_status_outside_a_project_says_how_to_create_one(tmp_path):
    proc = run_mv3d("-P", str(tmp_path / "nope"), "status", check=False)
    assert proc.returncode == 1
    assert "Error: project directory" in proc.stderr and "mv3d init" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_debug_shows_the_traceback(tmp_path):
    proc = run_mv3d("--debug", "-P", str(tmp_path / "nope"), "status", check=False)
    assert proc.returncode == 1 and "Traceback" in proc.stderr
    assert "mv3dtk.errors.NotAProjectError: project directory" in proc.stderr and "mv3d init" in proc.stderr
    proc = run_mv3d("-P", str(tmp_path / "nope"), "status", check=False, env={"MV3D_DEBUG": "1"})
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "NotAProjectError" in proc.stderr


def test_project_from_environment(tmp_path, mv3d_cli):
    mv3d_cli(["init", str(tmp_path / "p")])
    out = mv3d_cli(["status"], env={"MV3D_PROJECT": str(tmp_path / "p")}).output
    assert "stats" in out and "missing" in out


def test_status_of_a_fresh_project_lists_stages_as_missing(mv3d_project, mv3d_cli):
    rows = json.loads(mv3d_cli(["status", "--json"], project=mv3d_project).output)
    assert {r["stage"]: r["status"] for r in rows}["stats"] == "missing"
    assert "synth" not in {r["stage"] for r in rows}  # project-less stage


def test_stages_json_describes_inputs_and_outputs(mv3d_cli):
    rows = {r["stage"]: r for r in json.loads(mv3d_cli(["stages", "--json"]).output)}
    assert rows["synth"]["distribution"] == "mv3d"
    assert rows["stats"]["distribution"] == "mv3d-stats"
    assert rows["stats"]["outputs"] == ["stats.summary", "stats.plot"]


def test_plugins_json_lists_third_party_only_unless_all(mv3d_cli):
    plugins = json.loads(mv3d_cli(["plugins"]).output)
    assert [p["distribution"] for p in plugins] == ["mv3d-stats"]
    assert plugins[0] == {"distribution": "mv3d-stats", "version": "0.1.0", "stages": ["stats"], "errors": []}
    everything = json.loads(mv3d_cli(["plugins", "--all"]).output)
    assert {p["distribution"] for p in everything} == {"mv3d", "mv3d-stats"}


def test_unknown_command_suggests_the_closest(mv3d_cli):
    res = mv3d_cli(["stat"], ok=False)
    assert res.exit_code == 2 and "No such stage or command 'stat'" in res.output and "Did you mean" in res.output


def test_verbosity_flags(tmp_path, mv3d_cli):
    d = tmp_path / "data"
    quiet = run_mv3d("-q", "synth", str(d), "--n-train", "1", "--n-valid", "1", "--shape", "16", "32", "32")
    assert "INFO" not in quiet.stderr
    loud = run_mv3d("-v", "synth", str(d), "--n-train", "1", "--n-valid", "1", "--shape", "16", "32", "32")
    assert "INFO" in loud.stderr and "DEBUG" in loud.stderr


# -- the first command, typed in a new folder ------------------------------------------------------

def test_prep_creates_the_project_in_a_folder_that_holds_only_its_source(tmp_path):
    from mv3dtk.data.ctrate import read_csv_rows, reports_csv
    from mv3dtk.data.synth import make_synthetic_dataset
    from mv3dtk.testing.tiny_models import make_tiny_bert

    work = tmp_path / "work"
    data = make_synthetic_dataset(work / "ctrate", n_train=4, n_valid=1, shape=(32, 64, 64), seed=0).root
    texts = [r["Findings_EN"] for r in read_csv_rows(data / reports_csv("train"))]
    bert = make_tiny_bert(tmp_path / "bert", texts, vocab_size=300, seed=0)
    proc = run_mv3d("prep", "ctrate/", "--size", "32", "64", "64", "--spacing", "3", "0.75", "0.75", cwd=work)
    assert f"created an mv3d project in {work}\n" in proc.stderr
    assert (work / "mv3d.toml").is_file() and (work / "prep" / "volumes.parquet").is_file()
    again = run_mv3d("prep", "ctrate/", "--size", "32", "64", "64", "--spacing", "3", "0.75", "0.75", cwd=work)
    assert "created an mv3d project" not in again.stderr
    run_mv3d("pretrain", "--backbone", "unimiss", "--model-config", "unimiss-tiny", "--batch-size", "2",
             "--workers", "0", "--warmup-steps", "1", "--rsmb-size", "16", "--text-encoder", str(bert),
             "--max-steps", "1", "--run", "first", cwd=work, timeout=300)
    assert (work / "pretrain" / "first" / "model").is_dir()


def test_prep_in_an_empty_folder_with_the_source_elsewhere(tmp_path, synthetic_ctrate):
    (tmp_path / "new").mkdir()
    proc = run_mv3d("prep", str(synthetic_ctrate), "--limit", "1", "--size", "32", "64", "64", cwd=tmp_path / "new")
    assert f"created an mv3d project in {tmp_path / 'new'}\n" in proc.stderr


def test_prep_refuses_a_folder_with_other_files_and_other_stages_an_empty_one(tmp_path, synthetic_ctrate):
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    proc = run_mv3d("prep", str(synthetic_ctrate), cwd=other, check=False)
    assert proc.returncode == 1 and "is not an mv3d project" in proc.stderr and "mv3d init" in proc.stderr
    assert "notes.txt" in proc.stderr and not (other / "mv3d.toml").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    for stage in ("zeroshot", "rewrite"):
        proc = run_mv3d(stage, cwd=empty, check=False)
        assert proc.returncode == 1 and "is not an mv3d project" in proc.stderr and "mv3d init" in proc.stderr
    assert list(empty.iterdir()) == []
