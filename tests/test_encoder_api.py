"""The image-encoder API the downstream stages share: image_tokens, image_features, image_identity, and
UniMiSS's forward_pyramid (DESIGN §5)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mv3dtk import load_model
from mv3dtk.models.dual import pool_tokens
from mv3dtk.models.factory import build_backbone, get_model_config
from mv3dtk.models.medvista3d import MedVista3D
from mv3dtk.testing.tiny_models import make_tiny_bert

TEXTS = ["Pleural effusion is present.", "No cardiomegaly.", "Emphysema is present in both lungs."] * 4


@pytest.fixture(scope="module")
def tiny_text(tmp_path_factory):
    return make_tiny_bert(tmp_path_factory.mktemp("bert") / "tiny", TEXTS, vocab_size=120, seed=0)


def _model(name: str, tiny_text) -> MedVista3D:
    torch.manual_seed(0)
    cfg = get_model_config(name)
    cfg["text"] = {"model": str(tiny_text), "pooling": "mean", "max_length": 32}
    return MedVista3D(cfg).eval()


def _inputs(shape, n_regions=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(2, 1, *shape, generator=g) * 2 - 1  # (B, 1, D, H, W)
    masks = torch.zeros(2, *shape, dtype=torch.int32)
    masks[:, : shape[0] // 2] |= 1  # region 0: the upper half
    masks[0, :, : shape[1] // 2] |= 1 << 3  # region 3 in the first volume only
    return x, masks


@pytest.mark.parametrize("name, n_tokens, width", [("vit-tiny", 512, 64), ("unimiss-tiny", None, None)])
def test_tokens_features_and_embeddings_agree(name, n_tokens, width, tiny_text):
    model = _model(name, tiny_text)
    shape = tuple(model.config["image"]["input_size"])
    x, masks = _inputs(shape)
    with torch.no_grad():
        tokens, grid = model.image_tokens(x)
        feats = model.image_features(x)
        g, local, present = model.image_features(x, masks)
        emb = model.encode_image(x, masks)
    d, h, w = grid
    assert tokens.shape == (2, d * h * w, model.image.embed_dim) and grid == model.image.token_grid(shape)
    if n_tokens is not None:
        assert tokens.shape[1:] == (n_tokens, width)
    # the features are the tokens pooled the config's way, and the projections of the features are the embeddings
    assert torch.allclose(pool_tokens(tokens, None, model.pool), feats, atol=1e-6)
    assert torch.equal(g, feats)
    assert torch.allclose(F.normalize(model.image_proj(feats), dim=-1), emb["global"], atol=1e-6)
    assert torch.equal(present, emb["present"]) and present[:, 0].all() and present[0, 3] and not present[1, 3]
    proj_local = F.normalize(model.image_proj(local), dim=-1) * present[..., None]
    assert torch.allclose(proj_local, emb["local"], atol=1e-6)
    assert (local[~present] == 0).all() and local.shape == (2, model.n_regions, feats.shape[1])


def test_paper_token_counts():
    # VQA's budget: ViT-B at the paper's 96x320x320 gives 2,400 tokens of 768; UniMiSS-Small's stage 4 600 of 512
    vit = build_backbone(get_model_config("vit-b")["image"])
    assert vit.token_grid((96, 320, 320)) == (6, 20, 20) and vit.embed_dim == 768
    uni = build_backbone(get_model_config("unimiss-small")["image"])
    assert uni.token_grid((96, 320, 320)) == (6, 10, 10) and uni.embed_dim == 512


def test_image_identity_follows_the_image_weights_only(tiny_text, tmp_path):
    model = _model("vit-tiny", tiny_text)
    ident, text_ident = model.image_identity, model.text_identity
    assert ident.startswith("mv3d-image:vit-") and ident == _model("vit-tiny", tiny_text).image_identity
    model.save(tmp_path / "m")
    assert load_model(tmp_path / "m").image_identity == ident  # a saved and reloaded model keeps its identity
    with torch.no_grad():
        next(model.text.parameters()).add_(1.0)
        model.image_proj.weight.add_(1.0)
    assert model.image_identity == ident and model.text_identity != text_ident  # text and projection: no change
    with torch.no_grad():
        next(model.image.parameters()).view(-1)[0] += 1e-3
    assert model.image_identity != ident


def test_image_identity_includes_the_config(tiny_text):
    a = _model("vit-tiny", tiny_text)
    torch.manual_seed(0)
    cfg = get_model_config("vit-tiny")
    cfg["text"] = {"model": str(tiny_text), "pooling": "mean", "max_length": 32}
    cfg["image"]["windows"] = [[-1.0, 1.0], [-1.0, -0.4]]  # a different lung window: no weight changes
    b = MedVista3D(cfg).eval()
    assert all(torch.equal(p, q) for p, q in zip(a.image.parameters(), b.image.parameters()))
    assert a.image_identity != b.image_identity


def test_unimiss_pyramid_is_the_public_way_to_skip_features(tiny_text):
    model = _model("unimiss-tiny", tiny_text)
    shape = tuple(model.config["image"]["input_size"])
    x, _ = _inputs(shape)
    with torch.no_grad():
        maps = model.image.forward_pyramid(x)
        tokens, grid = model.image_tokens(x)
    assert len(maps) == 5
    D, H, W = shape
    assert maps[0].shape[2:] == (D, H // 2, W // 2)  # the stem: stride (1, 2, 2)
    for i, m in enumerate(maps[1:], start=1):
        assert m.shape[2:] == (D // 2 ** i, H // 2 ** (i + 1), W // 2 ** (i + 1))
    # the last map is image_tokens laid out on its grid
    assert torch.allclose(maps[-1], tokens.transpose(1, 2).reshape(2, -1, *grid), atol=1e-6)
