"""One training step of the MedVista3D losses, run by ``tests/test_dist.py`` both under
``torchrun --nproc_per_node 2`` (each rank holds half of a fixed global batch) and in a single
process on the whole batch (the reference).

Usage (torchrun): ``dist_worker.py OUT_DIR`` writes ``OUT_DIR/rank<r>.pt``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mv3dtk.dist import init_distributed, is_main
from mv3dtk.train.gather import UnequalBatchError, all_reduce_mean, gather_batch, gather_nograd, gather_with_grad
from mv3dtk.train.losses import MedVista3DLoss
from mv3dtk.train.rsmb import SemanticBank

B, R, D_IN, E, BANK = 8, 3, 5, 6, 12  # global batch, regions, input dim, embedding dim, bank size
LEAVES = ("x_g", "x_l", "t_g", "t_l")  # inputs whose gradients are compared


def make_batch() -> dict[str, torch.Tensor]:
    """The fixed global batch (identical in every process)."""
    g = torch.Generator().manual_seed(1234)
    present = torch.ones(B, R, dtype=torch.bool)
    present[[2, 7], 1] = False  # region 1 absent in two volumes
    present[:, 2] = False
    present[3, 2] = True  # region 2: one volume only -> contributes nothing
    valid = torch.ones(B, R, dtype=torch.bool)
    valid[[4], 1] = False  # a missing sentence
    return {
        "x_g": torch.randn(B, D_IN, generator=g),  # image features (global), through the shared projection
        "x_l": torch.randn(B, R, D_IN, generator=g),  # image features (per region)
        "t_g": torch.randn(B, E, generator=g),  # report embeddings (leaves)
        "t_l": torch.randn(B, R, E, generator=g),  # region-sentence embeddings (leaves)
        "present": present,
        "valid": valid,
        "e0_g": torch.randn(B, E, generator=g),  # enriched embeddings of an earlier step (bank warm-up)
        "e0_l": torch.randn(B, R, E, generator=g),
        "e_g": torch.randn(B, E, generator=g),  # this step's enriched embeddings (queries)
        "e_l": torch.randn(B, R, E, generator=g),
    }


class Tower(nn.Module):
    """A shared image projection and a learnable log-temperature (the DDP-wrapped parameters)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(D_IN, E)
        self.log_scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, x_g, x_l):
        return (F.normalize(self.proj(x_g), dim=-1), F.normalize(self.proj(x_l), dim=-1),  # (b, E), (b, R, E)
                self.log_scale.exp().clamp(max=100.0))


def training_step(model: nn.Module, part: dict[str, torch.Tensor], bank_g: SemanticBank,
                  bank_l: SemanticBank) -> dict[str, torch.Tensor]:
    """Forward on this rank's part, gather, eq. 16, backward, enqueue the gathered t̂ (Algorithm 1)."""
    part = {k: (v.clone().requires_grad_(True) if k in LEAVES else v) for k, v in part.items()}
    valid = part["present"] & part["valid"]
    # warm-up: the bank already holds an earlier step's (gathered) enriched embeddings
    bank_g.enqueue(gather_nograd(part["e0_g"]))
    bank_l.enqueue(gather_nograd(part["e0_l"])[gather_nograd(valid)])
    img_g, img_l, scale = model(part["x_g"], part["x_l"])
    b = img_g.shape[0]
    nn_g, found_g = bank_g.query(part["e_g"], chunk=5)
    nn_l, found_l = bank_l.query(part["e_l"].reshape(b * R, E), chunk=5)  # (b·R, E)
    out = {
        "image_global": img_g, "image_local": img_l, "region_present": part["present"],
        "text_global": F.normalize(part["t_g"], dim=-1), "text_local": F.normalize(part["t_l"], dim=-1),
        "text_local_valid": part["valid"], "logit_scale": scale,
        "enriched_global_nn": nn_g, "enriched_global_found": found_g,
        "enriched_local_nn": nn_l.reshape(b, R, E), "enriched_local_found": found_l.reshape(b, R),
    }
    losses = MedVista3DLoss()(gather_batch(out))
    losses["loss"].backward()
    bank_g.enqueue(gather_nograd(part["e_g"]))
    bank_l.enqueue(gather_nograd(part["e_l"])[gather_nograd(valid)])
    res = {f"loss_{k}": v.detach() for k, v in losses.items()}
    res.update({f"grad_{k}": part[k].grad for k in LEAVES})
    res.update({f"param_{k}": p.grad for k, p in model.named_parameters()})
    res.update({f"bank_g_{k}": v for k, v in bank_g.state_dict().items()})
    res.update({f"bank_l_{k}": v for k, v in bank_l.state_dict().items()})
    return res


VOCAB = ["Emphysema is present.", "Emphysema is not present.", "Atelectasis is present.", "Atelectasis is not present.",
         "Cardiomegaly is present.", "Cardiomegaly is not present."]
STATEMENTS = [[0, 3], [1, 3], [4], [0, 2], [1, 5], [1, 3], [2, 5], [0]]  # (B,): rank 1 repeats rank 0's texts


