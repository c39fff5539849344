r"""MedVista3D pretraining losses (DESIGN §1; the paper's eqs. 1–16).

Notation. All embeddings are L2-normalised rows (the encoders normalise them; the RSMB stores
normalised entries). ``s`` is the logit scale, ``s = exp(τ)`` for a learnable log-temperature τ,
clamped to ``s ≤ MAX_LOGIT_SCALE = 100`` as in CLIP (``clamp`` has zero gradient above the bound,
which freezes τ there; the model's ``scale()`` already clamps, clamping again is a no-op).
``CE(Z, y) = mean_i [ logsumexp_j Z_ij − Z_{i,y_i} ]``.

InfoNCE (symmetric), for paired rows a_i, b_i, i = 1..N::

    InfoNCE(a, b) = ½ [ CE(s·A·Bᵀ, arange(N)) + CE(s·B·Aᵀ, arange(N)) ]
                  = 1/(2N) Σ_i [ (logsumexp_j s·a_i·b_j − s·a_i·b_i)
                                + (logsumexp_j s·b_i·a_j − s·b_i·a_i) ]

(1–2)   L_global = InfoNCE(v^G, t^G) over the (gathered) batch, v^G image, t^G report embeddings.
        With statements as the global texts, the multi-positive form over a (B, T) set of texts
        (``set_nce``): every statement j true of volume i is a positive of row i and of column j,
        each set against the negatives of its row / column only (not the other positives).

(3–4)   L_local. V_r = { i : region r present in volume i AND volume i has a sentence for r }
        (``region_present & text_local_valid``). Per region::

            L_r = InfoNCE( (v^r_i)_{i∈V_r}, (t^r_i)_{i∈V_r} )     (negatives: only j ∈ V_r)

        L_local = mean of L_r over the regions with |V_r| ≥ 2. A region with fewer than 2 valid
        samples contributes nothing (its InfoNCE over a single pair is identically 0 and would only
        dilute the mean). If no region qualifies, L_local is a zero that is still connected to the
        inputs (gradient 0), so that DDP sees every parameter used.

(11–13) L_global_semantic. The enriched (LLM-rewritten) report embedding t̂^G_i queries the RSMB
        for its top-1 cosine neighbour t̂^G_{NN,i} (a stored, detached embedding;
        :class:`mv3dtk.train.rsmb.SemanticBank`). F = { i : the query found a neighbour }::

            L_global_semantic = InfoNCE( (v^G_i)_{i∈F}, (t̂^G_{NN,i})_{i∈F} )

        with the same "|F| ≥ 2 else connected zero" rule as a local region.

(14–15) L_local_semantic. Per region r, F_r = V_r ∩ { i : t̂^r_i found a neighbour }::

            L_r^sem = InfoNCE( (v^r_i)_{i∈F_r}, (t̂^r_{NN,i})_{i∈F_r} )

        L_local_semantic = mean of L_r^sem over regions with |F_r| ≥ 2 (connected zero if none).
        Gradients of the semantic terms reach the image embeddings only (t̂_NN comes from the bank).

(16)    L = ½ (L_global + L_local) + L_global_semantic + L_local_semantic

Every term can be switched off (ablation, Table 4): a switched-off term is not computed, is
absent from the returned dict, and counts as 0 in eq. 16. After the optimiser step the caller
enqueues the batch's t̂ (global and local, gathered over ranks) into the bank (Algorithm 1).

Implementation notes.
* The losses are computed in float32 whatever the input dtype (bf16 autocast).
* The local terms are batched over regions: per-region logits (R, B, B) with the rows and columns
  of invalid samples masked (-inf columns, zeroed rows with zero weight). Invalid embeddings are
  replaced by zeros with ``torch.where`` before the matmul, so arbitrary values in absent regions
  (even NaN) change neither the loss nor any gradient.
* Two samples whose queries return the same bank entry give two identical columns in the
  semantic logits (a false negative); this is what the paper's formulation does, so it is kept.
* Distributed training: gather the embeddings first (``mv3dtk.train.dist.gather_batch`` /
  ``gather_with_grad``) so that negatives span the global batch; every rank then computes the
  same loss on the same global batch.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.medvista3d import MAX_LOGIT_SCALE  # the model owns its temperature's bound
from .options import LOSS_TERMS

__all__ = [
    "MAX_LOGIT_SCALE", "info_nce", "set_nce", "grouped_info_nce", "global_loss", "local_loss", "semantic_global",
    "semantic_local", "MedVista3DLoss",
]


def _scale(logit_scale: Tensor | float, device: torch.device) -> Tensor:
    s = torch.as_tensor(logit_scale, dtype=torch.float32, device=device)
    if s.numel() != 1:
        raise ValueError(f"logit_scale must be a scalar, got shape {tuple(s.shape)}")
    return s.reshape(()).clamp(max=MAX_LOGIT_SCALE)


def info_nce(a: Tensor, b: Tensor, logit_scale: Tensor | float) -> Tensor:
    """Symmetric InfoNCE between paired rows: a (N, E), b (N, E) -> scalar (eqs. 1–2). For texts
    that are true of several rows (multi-positive), see :func:`set_nce`."""
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(f"info_nce needs two (N, E) tensors of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    s = _scale(logit_scale, a.device)
    logits = s * (a.float() @ b.float().T)  # (N, N): row i = a_i against every b_j
    target = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def set_nce(a: Tensor, b: Tensor, positives: Tensor, logit_scale: Tensor | float) -> Tensor:
    """Symmetric multi-positive InfoNCE between two sets: a (N, E), b (T, E), positives (N, T) bool
    -> scalar. With every statement of the batch as b, this aligns each volume with all that is true
    of it.

    Each positive pair (i, j) is an InfoNCE term of its own against the *negatives* of its row (and,
    the other way, of its column) only: ``softplus(logsumexp_{n not positive} z_in - z_ij)``, averaged
    over the row's positives, then over rows with a positive (columns likewise). The other positives
    are not in the denominator: with a uniform soft target over the positives instead (SupCon's
    L_out), positives share the probability mass, and a hard negative ("X is not present." for a
    volume with X) costs about as little as a positive gets; here it competes with each positive
    alone. Measured on the synthetic chain (benchmarks/learnability.py, 400 steps): global zero-shot
    AUC 0.746 against 0.716, and the prompt pairs of learnt findings end up far apart (cosine ~0
    against 0.7-0.9). A row or column with no negative contributes 0."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1] or positives.shape != (a.shape[0], b.shape[0]):
        raise ValueError(f"set_nce needs a (N, E), b (T, E) and positives (N, T), got {tuple(a.shape)}, "
                         f"{tuple(b.shape)} and {tuple(positives.shape)}")
    s = _scale(logit_scale, a.device)
    logits = s * (a.float() @ b.float().T)  # (N, T)
    pos = positives.to(device=a.device, dtype=torch.float32)

    def one_way(z: Tensor, p: Tensor) -> Tensor:  # (rows, cols) logits, positives -> mean over rows with a positive
        n = p.sum(1)  # (rows,)
        has = n > 0
        # a finite stand-in for -inf, so that a row without negatives gives 0 and no NaN gradient
        neg = z.masked_fill(p > 0, -1e4).logsumexp(1, keepdim=True)  # (rows, 1)
        ce = (p * F.softplus(neg - z)).sum(1) / n.clamp(min=1)  # (rows,)
        return (ce * has).sum() / has.sum().clamp(min=1)

    return 0.5 * (one_way(logits, pos) + one_way(logits.T, pos.T))


