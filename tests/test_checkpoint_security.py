"""Files that could carry a pickle, planted with one that runs a shell command: nothing runs, and the
real command ends in a clear ``Error:`` (exit 1, no traceback).

Every file mv3d loads that could hold a pickle (``grep -rn "torch.load\\|pickle\\|np.load" mv3dtk``):

- a pretraining checkpoint: ``optimizer.pt``, ``rng.pt`` (``torch.load(weights_only=True)``) and
  ``model.safetensors``, ``bank.safetensors`` (safetensors; a pickle put in their place): ``--resume``;
- a saved model (``pretrain/<run>/model``): ``model.safetensors`` and the text tower's weights in
  ``text/`` (transformers reads a ``pytorch_model.bin`` with ``weights_only=True``): ``--init-from``
  and :func:`mv3dtk.load_model` (what zeroshot and retrieve load);
- prep's volumes and masks (``np.load(allow_pickle=False)``, memory-mapped): ``mv3d pretrain``;
- an official UniMiSS ``.pth``: ``tests/test_unimiss.py`` (no command loads one yet).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from helpers import SMALL_PRETRAIN, copy_project, make_pretrain_project, pretrain, run_mv3d
from mv3dtk import Mv3dError, load_model

SMALL = SMALL_PRETRAIN


class RunsCommand:
    """Unpickling this runs a shell command (what a malicious checkpoint does): ``touch marker``."""

    def __init__(self, marker):
        self.command = f"touch {shlex.quote(str(marker))}"

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """A project with run ``r``: 2 steps, a checkpoint after each, its model saved."""
    project, bert = make_pretrain_project(tmp_path_factory.mktemp("sec"))
    _pretrain(project, bert, "--max-steps", "2", "--checkpoint-every", "1", "--run", "r")
    return project, bert


@pytest.fixture
def project(template, tmp_path):
    return copy_project(template[0], tmp_path / "p"), template[1]


_pretrain = pretrain


def _plant(path, marker, contents=None):
    """Replace ``path`` with a pickle of its real tensors plus an object whose unpickling runs a command."""
    if contents is None:  # copies: safetensors tensors are memory-mapped from the file being replaced
        contents = {k: v.clone() for k, v in load_file(path).items()}
    torch.save({**contents, "extra": RunsCommand(marker)}, path)
    with open(path, "rb") as fh:  # the control: a loader that unpickles objects runs the command
        torch.load(fh, weights_only=False)
    assert marker.exists()
    marker.unlink()


def _refused(proc, marker, *phrases):
    """The command stopped with a one-line Error that says ``phrases``, and the pickle ran nothing."""
    assert not marker.exists(), "the pickled command ran"
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    error = [ln for ln in proc.stderr.splitlines() if ln.startswith("Error: ")]
    assert len(error) == 1, proc.stderr
    for phrase in phrases:
        assert phrase in error[0], (phrase, error[0])
    return error[0]


@pytest.mark.parametrize("name", ["optimizer.pt", "rng.pt", "model.safetensors", "bank.safetensors"])
def test_a_checkpoint_file_with_pickled_code_is_refused_on_resume(project, tmp_path, name):
    p, bert = project
    run, marker = p.root / "pretrain" / "r", tmp_path / "PWNED"
    ckpt = run / "checkpoints" / "step-00000002"
    _plant(ckpt / name, marker, None if name.endswith(".safetensors") else torch.load(ckpt / name, weights_only=True))
    metrics = (run / "metrics.jsonl").read_text()
    proc = _pretrain(p, bert, "--max-steps", "3", "--checkpoint-every", "1", "--run", "r", "--resume", check=False)
    what = "holds pickled Python code" if name.endswith(".pt") else "is not a safetensors file written by mv3d"
    error = _refused(proc, marker, f"cannot resume from {ckpt}: {name} {what}", "nothing in it was run",
                     f"Delete {ckpt} to resume from the checkpoint before it", "--run NEW_NAME")
    if name.endswith(".pt"):
        assert "not written by mv3d" in error and "GLOBAL posix.system" in error
    assert (run / "metrics.jsonl").read_text() == metrics  # the refused resume changed nothing
    if name == "optimizer.pt":  # the advice works: without the tampered checkpoint the run resumes from step 1
        shutil.rmtree(ckpt)
        _pretrain(p, bert, "--max-steps", "3", "--checkpoint-every", "1", "--run", "r", "--resume")
        assert [line.split(",")[0] for line in (run / "metrics.jsonl").read_text().splitlines()] == [
            '{"step": 1', '{"step": 2', '{"step": 3']
        assert not marker.exists()


@pytest.mark.parametrize("weights", ["model.safetensors", "text/pytorch_model.bin"])
def test_a_saved_model_with_pickled_code_is_refused(project, tmp_path, weights):
    """``--init-from`` and :func:`load_model` read the model's safetensors and its text tower; a pickle in
    either place runs nothing."""
    p, bert = project
    model, marker = p.root / "pretrain" / "evil", tmp_path / "PWNED"
    shutil.copytree(p.root / "pretrain" / "r" / "model", model)
    if weights.startswith("text/"):  # transformers prefers safetensors: only the .bin is left
        (model / "text" / "model.safetensors").rename(model / weights)
    _plant(model / weights, marker)
    proc = run_mv3d("-P", str(p.root), "pretrain", *SMALL, "--init-from", str(model), "--max-steps", "1",
                    "--run", "w", check=False, timeout=600)
    if weights.startswith("text/"):
        phrases = (f"the weights in {model / 'text'} hold pickled Python code or objects", "GLOBAL posix.system",
                   "nothing in them was run", "a source you trust")
    else:
        phrases = (f"{model / weights} is not a safetensors file written by mv3d", "nothing in it was run",
                   "pretrain/<run>/model/")
    _refused(proc, marker, *phrases)
    with pytest.raises(Mv3dError, match=re.escape(phrases[0])):  # zeroshot's and retrieve's loader
        load_model(model)
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["volumes", "masks"])
def test_a_prepped_array_with_pickled_code_is_refused(project, tmp_path, kind):
    p, bert = project
    marker = tmp_path / "PWNED"
    files = sorted((p.root / "prep" / kind).glob("*.npy"))
    assert len(files) > 4  # more than one global batch
    for f in files:  # every volume: whichever the first batch draws is one
        np.save(f, np.array([RunsCommand(marker)], dtype=object), allow_pickle=True)
    np.load(files[0], allow_pickle=True)  # the control: loaded with pickles allowed, it runs the command
    assert marker.exists()
    marker.unlink()
    proc = _pretrain(p, bert, "--max-steps", "1", "--run", "npy", check=False)
    _refused(proc, marker, f"{p.root / 'prep' / kind}/", ".npy is not a readable array", "run: mv3d prep again")
