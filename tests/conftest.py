"""Shared fixtures. ``mv3d_project``, ``mv3d_cli`` and ``synthetic_ctrate`` come from
``mv3dtk.testing`` (a pytest11 plugin, also available to plugin authors)."""

from __future__ import annotations

import os
import sys

import pytest

from mv3dtk import registry
from helpers import ENTRY_POINTS, TEST_STAGES, make_distribution


@pytest.fixture
def plugin_path(tmp_path, monkeypatch):
    """A folder on sys.path (and PYTHONPATH for subprocesses) where tests install distributions."""
    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    registry.clear_cache()
    yield root
    registry.clear_cache()


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for the module (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``): tiny models
    on a busy 2-core box run many times faster on one thread than on two that contend."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _isolate(monkeypatch):
    """No test sees the developer's MV3D_* environment, and the stage cache starts clean."""
    for k in list(os.environ):
        if k.startswith("MV3D_"):
            monkeypatch.delenv(k)
    registry.clear_cache()
    yield
    registry.clear_cache()


@pytest.fixture
def teststages(plugin_path):
    """Install the test distribution ``mv3d-teststages`` (stages make-a, use-a, forgetful)."""
    make_distribution(plugin_path, "mv3d-teststages", ENTRY_POINTS, {"mv3d_teststages": TEST_STAGES})
    registry.clear_cache()
    yield plugin_path
    sys.modules.pop("mv3d_teststages", None)


def pytest_collection_modifyitems(config, items):
    """``@pytest.mark.gpu`` tests run only where CUDA is available."""
    if not any("gpu" in item.keywords for item in items):
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# --- the time budget of each test (issue #17: no test over half its own timeout) -----------------------
_SPENT: dict[str, float] = {}
_LIMIT: dict[str, float] = {}


def pytest_runtest_logreport(report):
    _SPENT[report.nodeid] = _SPENT.get(report.nodeid, 0.0) + report.duration


def pytest_runtest_setup(item):
    marker = item.get_closest_marker("timeout")
    limit = marker.args[0] if marker and marker.args else item.config.getini("timeout")
    if limit:
        _LIMIT[item.nodeid] = float(limit)


def pytest_terminal_summary(terminalreporter):
    """Report (never assert: timings are the machine's, not the code's) the tests nearest their timeout."""
    share = sorted(((_SPENT.get(n, 0.0) / lim, n) for n, lim in _LIMIT.items() if lim), reverse=True)
    if not share:
        return
    tr = terminalreporter
    tr.write_sep("-", "share of its own timeout used, top 5 (keep each under 50 %)")
    for frac, nodeid in share[:5]:
        tr.write_line(f"{frac:6.1%}  {_SPENT[nodeid]:7.1f} s of {_LIMIT[nodeid]:.0f} s  {nodeid}")
    over = [n for f, n in share if f > 0.5]
    tr.write_line(f"{len(over)} test(s) over half their timeout" + (": " + ", ".join(over) if over else ""))