def grouped_info_nce(a: Tensor, b: Tensor, valid: Tensor, logit_scale: Tensor | float) -> tuple[Tensor, Tensor]:
    """InfoNCE in G independent groups, each over its valid samples only.

    a, b (G, N, E); valid (G, N) bool -> (loss (G,), count (G,) long). ``loss[g]`` is the symmetric
    InfoNCE over { i : valid[g, i] } (0 where the group has no valid sample). Values of ``a``/``b`` at
    invalid positions never reach the loss nor the gradients.
    """
    if a.shape != b.shape or a.dim() != 3 or valid.shape != a.shape[:2]:
        raise ValueError(f"grouped_info_nce needs a, b (G, N, E) and valid (G, N), got {tuple(a.shape)}, "
                         f"{tuple(b.shape)}, {tuple(valid.shape)}")
    valid = valid.to(device=a.device, dtype=torch.bool)
    s = _scale(logit_scale, a.device)
    vm = valid[..., None]  # (G, N, 1)
    a = torch.where(vm, a.float(), 0.0)  # (G, N, E); where(): NaN-safe in forward and backward
    b = torch.where(vm, b.float(), 0.0)  # (G, N, E)
    logits = s * torch.einsum("gie,gje->gij", a, b)  # (G, N, N): a_i (rows) against b_j (columns)
    pair = valid[:, :, None] & valid[:, None, :]  # (G, N, N), symmetric
    row_ok = valid[:, :, None].expand_as(pair)  # (G, N, N)
    diag = torch.diagonal(logits, dim1=1, dim2=2)  # (G, N): s·a_i·b_i

    def one_direction(z: Tensor) -> Tensor:  # z (G, N, N) -> sum over valid rows of CE terms (G,)
        z = z.masked_fill(~pair, float("-inf"))  # negatives: valid columns only
        z = torch.where(row_ok, z, 0.0)  # invalid rows: finite dummy (weight 0 below)
        ce = torch.logsumexp(z, dim=-1) - torch.where(valid, diag, 0.0)  # (G, N)
        return torch.where(valid, ce, 0.0).sum(-1)  # (G,)

    count = valid.sum(-1)  # (G,)
    total = one_direction(logits) + one_direction(logits.transpose(1, 2))  # (G,)
    return 0.5 * total / count.clamp(min=1), count


