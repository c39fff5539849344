"""pytest fixtures for stage and plugin authors (auto-loaded through the ``pytest11`` entry point).

    def test_my_stage(mv3d_project, mv3d_cli, synthetic_ctrate):
        result = mv3d_cli(["my-stage", str(synthetic_ctrate)], project=mv3d_project)
        assert (mv3d_project.root / "my-stage" / "out.csv").exists()

Everything here is real: a real project directory, the real CLI, a real synthetic dataset.

The test kit around the fixtures (never imported by the product; it needs the ``dev`` extra, pytest):

* :mod:`mv3dtk.testing.fake_llm`: a loopback Ollama/OpenAI chat server (the ``fake_llm`` fixture);
* :mod:`mv3dtk.testing.tiny_models`: a tiny, randomly initialised BERT with a WordPiece vocabulary
  trained on report text, for tests and demos;
* :mod:`mv3dtk.testing.tiny_llama`: a tiny, randomly initialised Llama-3-style LLM folder (byte-level BPE,
  chat template, safetensors) for the VQA tests;
* :mod:`mv3dtk.testing.seg_data`: a TotalSegmentator-layout copy with masks shuffled between cases (the
  control of segmentation learning).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import pytest
from click.testing import CliRunner

from ..cli import cli
from ..data.synth import make_synthetic_dataset
from ..project import Project
from .fake_llm import FakeLLM


@pytest.fixture
def mv3d_project(tmp_path: Path):
    """A freshly initialised, empty project."""
    return Project.init(tmp_path / "project")


@pytest.fixture(scope="session")
def synthetic_ctrate(tmp_path_factory) -> Path:
    """A small synthetic CT-RATE + RadGenome dataset (made once per test session)."""
    root = tmp_path_factory.mktemp("synthetic_ctrate")
    make_synthetic_dataset(root, n_train=6, n_valid=3, shape=(32, 64, 64), seed=0)
    return root


@pytest.fixture
def mv3d_cli() -> Callable:
    """Invoke the ``mv3d`` CLI in-process. ``ok=True`` asserts exit code 0 and shows the output
    and traceback when it is not; ``ok=False`` asserts a failure."""

    def invoke(args: Sequence[str], project=None, ok: bool | None = True, env: dict | None = None):
        argv = (["-P", str(getattr(project, "root", project))] if project is not None else []) + list(args)
        result = CliRunner().invoke(cli, argv, env=env, catch_exceptions=True)
        if ok is True:
            assert result.exit_code == 0, f"mv3d {' '.join(argv)} failed:\n{result.output}\n{result.exception!r}"
        elif ok is False:
            assert result.exit_code != 0, f"mv3d {' '.join(argv)} unexpectedly succeeded:\n{result.output}"
        return result

    return invoke


@pytest.fixture(name="fake_llm")  # the function keeps another name: ``fake_llm`` is the subpackage
def fake_llm_server(monkeypatch):
    """A real HTTP server on 127.0.0.1 speaking Ollama's ``/api/chat`` and OpenAI's
    ``/v1/chat/completions`` (see :mod:`mv3dtk.testing.fake_llm`): ``fake_llm.url`` is an Ollama host,
    ``fake_llm.openai_url`` an OpenAI base URL; ``fake_llm.requests`` records what arrived."""
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    with FakeLLM() as server:
        yield server
