"""A real 2-process gloo run (torchrun) against the single-process computation on the whole batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dist_worker as W
from mv3dtk import dist as D
from mv3dtk.train import gather as G
from mv3dtk.train.rsmb import SemanticBank

HERE = Path(__file__).resolve().parent


def close(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """Equal up to float32 summation order: the gather and DDP add the same terms in another order, which moves
    an element by a few ulps of the tensor's largest value (measured here up to 2e-7 of it), so elements near 0
    cannot meet a tight relative tolerance. Any real error (a missing world-size factor, a rank's half ignored)
    is of the order of the values themselves."""
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=max(1e-7, 2e-6 * scale),
                               msg=lambda m: f"{what}: {m}")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    torchrun = Path(sys.executable).with_name("torchrun")
    # --standalone: a c10d rendezvous on localhost port 0, i.e. a free port picked by the OS (no clashes)
    cmd = [str(torchrun), "--standalone", "--nnodes", "1", "--nproc_per_node", "2",
           str(HERE / "dist_worker.py"), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180, cwd=HERE.parent)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    tower = W.Tower()
    res = W.training_step(tower, W.make_batch(), SemanticBank(W.BANK, W.E), SemanticBank(W.BANK, W.E))
    return res


def test_loss_equals_single_process(ranks, reference):
    keys = [k for k in reference if k.startswith("loss_")]
    assert set(keys) == {"loss_loss", "loss_global", "loss_local", "loss_global_semantic", "loss_local_semantic"}
    for res in ranks:
        for k in keys:
            torch.testing.assert_close(res[k], reference[k], rtol=1e-5, atol=1e-6, msg=k)
    assert reference["loss_local_semantic"] > 0 and reference["loss_global_semantic"] > 0  # the bank was used


def test_input_gradients_match_halves(ranks, reference):
    """A rank's input gradient is world_size x the single-process gradient of its half (the gather's
    backward sums over ranks; DDP's mean over ranks then restores the exact parameter gradient)."""
    b = W.B // 2
    for r, res in enumerate(ranks):
        for k in W.LEAVES:
            ref = reference[f"grad_{k}"][r * b:(r + 1) * b]
            assert ref.abs().sum() > 0, k
            close(res[f"grad_{k}"] / 2, ref, k)


def test_ddp_parameter_gradients_are_exact(ranks, reference):
    for res in ranks:
        for k in ("param_proj.weight", "param_proj.bias", "param_log_scale"):
            close(res[k], reference[k], k)


def test_statements_global_term_is_the_single_process_one(ranks):
    """--global-text statements: per-rank statements padded for the gather, repeats across ranks
    dropped after it; loss, image-side and parameter gradients equal the whole batch in one process."""
    torch.manual_seed(0)
    tower = W.Tower()
    ref = W.statements_step(tower, W.make_batch()["x_g"], 0, W.B)
    assert int(ref["st_texts"]) == 6  # the six distinct statements, each once
    b = W.B // 2
    for r, res in enumerate(ranks):
        assert int(res["st_texts"]) == 6
        torch.testing.assert_close(res["st_loss"], ref["st_loss"], rtol=1e-5, atol=1e-6)
        close(res["st_grad_x_g"] / 2, ref["st_grad_x_g"][r * b:(r + 1) * b], "st_grad_x_g")
        for k in ("st_param_proj.weight", "st_param_proj.bias", "st_param_log_scale"):
            close(res[k], ref[k], k)


def test_batchnorm_statistics_span_the_global_batch(ranks):
    """A BatchNorm3d in a 2-process CPU run (converted by the pretraining loop, as SyncBatchNorm does on
    GPUs): outputs, input gradients (x world_size, as every gather), DDP's parameter gradients and the
    running statistics equal one BatchNorm on the whole batch, over two steps; eval uses those statistics."""
    x, w = W.bn_inputs()
    ref = W.batchnorm_step(x, w, distributed=False)
    b = W.B // 2
    for r, res in enumerate(ranks):
        assert bool(res["bn_converted"])
        for step in (0, 1):
            torch.testing.assert_close(res[f"bn{step}_out"], ref[f"bn{step}_out"], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(res[f"bn{step}_grad_x"] / 2, ref[f"bn{step}_grad_x"][r * b:(r + 1) * b],
                                       rtol=1e-5, atol=1e-6)
            for k in ("0.weight", "0.bias"):
                torch.testing.assert_close(res[f"bn{step}_param_{k}"], ref[f"bn{step}_param_{k}"], rtol=1e-5, atol=1e-6)
        for k in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(res[f"bn_{k}"], ref[f"bn_{k}"], rtol=1e-5, atol=1e-6, msg=k)
        torch.testing.assert_close(res["bn_eval_out"], ref["bn_eval_out"][r * b:(r + 1) * b], rtol=1e-5, atol=1e-6)
    # the batch is off-centre: statistics of either half would differ from the global ones
    halves = [x[:b].mean((0, 2, 3, 4)), x[b:].mean((0, 2, 3, 4))]
    assert (halves[0] - halves[1]).abs().max() > 0.1


def test_banks_identical_on_both_ranks(ranks, reference):
    for name in ("bank_g", "bank_l"):
        for k in ("queue", "ptr", "filled"):
            key = f"{name}_{k}"
            assert torch.equal(ranks[0][key], ranks[1][key]), key
            torch.testing.assert_close(ranks[0][key], reference[key], rtol=1e-6, atol=1e-7, msg=key)
    assert int(ranks[0]["bank_l_filled"]) == W.BANK  # the local bank wrapped around


def test_helpers_under_torchrun(ranks):
    assert [bool(r["is_main"]) for r in ranks] == [True, False]
    assert [int(r["rank"]) for r in ranks] == [0, 1]
    for r in ranks:
        assert float(r["mean_of_ranks"]) == 0.5
        assert "drop_last" in r["unequal_error"] and "rank 0: (1, 2)" in r["unequal_error"]


def test_single_process_helpers_are_identities(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    info = D.init_distributed()
    assert (info.rank, info.world_size, info.local_rank) == (0, 1, 0)
    assert D.is_main() and not D.is_distributed()
    D.barrier()
    t = torch.randn(3, 2, requires_grad=True)
    assert G.gather_with_grad(t) is t
    assert torch.equal(G.gather_nograd(t), t) and not G.gather_nograd(t).requires_grad
    assert torch.equal(G.all_reduce_mean(torch.tensor([1, 2])), torch.tensor([1.0, 2.0]))
    out = {"a": t, "s": torch.tensor(2.0)}
    assert G.gather_batch(out) == out
    assert __import__("mv3dtk.runs", fromlist=["DistInfo"]).DistInfo is D.DistInfo  # one definition