def _mean_over_groups(loss: Tensor, count: Tensor, min_count: int = 2) -> Tensor:
    """Mean of loss[g] over groups with count ≥ min_count; a connected zero when none qualifies."""
    w = (count >= min_count).to(loss.dtype)  # (G,)
    return (loss * w).sum() / w.sum().clamp(min=1.0)


def global_loss(image_global: Tensor, text_global: Tensor, logit_scale: Tensor | float,
                positives: Tensor | None = None) -> Tensor:
    """L_global (eqs. 1–2): image_global (B, E), text_global (B, E) paired rows -> scalar. With
    ``positives`` (B, T) bool, text_global is any set of T texts and positives says exactly which are
    true of which volume (:func:`set_nce`; the training loop builds it from statement identities).
    Nothing is added to ``positives``: for paired rows, include the diagonal (a volume's own text)."""
    if positives is None:
        return info_nce(image_global, text_global, logit_scale)
    return set_nce(image_global, text_global, positives, logit_scale)


def local_loss(img_local: Tensor, txt_local: Tensor, valid: Tensor, logit_scale: Tensor | float) -> Tensor:
    """L_local (eqs. 3–4): img_local, txt_local (B, R, E), valid (B, R) bool -> scalar.

    Per region an InfoNCE over its valid samples; mean over regions with ≥ 2 valid samples;
    a connected zero when no region qualifies."""
    if img_local.dim() != 3 or valid.shape != img_local.shape[:2]:
        raise ValueError(f"local_loss needs (B, R, E) embeddings and a (B, R) mask, got {tuple(img_local.shape)}, "
                         f"{tuple(valid.shape)}")
    loss, count = grouped_info_nce(img_local.transpose(0, 1), txt_local.transpose(0, 1), valid.T,
                                   logit_scale)  # (R,), (R,)
    return _mean_over_groups(loss, count)


def semantic_global(image_global: Tensor, nn_global: Tensor, found: Tensor, logit_scale: Tensor | float) -> Tensor:
    """L_global_semantic (eqs. 11–13): image_global (B, E), the bank's neighbours of the enriched
    report embeddings nn_global (B, E), found (B,) bool -> scalar. Only samples with a found
    neighbour take part; fewer than 2 such samples gives a connected zero."""
    loss, count = grouped_info_nce(image_global[None], nn_global.detach()[None], found[None], logit_scale)
    return _mean_over_groups(loss, count)


