"""Plugin discovery through real distributions on sys.path: broken plugins, name clashes,
MV3D_LOAD_PLUGINS. The CLI must keep working whatever a plugin does."""

from __future__ import annotations

import json

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
BROKEN = "raise ImportError('numpy.core is gone')\n"
CLASH = '''
import click
from mv3dtk import Stage

@click.command("synth")
def synth():
    """A plugin that tries to replace a core stage."""

STAGE = Stage("synth", synth, project=False)
'''
NOT_A_STAGE = "STAGE = 42\n"


def _install_all(site):
    make_distribution(site, "mv3d-hello", {"hello": "mv3d_hello:STAGE"}, {"mv3d_hello": GOOD})
    make_distribution(site, "mv3d-broken", {"broken": "mv3d_broken:STAGE"}, {"mv3d_broken": BROKEN}, version="2.0")
    make_distribution(site, "mv3d-clash", {"synth": "mv3d_clash:STAGE"}, {"mv3d_clash": CLASH})
    make_distribution(site, "mv3d-weird", {"weird": "mv3d_weird:STAGE"}, {"mv3d_weird": NOT_A_STAGE})


def _plugins(proc):
    return {p["distribution"]: p for p in json.loads(proc.stdout)}


def test_bad_plugins_are_reported_and_skipped(plugin_path):
    _install_all(plugin_path)
    plugins = _plugins(run_mv3d("plugins"))
    assert plugins["mv3d-hello"]["stages"] == ["hello"] and plugins["mv3d-hello"]["errors"] == []
    assert plugins["mv3d-broken"]["version"] == "2.0" and plugins["mv3d-broken"]["stages"] == []
    assert "ImportError: numpy.core is gone" in plugins["mv3d-broken"]["errors"][0]
    assert "clashes with the stage of the same name from 'mv3d'" in plugins["mv3d-clash"]["errors"][0]
    assert "not an mv3dtk.Stage" in plugins["mv3d-weird"]["errors"][0]
    # the CLI still works, core synth is the real one, the good plugin runs
    help_text = run_mv3d("--help").stdout
    assert "hello" in help_text and "broken" not in help_text
    assert "A plugin that tries to replace" not in run_mv3d("synth", "--help").stdout
    assert run_mv3d("hello").stdout.strip() == "hello from a plugin"


def test_calling_a_broken_plugin_stage_explains_why(plugin_path):
    _install_all(plugin_path)
    proc = run_mv3d("broken", check=False)
    assert proc.returncode != 0
    assert "numpy.core is gone" in proc.stderr and "mv3d plugins" in proc.stderr


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
