"""The example settings and API script keep working as the stages change."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from mv3dtk.config import check_stage_settings, default_map
from mv3dtk.registry import get_registry

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize("name", ["cpu-demo.toml", "paper.toml"])
def test_example_settings_name_real_options(name):
    settings = tomllib.loads((EXAMPLES / name).read_text())
    stages = get_registry().stages
    for stage, table in default_map(settings).items():
        assert stage in stages, f"{name}: [stages.{stage}] is not an installed stage"
        check_stage_settings(stage, stages[stage].command, table, EXAMPLES / name)  # raises on a typo


def test_python_api_example_runs(tmp_path):
    proc = subprocess.run([sys.executable, str(EXAMPLES / "python_api.py"), str(tmp_path)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "volumes ok" in proc.stdout and "(32, 32, 32) float16" in proc.stdout