def semantic_local(img_local: Tensor, nn_local: Tensor, valid: Tensor, logit_scale: Tensor | float) -> Tensor:
    """L_local_semantic (eqs. 14–15): img_local (B, R, E), neighbours of the enriched region
    sentences nn_local (B, R, E), valid (B, R) bool = region present & sentence & neighbour found."""
    return local_loss(img_local, nn_local.detach(), valid, logit_scale)


class MedVista3DLoss(nn.Module):
    """Eq. 16 with each term switchable (Table 4).

    ``forward(out)`` reads ``out``: "image_global" (B, E), "image_local" (B, R, E), "region_present"
    (B, R) bool, "text_global" (B, E) or (T, E), "text_local" (B, R, E), "text_local_valid" (B, R) bool,
    "logit_scale" (scalar, already exp(τ)), optionally "global_positives" (B, T) bool (see
    :func:`global_loss`), and for the semantic terms "enriched_global_nn" (B, E),
    "enriched_global_found" (B,) bool, "enriched_local_nn" (B, R, E), "enriched_local_found" (B, R)
    bool. Returns {"loss": total, and one entry per active term among "global", "local",
    "global_semantic", "local_semantic"} (tensors with graph; detaching for logs is the caller's).
    """

    TERMS = LOSS_TERMS
    WEIGHTS = {"global": 0.5, "local": 0.5, "global_semantic": 1.0, "local_semantic": 1.0}  # eq. 16

    def __init__(self, *, use_global: bool = True, use_local: bool = True, use_global_semantic: bool = True,
                 use_local_semantic: bool = True):
        super().__init__()
        self.use = {"global": bool(use_global), "local": bool(use_local),
                    "global_semantic": bool(use_global_semantic), "local_semantic": bool(use_local_semantic)}
        if not any(self.use.values()):
            raise ValueError("MedVista3DLoss: every loss term is switched off; enable at least one")

    @property
    def active(self) -> tuple[str, ...]:
        return tuple(k for k in self.TERMS if self.use[k])

    def extra_repr(self) -> str:
        return ", ".join(f"use_{k}={v}" for k, v in self.use.items())

    @staticmethod
    def _need(out: Mapping[str, Tensor], term: str, keys: tuple[str, ...]) -> None:
        missing = [k for k in keys if k not in out]
        if missing:
            raise KeyError(f"loss term {term!r} needs {missing} in the model outputs; provide them or switch "
                           f"the term off (use_{term}=False)")

    def forward(self, out: Mapping[str, Tensor]) -> dict[str, Tensor]:
        if "logit_scale" not in out:
            raise KeyError("the loss needs 'logit_scale' (exp of the learnable log-temperature) in the model outputs")
        s = out["logit_scale"]
        terms: dict[str, Tensor] = {}
        if self.use["global"]:
            self._need(out, "global", ("image_global", "text_global"))
            terms["global"] = global_loss(out["image_global"], out["text_global"], s, out.get("global_positives"))
        if self.use["local"] or self.use["local_semantic"]:
            self._need(out, "local", ("image_local", "region_present", "text_local_valid"))
            local_valid = out["region_present"].bool() & out["text_local_valid"].bool()  # (B, R)
        if self.use["local"]:
            self._need(out, "local", ("text_local",))
            terms["local"] = local_loss(out["image_local"], out["text_local"], local_valid, s)
        if self.use["global_semantic"]:
            self._need(out, "global_semantic", ("image_global", "enriched_global_nn", "enriched_global_found"))
            terms["global_semantic"] = semantic_global(out["image_global"], out["enriched_global_nn"],
                                                       out["enriched_global_found"].bool(), s)
        if self.use["local_semantic"]:
            self._need(out, "local_semantic", ("enriched_local_nn", "enriched_local_found"))
            terms["local_semantic"] = semantic_local(out["image_local"], out["enriched_local_nn"],
                                                     local_valid & out["enriched_local_found"].bool(), s)
        total = sum(self.WEIGHTS[k] * v for k, v in terms.items())  # eq. 16; absent terms count as 0
        return {"loss": total, **terms}
