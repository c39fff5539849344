"""Recipes stay runnable: strict bash, only mv3d calls, and every option they pass exists (options
kept in bash arrays, `OPTS=(--a 1 --b)` then `"${OPTS[@]}"`, are expanded and checked too); the
quickstart itself runs end to end at a small size."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest

from mv3dtk.cli import cli
from mv3dtk.registry import get_registry
from test_summary import assert_summary_matches_runs

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*"))
ALLOWED = {"set", "mv3d", "echo", "[", "srun"}
ASSIGNMENT = re.compile(r"^([A-Z_]+)=(.*)$")


def _commands(text: str) -> list[list[str]]:
    text = re.sub(r"\\\n\s*", " ", text)
    return [shlex.split(line, comments=True) for line in text.splitlines() if line.strip() and
            not line.lstrip().startswith("#")]


def _arrays(text: str) -> dict[str, list[str]]:
    """The recipe's array variables: NAME=(words ...)."""
    out = {}
    for words in _commands(text):
        m = ASSIGNMENT.match(" ".join(words))
        if m and m.group(2).startswith("(") and m.group(2).endswith(")"):
            out[m.group(1)] = shlex.split(m.group(2)[1:-1])
    return out


def _expand(args: list[str], arrays: dict[str, list[str]]) -> list[str]:
    out = []
    for a in args:
        m = re.fullmatch(r"\$\{([A-Z_]+)\[@\]\}", a)
        out += arrays[m.group(1)] if m else [a]
    return out


def _subcommand(cmd, args: list[str]):
    """A group's subcommand named in args (``index-texts search ...``), with the args after it."""
    while getattr(cmd, "commands", None) and len(args) > 1 and args[1] in cmd.commands:
        cmd, args = cmd.commands[args[1]], args[1:]
    return cmd, args


def _mv3d_calls(words: list[str]) -> list[list[str]]:
    if words[0] == "mv3d":
        return [words[1:]]
    if "mv3dtk" in words:  # srun torchrun ... -m mv3dtk ARGS
        return [words[words.index("mv3dtk") + 1:]]
    return []


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_is_strict_and_its_options_exist(recipe):
    text = recipe.read_text()
    assert "set -euo pipefail" in text
    stages, arrays = get_registry().stages, _arrays(text)
    for words in _commands(text):
        assert words[0] in ALLOWED or ASSIGNMENT.match(words[0]), f"{recipe.name}: unexpected command {words[0]!r}"
        for args in _mv3d_calls(words):
            args = _expand(args, arrays)
            while args and args[0] in ("-P", "--project"):
                args = args[2:]
            name = args[0]
            cmd, args = _subcommand(cli.commands.get(name) or stages[name].command, args)
            known = {o for p in cmd.params for o in p.opts}
            for a in args[1:]:
                if a.startswith("--"):
                    assert a.split("=")[0] in known, f"{recipe.name}: mv3d {name} has no option {a}"


def test_make_demo_runs_the_quickstart_and_it_runs_every_evaluation_step():
    root = RECIPES[0].parent.parent
    assert "bash recipes/quickstart.sh" in (root / "Makefile").read_text()
    calls = [args for words in _commands((root / "recipes/quickstart.sh").read_text()) for args in _mv3d_calls(words)]
    steps = [next(a for a in args if not a.startswith("-") and a != "$P") for args in calls]
    assert steps == ["synth", "init", "prep", "rewrite", "index-texts", "index-texts", "pretrain", "zeroshot",
                     "retrieve", "summary"]


QUICK = {"MV3D_DEMO_N_TRAIN": "6", "MV3D_DEMO_N_VALID": "6", "MV3D_DEMO_EPOCHS": "1", "MV3D_DEMO_BATCH_SIZE": "4",
         "MV3D_DEMO_WARMUP_STEPS": "1"}


@pytest.mark.slow
@pytest.mark.timeout(480)  # 67 s of CPU (<= ~70 s on 2 idle cores); 70-115 s on a box shared at load 4-6
def test_the_quickstart_runs_end_to_end_at_a_small_size_and_its_summary_reads_the_real_runs(tmp_path):
    """`make demo`'s script itself, with the sizes of its header turned down: every step runs, the
    model it pretrains is evaluated, and the closing `mv3d summary` shows what those runs wrote."""
    root = RECIPES[0].parent.parent
    env = {k: v for k, v in os.environ.items() if not k.startswith("MV3D_")}
    env.update(QUICK, PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    cwd = tmp_path / "cwd"  # elsewhere, so that summary prints absolute paths
    cwd.mkdir()
    proc = subprocess.run(["bash", str(root / "recipes/quickstart.sh"), str(tmp_path / "demo")], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=450)
    assert proc.returncode == 0, f"quickstart exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    assert re.search(r"quickstart finished in \d+s", proc.stdout)
    p = tmp_path / "demo/project"
    steps = [json.loads(line)["step"] for line in (p / "pretrain/quickstart/metrics.jsonl").read_text().splitlines()]
    assert steps and steps == list(range(1, len(steps) + 1))
    model = json.loads((p / "zeroshot/quickstart/metrics.json").read_text())["model"]
    assert model == str(p / "pretrain/quickstart/model")  # the model this run pretrained
    assert_summary_matches_runs(p, proc.stdout, "quickstart", "quickstart")
    assert f"pretraining loss   {p / 'pretrain/quickstart/loss.png'}" in proc.stdout
    for png in (p / "zeroshot/quickstart/roc.png", p / "pretrain/quickstart/loss.png"):
        img = mpimg.imread(png)[..., :3]
        assert min(img.shape[:2]) > 200 and img.std() > 0.05 and len(np.unique(img.reshape(-1, 3), axis=0)) > 20
