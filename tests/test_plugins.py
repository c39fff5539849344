"""Plugin discovery through real distributions on sys.path: broken plugins, name clashes,
MV3D_LOAD_PLUGINS. The CLI must keep working whatever a plugin does."""

from __future__ import annotations

import json

import pytest

from helpers import make_distribution, run_mv3d

GOOD = '''
import click
from mv3dtk import Stage

@click.command("hello")
def hello():
    """Say hello."""
    click.echo("hello from a plugin")

STAGE = Stage("hello", hello, project=False)
'''
CLASH = '''
import click
from mv3dtk import Stage

@click.command("synth")
def synth():
    """A plugin that tries to replace a core stage."""

STAGE = Stage("synth", synth, project=False)
'''
NOT_A_STAGE = "STAGE = 42\n"
# Plugins whose entry point fails to load, each in its own way; the registry must catch every one of them.
# stage name -> (distribution, entry point, its module's source or None for no module, the cause reported)
BROKEN = {
    "broken": ("mv3d-broken", "mv3d_broken:STAGE", "raise ImportError('numpy.core is gone')\n",
               "ImportError: numpy.core is gone"),
    "crash": ("mv3d-crash", "mv3d_crash:STAGE", "raise RuntimeError('CUDA driver too old')\n",
              "RuntimeError: CUDA driver too old"),
    "typo": ("mv3d-typo", "mv3d_typo:STAGE", "def stage(:\n    pass\n",
             "SyntaxError: invalid syntax (mv3d_typo.py, line 1)"),
    "exits": ("mv3d-exits", "mv3d_exits:STAGE", "import sys\nsys.exit(3)\n", "SystemExit: 3"),
    "noattr": ("mv3d-half", "mv3d_half:STAGE", GOOD.replace('"hello"', '"half"').replace("STAGE =", "HALF ="),
               "AttributeError: module 'mv3d_half' has no attribute 'STAGE'"),
    "nomodule": ("mv3d-nomodule", "mv3d_nomodule_gone:STAGE", None,
                 "ModuleNotFoundError: No module named 'mv3d_nomodule_gone'"),
}


def _install_all(site):
    make_distribution(site, "mv3d-hello", {"hello": "mv3d_hello:STAGE"}, {"mv3d_hello": GOOD})
    for name, (dist, ep, src, _) in BROKEN.items():
        eps = {name: ep} | ({"half": "mv3d_half:HALF"} if dist == "mv3d-half" else {})  # one good stage beside
        make_distribution(site, dist, eps, {ep.split(":")[0]: src} if src else {},
                          version="2.0" if name == "broken" else "0.1.0")
    make_distribution(site, "mv3d-clash", {"synth": "mv3d_clash:STAGE"}, {"mv3d_clash": CLASH})
    make_distribution(site, "mv3d-weird", {"weird": "mv3d_weird:STAGE"}, {"mv3d_weird": NOT_A_STAGE})


def _plugins(proc):
    return {p["distribution"]: p for p in json.loads(proc.stdout)}


def _help_stages(help_text: str) -> set[str]:
    """The stage names of ``mv3d --help`` (the rows of its Stages section)."""
    section = help_text.split("\nStages:\n", 1)[1].split("\nCommands:\n", 1)[0]
    return {line.split()[0] for line in section.splitlines() if line.startswith("  ") and not line.startswith("   ")}


def test_bad_plugins_are_reported_and_skipped(plugin_path):
    _install_all(plugin_path)
    plugins = _plugins(run_mv3d("plugins"))
    assert plugins["mv3d-hello"]["stages"] == ["hello"] and plugins["mv3d-hello"]["errors"] == []
    assert plugins["mv3d-broken"]["version"] == "2.0"
    for name, (dist, ep, _, cause) in BROKEN.items():
        assert plugins[dist]["errors"] == [f"stage {name!r} ({ep}): import failed: {cause}"], name
    assert plugins["mv3d-half"]["stages"] == ["half"]  # its good entry point still loads
    assert all(plugins[d]["stages"] == [] for d, *_ in BROKEN.values() if d != "mv3d-half")
    assert "clashes with the stage of the same name from 'mv3d'" in plugins["mv3d-clash"]["errors"][0]
    assert "not an mv3dtk.Stage" in plugins["mv3d-weird"]["errors"][0]
    # the CLI still works: --help lists exactly the core and the good stages, core synth is the real one,
    # the good plugins run
    help_proc = run_mv3d("--help")
    core = {r["stage"] for r in json.loads(run_mv3d("stages", "--json", env={"MV3D_LOAD_PLUGINS": ""}).stdout)}
    assert _help_stages(help_proc.stdout) == core | {"stats", "hello", "half"}, help_proc.stdout
    assert help_proc.stderr == ""
    assert "A plugin that tries to replace" not in run_mv3d("synth", "--help").stdout
    assert run_mv3d("hello").stdout.strip() == "hello from a plugin"
    assert run_mv3d("half").stdout.strip() == "hello from a plugin"


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_calling_a_broken_plugin_stage_explains_why(plugin_path, name):
    _install_all(plugin_path)
    dist, ep, _, cause = BROKEN[name]
    proc = run_mv3d(name, "--help", check=False)
    assert proc.returncode == 1 and proc.stdout == "" and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr == (f"Error: stage {name!r} ({ep}): import failed: {cause} (plugin {dist}); "
                           f"fix or reinstall that plugin (pip install --force-reinstall {dist}) or uninstall it; "
                           "see: mv3d plugins\n")


def test_load_plugins_env_limits_what_loads(plugin_path):
    _install_all(plugin_path)
    none = _plugins(run_mv3d("plugins", env={"MV3D_LOAD_PLUGINS": ""}))
    assert none == {}
    assert "synth" in run_mv3d("--help", env={"MV3D_LOAD_PLUGINS": ""}).stdout  # core always loads
    only = _plugins(run_mv3d("plugins", env={"MV3D_LOAD_PLUGINS": "mv3d_hello, mv3d-stats"}))
    assert set(only) == {"mv3d-hello", "mv3d-stats"}


def test_in_process_discovery_sees_new_distributions(plugin_path, mv3d_cli):
    from mv3dtk.registry import clear_cache, get_registry

    assert "hello" not in get_registry().stages
    make_distribution(plugin_path, "mv3d-hello", {"hello": "mv3d_hello:STAGE"}, {"mv3d_hello": GOOD})
    clear_cache()
    assert get_registry().stages["hello"].distribution == "mv3d-hello"
    assert mv3d_cli(["hello"]).output.strip() == "hello from a plugin"
