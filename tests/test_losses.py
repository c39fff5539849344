"""The MedVista3D losses against direct transcriptions of their equations (explicit loops over i, j,
log-sum-exp by hand), and the Radiology Semantic Matching Bank against hand computations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mv3dtk.train.losses import (MAX_LOGIT_SCALE, MedVista3DLoss, global_loss, info_nce, local_loss, set_nce,
                                 semantic_global, semantic_local)
from mv3dtk.train.rsmb import SemanticBank

B, R, E = 5, 4, 3
S = 3.7  # logit scale


# ----------------------------------------------------------------------------- reference transcriptions
def dot(u, v):
    return sum(x * y for x, y in zip(u, v))


def lse(xs):
    m = max(xs)
    return m + math.log(sum(math.exp(x - m) for x in xs))


def ref_info_nce(a, b, s):
    """½ [CE(s·A·Bᵀ, arange) + CE(s·B·Aᵀ, arange)] with loops; a, b: lists of vectors."""
    n = len(a)
    i2t = sum(lse([s * dot(a[i], b[j]) for j in range(n)]) - s * dot(a[i], b[i]) for i in range(n)) / n
    t2i = sum(lse([s * dot(b[i], a[j]) for j in range(n)]) - s * dot(b[i], a[i]) for i in range(n)) / n
    return 0.5 * (i2t + t2i)


def ref_local(img, txt, valid, s):
    """Per region r: InfoNCE over {i : valid[i][r]}; mean over regions with ≥ 2 valid samples (else 0)."""
    per_region = []
    for r in range(len(valid[0])):
        idx = [i for i in range(len(valid)) if valid[i][r]]
        if len(idx) >= 2:
            per_region.append(ref_info_nce([img[i][r] for i in idx], [txt[i][r] for i in idx], s))
    return sum(per_region) / len(per_region) if per_region else 0.0


def ref_semantic_global(img, nn, found, s):
    idx = [i for i in range(len(found)) if found[i]]
    return ref_info_nce([img[i] for i in idx], [nn[i] for i in idx], s) if len(idx) >= 2 else 0.0


def unit(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1).float()


# present: region 0 in all, region 1 in 4 volumes, region 2 in 2 volumes, region 3 in 1 volume
PRESENT = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 1], [1, 0, 1, 0], [1, 1, 0, 0], [1, 1, 0, 0]], dtype=torch.bool)
# sentences: volume 4 has none for region 1 -> region 1 has 3 valid samples; region 2 keeps 2
SENT = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1], [1, 0, 1, 1]], dtype=torch.bool)
FOUND_G = torch.tensor([1, 0, 1, 1, 1], dtype=torch.bool)
FOUND_L = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [0, 1, 1, 1], [1, 0, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)


@pytest.fixture
def out():
    return {
        "image_global": unit(B, E, seed=1), "image_local": unit(B, R, E, seed=2), "region_present": PRESENT,
        "text_global": unit(B, E, seed=3), "text_local": unit(B, R, E, seed=4), "text_local_valid": SENT,
        "logit_scale": torch.tensor(S),
        "enriched_global_nn": unit(B, E, seed=5), "enriched_global_found": FOUND_G,
        "enriched_local_nn": unit(B, R, E, seed=6), "enriched_local_found": FOUND_L,
    }


def ref_terms(o):
    L = lambda t: t.tolist()  # noqa: E731
    valid = (o["region_present"] & o["text_local_valid"]).tolist()
    sem_valid = (o["region_present"] & o["text_local_valid"] & o["enriched_local_found"]).tolist()
    s = min(float(o["logit_scale"]), MAX_LOGIT_SCALE)
    return {
        "global": ref_info_nce(L(o["image_global"]), L(o["text_global"]), s),
        "local": ref_local(L(o["image_local"]), L(o["text_local"]), valid, s),
        "global_semantic": ref_semantic_global(L(o["image_global"]), L(o["enriched_global_nn"]),
                                               o["enriched_global_found"].tolist(), s),
        "local_semantic": ref_local(L(o["image_local"]), L(o["enriched_local_nn"]), sem_valid, s),
    }


def close(x, y):
    x = x.detach() if isinstance(x, torch.Tensor) else x
    assert float(x) == pytest.approx(float(y), rel=1e-5, abs=1e-6)


# ----------------------------------------------------------------------------- the terms
def test_info_nce_and_global(out):
    ref = ref_info_nce(out["image_global"].tolist(), out["text_global"].tolist(), S)
    close(info_nce(out["image_global"], out["text_global"], S), ref)
    close(global_loss(out["image_global"], out["text_global"], torch.tensor(S)), ref)
    # the symmetric loss does not depend on which side is called the image
    close(info_nce(out["text_global"], out["image_global"], S), ref)


def test_local_matches_loops(out):
    valid = PRESENT & SENT
    assert valid.sum(0).tolist() == [5, 3, 2, 1]  # region 3 has < 2 samples: excluded
    got = local_loss(out["image_local"], out["text_local"], valid, S)
    close(got, ref_terms(out)["local"])
    # region 3 excluded means: the mean over regions 0..2 only
    manual = sum(info_nce(out["image_local"][valid[:, r], r], out["text_local"][valid[:, r], r], S)
                 for r in range(3)) / 3
    close(got, manual)


def test_semantic_terms_match_loops(out):
    ref = ref_terms(out)
    close(semantic_global(out["image_global"], out["enriched_global_nn"], FOUND_G, S), ref["global_semantic"])
    sem_valid = PRESENT & SENT & FOUND_L
    assert sem_valid.sum(0).tolist() == [4, 2, 2, 1]
    close(semantic_local(out["image_local"], out["enriched_local_nn"], sem_valid, S), ref["local_semantic"])


ALL = ("global", "local", "global_semantic", "local_semantic")


@pytest.mark.parametrize("off", [None, *ALL])
def test_total_with_switches(out, off):
    ref = ref_terms(out)
    use = {f"use_{k}": k != off for k in ALL}
    got = MedVista3DLoss(**use)(out)
    active = [k for k in ALL if k != off]
    assert set(got) == {"loss", *active}
    for k in active:
        close(got[k], ref[k])
    w = {"global": 0.5, "local": 0.5, "global_semantic": 1.0, "local_semantic": 1.0}  # eq. 16
    close(got["loss"], sum(w[k] * ref[k] for k in active))


def test_switched_off_terms_need_no_inputs(out):
    minimal = {k: out[k] for k in ("image_global", "text_global", "logit_scale")}
    got = MedVista3DLoss(use_local=False, use_global_semantic=False, use_local_semantic=False)(minimal)
    assert set(got) == {"loss", "global"}
    with pytest.raises(KeyError, match="use_global_semantic=False"):
        MedVista3DLoss(use_local=False, use_local_semantic=False)(minimal)
    with pytest.raises(ValueError, match="switched off"):
        MedVista3DLoss(use_global=False, use_local=False, use_global_semantic=False, use_local_semantic=False)


def test_logit_scale_clamp_and_gradient(out):
    a, b = out["image_global"], out["text_global"]
    close(info_nce(a, b, 1e4), info_nce(a, b, MAX_LOGIT_SCALE))
    tau = torch.tensor(math.log(S), requires_grad=True)
    info_nce(a, b, tau.exp()).backward()
    assert tau.grad is not None and tau.grad != 0


def test_float32_under_low_precision_inputs(out):
    a, b = out["image_global"].bfloat16(), out["text_global"].bfloat16()
    got = info_nce(a, b, S)
    assert got.dtype == torch.float32
    close(got, ref_info_nce(a.float().tolist(), b.float().tolist(), S))


# ----------------------------------------------------------------------------- gradients
def with_grads(o):
    return {k: (v.clone().requires_grad_(True) if v.is_floating_point() and v.dim() > 0 else v) for k, v in o.items()}


def grads(o, keys):
    return {k: o[k].grad for k in keys}


def test_gradients_reach_the_right_inputs(out):
    o = with_grads(out)
    MedVista3DLoss(use_local=False, use_global_semantic=False, use_local_semantic=False)(o)["loss"].backward()
    assert o["image_global"].grad.abs().sum() > 0 and o["text_global"].grad.abs().sum() > 0
    assert o["image_local"].grad is None and o["enriched_global_nn"].grad is None

    o = with_grads(out)
    MedVista3DLoss(use_global=False, use_global_semantic=False, use_local_semantic=False)(o)["loss"].backward()
    assert o["image_local"].grad.abs().sum() > 0 and o["text_local"].grad.abs().sum() > 0
    assert o["image_global"].grad is None

    # semantic terms: image only; t̂_NN comes from the bank (detached inside the loss even if it had grad)
    o = with_grads(out)
    MedVista3DLoss(use_global=False, use_local=False)(o)["loss"].backward()
    assert o["image_global"].grad.abs().sum() > 0 and o["image_local"].grad.abs().sum() > 0
    assert o["enriched_global_nn"].grad is None and o["enriched_local_nn"].grad is None
    assert o["text_global"].grad is None and o["text_local"].grad is None


def test_absent_regions_change_nothing(out):
    """Perturbing the embeddings of absent regions / invalid sentences / not-found neighbours
    (even to NaN) leaves the loss and every gradient unchanged; their own gradient is zero."""
    keys = ("image_global", "image_local", "text_global", "text_local")

    def run(o):
        o = with_grads(o)
        res = MedVista3DLoss()(o)
        res["loss"].backward()
        return {k: v.detach() for k, v in res.items()}, grads(o, keys)

    base_loss, base_grad = run(out)
    bad = dict(out)
    absent = ~PRESENT  # (B, R)
    no_sentence = ~SENT
    bad["image_local"] = torch.where(absent[..., None], torch.full_like(out["image_local"], float("nan")),
                                     out["image_local"])
    bad["text_local"] = torch.where((absent | no_sentence)[..., None], 7.0 * unit(B, R, E, seed=9),
                                    out["text_local"])
    bad["enriched_global_nn"] = torch.where(~FOUND_G[:, None], unit(B, E, seed=10), out["enriched_global_nn"])
    bad["enriched_local_nn"] = torch.where(~FOUND_L[..., None], float("nan"), out["enriched_local_nn"])
    loss, grad = run(bad)
    for k in base_loss:
        assert torch.equal(loss[k], base_loss[k]), k
    for k in keys:
        torch.testing.assert_close(grad[k], base_grad[k], rtol=0, atol=0, msg=k)
    assert (grad["image_local"][absent] == 0).all() and (grad["text_local"][absent | no_sentence] == 0).all()


def test_no_qualifying_region_is_a_connected_zero(out):
    o = with_grads(out)
    one_each = torch.eye(B, R, dtype=torch.bool)  # every region has at most 1 valid sample
    loss = local_loss(o["image_local"], o["text_local"], one_each, o["logit_scale"])
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert (o["image_local"].grad == 0).all()
    nothing = semantic_global(o["image_global"], o["enriched_global_nn"], torch.zeros(B, dtype=torch.bool), S)
    assert nothing.item() == 0.0 and nothing.requires_grad
    nothing.backward()
    assert (o["image_global"].grad == 0).all()


# ----------------------------------------------------------------------------- the bank
def hand_fifo(size, batches):
    """Algorithm 1 by hand: enqueue one row at a time into slot ptr, ptr <- (ptr + 1) mod size."""
    slots, ptr, filled = [None] * size, 0, 0
    for batch in batches:
        for row in batch:
            slots[ptr] = row
            ptr = (ptr + 1) % size
            filled = min(filled + 1, size)
    return slots, ptr, filled


def test_bank_wraps_around_like_algorithm_1():
    bank = SemanticBank(size=5, dim=E)
    batches = [unit(3, E, seed=20), unit(3, E, seed=21), unit(7, E, seed=22)]
    expected_ptr = [3, 1, 3]
    expected_filled = [3, 5, 5]
    for k, batch in enumerate(batches):
        bank.enqueue(batch)
        slots, ptr, filled = hand_fifo(5, batches[:k + 1])
        assert (int(bank.ptr), int(bank.filled), len(bank)) == (expected_ptr[k], expected_filled[k], expected_filled[k])
        assert (ptr, filled) == (expected_ptr[k], expected_filled[k])
        for j in range(filled):
            torch.testing.assert_close(bank.queue[j], slots[j])
    # after 3 + 3 + 7: the last 5 of the 7 at slots (1 + 2..6) mod 5 = 3, 4, 0, 1, 2
    c = batches[2]
    torch.testing.assert_close(bank.queue, torch.stack([c[4], c[5], c[6], c[2], c[3]]))


def test_bank_stores_normalised_detached_rows():
    bank = SemanticBank(size=4, dim=E)
    t = (3.0 * unit(2, E, seed=30)).requires_grad_(True)
    bank.enqueue(t)
    torch.testing.assert_close(bank.queue[:2].norm(dim=-1), torch.ones(2))
    assert not bank.queue.requires_grad and not any(p.requires_grad for p in bank.parameters())
    assert set(bank.state_dict()) == {"queue", "ptr", "filled"}
    clone = SemanticBank(size=4, dim=E)
    clone.load_state_dict(bank.state_dict())
    assert len(clone) == 2 and torch.equal(clone.queue, bank.queue)


def test_query_matches_brute_force_with_small_chunks():
    bank = SemanticBank(size=50, dim=8)
    bank.enqueue(unit(37, 8, seed=40))  # partly filled: rows 37.. are zeros and must not be searched
    q = unit(11, 8, seed=41) * 2.5  # queries need not be normalised
    nn, found = bank.query(q, chunk=6)
    filled = bank.queue[:37]
    best = (F.normalize(q, dim=-1) @ filled.T).argmax(1)  # brute force over all filled entries
    assert found.all()
    assert torch.equal(nn, filled[best])
    nn_big, _ = bank.query(q, chunk=4096)
    assert torch.equal(nn_big, nn)


def test_query_on_empty_bank_finds_nothing():
    bank = SemanticBank(size=8, dim=E)
    nn, found = bank.query(unit(4, E, seed=50))
    assert found.dtype == torch.bool and not found.any()
    assert nn.shape == (4, E) and (nn == 0).all()


def test_no_gradient_into_the_bank(out):
    bank = SemanticBank(size=16, dim=E)
    bank.enqueue(unit(16, E, seed=60))
    queries = out["text_global"].clone().requires_grad_(True)
    nn, found = bank.query(queries)
    assert not nn.requires_grad
    img = out["image_global"].clone().requires_grad_(True)
    before = bank.queue.clone()
    loss = semantic_global(img, nn, found, S)
    loss.backward()
    assert img.grad.abs().sum() > 0 and queries.grad is None
    nn.add_(1.0)  # the returned rows are copies
    assert torch.equal(bank.queue, before) and bank.queue.grad is None


def _pair_term(z: torch.Tensor, j: int, negatives: list[int]) -> torch.Tensor:
    """-log( e^z_j / (e^z_j + sum over the negatives e^z_n) ): one positive against the negatives only."""
    return -(z[j] - torch.logsumexp(z[[j] + negatives], 0))


def test_multi_positive_global_loss_sets_each_positive_against_the_negatives():
    torch.manual_seed(3)
    a, b = F.normalize(torch.randn(4, 8), dim=-1), F.normalize(torch.randn(4, 8), dim=-1)
    s = 10.0
    pos = torch.zeros(4, 4, dtype=torch.bool)
    pos[0, 2] = True  # text 2 is also true of volume 0
    z, zt = s * a @ b.T, s * b @ a.T
    t = _pair_term
    rows = [(t(z[0], 0, [1, 3]) + t(z[0], 2, [1, 3])) / 2] + [t(z[i], i, [k for k in range(4) if k != i])
                                                              for i in (1, 2, 3)]  # image -> text
    cols = [t(zt[0], 0, [1, 2, 3]), t(zt[1], 1, [0, 2, 3]), (t(zt[2], 2, [1, 3]) + t(zt[2], 0, [1, 3])) / 2,
            t(zt[3], 3, [0, 1, 2])]  # text -> image
    want = 0.5 * (torch.stack(rows).mean() + torch.stack(cols).mean())
    eye = torch.eye(4, dtype=torch.bool)
    torch.testing.assert_close(global_loss(a, b, s, pos | eye), want)
    # only the diagonal is the plain InfoNCE
    torch.testing.assert_close(global_loss(a, b, s, eye), info_nce(a, b, s))


def test_set_nce_aligns_each_row_with_all_of_its_positives():
    torch.manual_seed(4)
    a, b = F.normalize(torch.randn(3, 8), dim=-1), F.normalize(torch.randn(5, 8), dim=-1)
    s = 7.0
    pos = torch.tensor([[1, 0, 1, 0, 0], [0, 1, 1, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)  # row 2, column 3/4: none
    z, zt, t = s * a @ b.T, s * b @ a.T, _pair_term
    rows = [(t(z[0], 0, [1, 3, 4]) + t(z[0], 2, [1, 3, 4])) / 2,
            (t(z[1], 1, [0, 3, 4]) + t(z[1], 2, [0, 3, 4])) / 2]  # volume -> its statements
    cols = [t(zt[0], 0, [1, 2]), t(zt[1], 1, [0, 2]), (t(zt[2], 0, [2]) + t(zt[2], 1, [2])) / 2]  # statement -> volumes
    want = 0.5 * (torch.stack(rows).mean() + torch.stack(cols).mean())
    torch.testing.assert_close(set_nce(a, b, pos, s), want)
    # a statement true of every volume (no negative) adds 0 and no NaN gradient
    a2 = a.clone().requires_grad_(True)
    every = pos.clone()
    every[:, 4] = True
    loss = set_nce(a2, b, every, s)
    loss.backward()
    assert torch.isfinite(a2.grad).all()
    cols_every = cols + [torch.zeros(())]
    rows_every = [(t(z[0], 0, [1, 3]) + t(z[0], 2, [1, 3]) + t(z[0], 4, [1, 3])) / 3,
                  (t(z[1], 1, [0, 3]) + t(z[1], 2, [0, 3]) + t(z[1], 4, [0, 3])) / 3,
                  t(z[2], 4, [0, 1, 2, 3])]
    torch.testing.assert_close(loss, 0.5 * (torch.stack(rows_every).mean() + torch.stack(cols_every).mean()))
    # a square set with the diagonal as its only positives is the plain InfoNCE
    torch.testing.assert_close(set_nce(a, b[:3], torch.eye(3, dtype=torch.bool), s), info_nce(a, b[:3], s))
    with pytest.raises(ValueError, match="positives"):
        set_nce(a, b, pos[:, :4], s)
