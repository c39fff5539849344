"""Test helpers: real distributions on disk, the real console script, a test plugin's source."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def make_distribution(root: Path, name: str, entry_points: dict[str, str], modules: dict[str, str],
                      version: str = "0.1.0") -> Path:
    """Write a real installed distribution (``*.dist-info`` + modules) into ``root``; putting
    ``root`` on ``sys.path`` / ``PYTHONPATH`` makes importlib.metadata find its entry points."""
    root.mkdir(parents=True, exist_ok=True)
    info = root / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    lines = ["[mv3d.stages]"] + [f"{k} = {v}" for k, v in entry_points.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    for mod, src in modules.items():
        (root / f"{mod}.py").write_text(textwrap.dedent(src))
    return root


def run_mv3d(*args: str, env: dict | None = None, cwd: Path | None = None, check: bool = True,
             timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the real ``mv3d`` console script in a subprocess."""
    exe = Path(sys.executable).with_name("mv3d")
    proc = subprocess.run([str(exe), *args], capture_output=True, text=True, env={**os.environ, **(env or {})},
                          cwd=cwd, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"mv3d {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc



TEST_STAGES = '''
import os, time
from pathlib import Path
import click
from mv3dtk import Artifact, Mv3dError, Stage, pass_stage_context
from mv3dtk.fs import atomic_path, atomic_write_text


@click.command("make-a")
@click.option("--value", default=1, type=int, help="Value to write.")
@click.option("--api-key", default=None, help="A secret that must never be recorded.")
@click.option("--wait-for", default=None, type=click.Path(path_type=Path),
              help="Hold the stage (its lock taken, its run recorded) until this file exists (at most 120 s).")
@click.option("--fail-after-partial", is_flag=True, help="Write half a file, then fail.")
@click.option("--user-error", is_flag=True)
@pass_stage_context
def make_a(sctx, value, api_key, wait_for, fail_after_partial, user_error):
    """Write make-a/data.txt."""
    sctx.log.info("make-a writing value %d", value)
    deadline = time.monotonic() + 120
    while wait_for is not None and not wait_for.exists():
        if time.monotonic() > deadline:
            raise Mv3dError(f"{wait_for} did not appear within 120 s")
        time.sleep(0.02)
    if user_error:
        raise Mv3dError("bad value; pass --value 5")
    with atomic_path(sctx.output_path("make-a.data")) as tmp:
        with open(tmp, "w") as fh:
            fh.write(f"value={value}\\n")
            if fail_after_partial:
                fh.write("partial")
                fh.flush()
                raise RuntimeError("crashed half-way")


@click.command("use-a")
@pass_stage_context
def use_a(sctx):
    """Read make-a's output, write use-a/result.txt."""
    data = sctx.input_path("make-a.data").read_text()
    atomic_write_text(sctx.output_path("use-a.result"), data.upper())


@click.command("forgetful")
@pass_stage_context
def forgetful(sctx):
    """Declares an output and never writes it."""


MAKE_A = Stage("make-a", make_a, outputs=(Artifact("make-a.data", "make-a/data.txt"),))
USE_A = Stage("use-a", use_a, inputs=("make-a.data",), outputs=(Artifact("use-a.result", "use-a/result.txt"),))
FORGETFUL = Stage("forgetful", forgetful, outputs=("forgetful.out",))
'''

ENTRY_POINTS = {"make-a": "mv3d_teststages:MAKE_A", "use-a": "mv3d_teststages:USE_A",
                "forgetful": "mv3d_teststages:FORGETFUL"}


def make_pretrain_project(root: Path):
    """A prepped and rewritten 8 + 2 volume synthetic project and a tiny BERT trained on its reports:
    what the pretraining tests start from. -> (project, bert directory)."""
    from mv3dtk import Project
    from mv3dtk.data.ctrate import read_csv_rows, reports_csv
    from mv3dtk.data.synth import make_synthetic_dataset
    from mv3dtk.testing.tiny_models import make_tiny_bert

    data = make_synthetic_dataset(root / "data", n_train=8, n_valid=2, shape=(32, 64, 64), seed=0).root
    texts = [r["Findings_EN"] for r in read_csv_rows(data / reports_csv("train"))]
    bert = make_tiny_bert(root / "bert", texts, vocab_size=500, seed=0)
    project = Project.init(root / "project")
    run_mv3d("-P", str(project.root), "prep", str(data), "--size", "32", "64", "64", "--spacing", "3", "0.75", "0.75")
    run_mv3d("-P", str(project.root), "rewrite")
    return project, bert


# The small pretraining setting the pretrain, kill and checkpoint tests share.
SMALL_PRETRAIN = ["--backbone", "vit", "--model-config", "vit-tiny", "--batch-size", "4", "--workers", "0",
                  "--lr", "1e-3", "--warmup-steps", "2", "--rsmb-size", "64"]


def pretrain(project, bert, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """``mv3d pretrain`` in the small setting with the tiny BERT of :func:`make_pretrain_project`."""
    return run_mv3d("-P", str(project.root), "pretrain", *SMALL_PRETRAIN, "--text-encoder", str(bert), *args,
                    check=check, timeout=600)


def copy_project(project, dst: Path):
    """A private copy of a module-scoped template project, for a test that changes it."""
    import shutil

    from mv3dtk import Project

    shutil.copytree(project.root, dst)
    return Project(dst)


def make_prepped_project(root: Path, *, n_train: int, n_valid: int, seed: int):
    """A tiny synthetic dataset (16 x 32 x 32 scans) prepped into ``root/template``."""
    from mv3dtk import Project
    from mv3dtk.data.synth import make_synthetic_dataset

    data = make_synthetic_dataset(root / "data", n_train=n_train, n_valid=n_valid, shape=(16, 32, 32), seed=seed).root
    project = Project.init(root / "template")
    run_mv3d("-P", str(project.root), "prep", str(data), "--spacing", "3", "1.5", "1.5", "--size", "16", "16", "16")
    return project