def statements_step(tower: nn.Module, x_g: torch.Tensor, rank: int, b: int) -> dict[str, torch.Tensor]:
    """The global term of ``--global-text statements`` on this rank's b volumes, as the training loop
    runs it: distinct statements per rank, padded for the gather, made distinct again after it."""
    from mv3dtk.train.targets import MAX_STATEMENTS, batch_statements, distinct_statements, pad_ids, statement_ids
    from mv3dtk.train.losses import global_loss

    x = x_g.clone().requires_grad_(True)
    batch = {"enriched": [" ".join(VOCAB[k] for k in STATEMENTS[rank * b + i]) for i in range(b)]}
    texts = batch_statements(batch)
    table = torch.randn(len(VOCAB), E, generator=torch.Generator().manual_seed(7))  # a fixed embedding per text
    text = F.normalize(table[[VOCAB.index(t) for t in texts]] + tower.proj.bias, dim=-1)  # (T, E), through a param
    ids, true = statement_ids(batch, texts)
    pad = b * MAX_STATEMENTS - len(texts)
    text, pos = distinct_statements(gather_with_grad(F.pad(text, (0, 0, 0, pad))), gather_nograd(pad_ids(ids, pad)),
                                    gather_nograd(true))
    img = gather_with_grad(F.normalize(tower.proj(x), dim=-1))  # (B, E)
    loss = global_loss(img, text, tower.log_scale.exp(), pos)
    loss.backward()
    grads = {f"st_param_{k}": all_reduce_mean(p.grad) for k, p in tower.named_parameters()}  # what DDP does
    return {"st_loss": loss.detach(), "st_grad_x_g": x.grad, "st_texts": torch.tensor(len(text)), **grads}


BN_C = 3  # BatchNorm channels


def bn_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of a BatchNorm3d (B, C, 2, 3, 2), off-centre, and the weights of its loss."""
    g = torch.Generator().manual_seed(99)
    return 3 * torch.randn(B, BN_C, 2, 3, 2, generator=g) + 1.5, torch.randn(B, BN_C, 2, 3, 2, generator=g)


def batchnorm_step(x: torch.Tensor, w: torch.Tensor, distributed: bool) -> dict[str, torch.Tensor]:
    """Two training steps of a BatchNorm3d on x (this rank's part), the loss a weighted sum of the gathered
    outputs, then one eval forward. Distributed: converted as the pretraining loop converts a CPU model
    (``global_batchnorm``) and DDP-wrapped."""
    from mv3dtk.train.gather import GlobalBatchNorm, global_batchnorm

    torch.manual_seed(3)
    res = {}
    net = nn.Sequential(nn.BatchNorm3d(BN_C, momentum=0.3))
    with torch.no_grad():
        net[0].weight.uniform_(0.5, 1.5)
        net[0].bias.uniform_(-0.5, 0.5)
    if distributed:
        net = global_batchnorm(net)
        res["bn_converted"] = torch.tensor(isinstance(net[0], GlobalBatchNorm))
    run = nn.parallel.DistributedDataParallel(net) if distributed else net
    for step, scale in enumerate((1.0, 0.5)):
        xs = (x * scale).requires_grad_(True)
        y = run(xs)
        (gather_with_grad(y) * w).sum().backward()
        res.update({f"bn{step}_out": gather_nograd(y), f"bn{step}_grad_x": xs.grad})
        res.update({f"bn{step}_param_{k.replace('module.', '')}": p.grad.clone() for k, p in run.named_parameters()})
        run.zero_grad()
    res.update({f"bn_{k}": v.clone() for k, v in net[0].state_dict().items()})
    net.eval()
    res["bn_eval_out"] = net(x)
    return res


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    info = init_distributed()
    assert info.world_size == 2, info
    torch.manual_seed(0)
    tower = Tower()
    model = nn.parallel.DistributedDataParallel(tower)
    batch = make_batch()
    b = B // info.world_size
    part = {k: v[info.rank * b:(info.rank + 1) * b] for k, v in batch.items()}
    res = training_step(model, part, SemanticBank(BANK, E), SemanticBank(BANK, E))
    res = {k.replace("param_module.", "param_"): v for k, v in res.items()}
    tower.zero_grad()
    res.update(statements_step(tower, part["x_g"], info.rank, b))
    x_bn, w_bn = bn_inputs()
    res.update(batchnorm_step(x_bn[info.rank * b:(info.rank + 1) * b], w_bn, distributed=True))
    res["is_main"] = torch.tensor(is_main())
    res["rank"] = torch.tensor(info.rank)
    res["mean_of_ranks"] = all_reduce_mean(torch.tensor(float(info.rank)))
    try:  # unequal per-rank batches must raise on every rank, not hang
        gather_with_grad(torch.zeros(info.rank + 1, 2))
        res["unequal_error"] = ""
    except UnequalBatchError as e:
        res["unequal_error"] = str(e)
    torch.save(res, Path(out_dir) / f"rank{info.rank}.pt")
    torch.distributed.barrier()  # both ranks done before either tears gloo down (a race aborted rank 0 once, under load)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
