"""Recipes stay runnable: strict bash, only mv3d calls, and every option they pass exists."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from mv3dtk.cli import cli
from mv3dtk.registry import get_registry

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*"))
ALLOWED = {"set", "mv3d", "echo", "P=", "DIR=", "CTRATE=", "RADGENOME=", "N=", "RUN=", "HEAD=", "RESUME=", "[", "srun"}


def _commands(text: str) -> list[list[str]]:
    text = re.sub(r"\\\n\s*", " ", text)
    return [shlex.split(line, comments=True) for line in text.splitlines() if line.strip() and
            not line.lstrip().startswith("#")]


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
    stages = get_registry().stages
    for words in _commands(text):
        assert any(words[0].startswith(a) for a in ALLOWED), f"{recipe.name}: unexpected command {words[0]!r}"
        for args in _mv3d_calls(words):
            while args and args[0] in ("-P", "--project"):
                args = args[2:]
            name = args[0]
            cmd = cli.commands.get(name) or stages[name].command
            known = {o for p in cmd.params for o in p.opts}
            for a in args[1:]:
                if a.startswith("--"):
                    assert a.split("=")[0] in known, f"{recipe.name}: mv3d {name} has no option {a}"
