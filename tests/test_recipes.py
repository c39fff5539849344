"""Recipes stay runnable: strict bash, only mv3d calls, and every option they pass exists (options
kept in bash arrays, `OPTS=(--a 1 --b)` then `"${OPTS[@]}"`, are expanded and checked too)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from mv3dtk.cli import cli
from mv3dtk.registry import get_registry

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
