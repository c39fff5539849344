"""The MedVista3D model: towers, projections, temperature, save -> load_model from the directory alone."""

from __future__ import annotations

import json

import pytest
import torch

from mv3dtk import load_model
from mv3dtk.errors import ConfigError
from mv3dtk.models.factory import get_model_config, list_models
from mv3dtk.models.medvista3d import MedVista3D
from mv3dtk.testing.tiny_models import make_tiny_bert

TEXTS = ["Pleural effusion is present in the right lung.", "No cardiomegaly.", "A 7 mm nodule in the left upper lobe.",
         "No pleural effusion.", "Emphysema is present in both lungs.", "The heart size is normal."] * 3


@pytest.fixture(scope="module")
def tiny_text(tmp_path_factory):
    return make_tiny_bert(tmp_path_factory.mktemp("bert") / "tiny", TEXTS, vocab_size=200, seed=0)


@pytest.fixture
def model(tiny_text):
    torch.manual_seed(0)
    cfg = get_model_config("vit-tiny")
    cfg["image"].update(input_size=[16, 32, 32])
    cfg["text"] = {"model": str(tiny_text), "pooling": "mean", "max_length": 64}
    return MedVista3D(cfg).eval()


def test_configs_are_listed_and_validated():
    assert {"vit-b", "vit-tiny"} <= set(list_models())
    with pytest.raises(ConfigError, match="unknown model config"):
        get_model_config("vit-huge")


def test_embeddings_are_normalised_and_shaped(model):
    x = torch.randn(2, 1, 16, 32, 32)
    masks = torch.zeros(2, 16, 32, 32, dtype=torch.int32)
    masks[:, :8] |= 1 << 5
    out = model.encode_image(x, masks)
    assert out["global"].shape == (2, 64) and out["local"].shape == (2, 10, 64)
    torch.testing.assert_close(out["global"].norm(dim=-1), torch.ones(2))
    assert out["present"][:, 5].all() and not out["present"][:, :5].any()
    torch.testing.assert_close(out["local"][:, 5].norm(dim=-1), torch.ones(2))
    t = model.encode_text(TEXTS[:4])
    assert t.shape == (4, 64)
    torch.testing.assert_close(t.norm(dim=-1), torch.ones(4))
    assert model.scale().item() == pytest.approx(1 / 0.07, rel=1e-5)


def test_save_then_load_model_gives_identical_outputs(model, tmp_path):
    x = torch.randn(2, 1, 16, 32, 32)
    masks = torch.zeros(2, 16, 32, 32, dtype=torch.int32)
    masks[0, :, :16] |= 1
    with torch.no_grad():
        model.logit_scale.add_(0.3)
        before = model.encode_image(x, masks), model.encode_text(TEXTS[:3])
    path = model.save(tmp_path / "model")
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors", "text"]
    assert not list(path.rglob("*.bin")) and not list(path.rglob("*.pt"))  # no pickle anywhere
    loaded = load_model(path).eval()
    with torch.no_grad():
        after = loaded.encode_image(x, masks), loaded.encode_text(TEXTS[:3])
    for k in ("global", "local"):
        torch.testing.assert_close(before[0][k], after[0][k])
    torch.testing.assert_close(before[1], after[1])
    assert loaded.scale().item() == pytest.approx(model.scale().item())
    assert json.loads((path / "config.json").read_text())["image"]["backbone"] == "vit"


def test_load_model_refuses_mismatched_or_missing_files(model, tmp_path):
    with pytest.raises(ConfigError, match="not a saved mv3d model"):
        load_model(tmp_path)
    path = model.save(tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    cfg["image"]["depth"] = 3
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="do not match"):
        load_model(path)


def test_gradients_reach_both_towers_and_the_temperature(model):
    from mv3dtk.train.losses import MedVista3DLoss

    model.train()
    x = torch.randn(4, 1, 16, 32, 32)
    img = model.encode_image(x, None)
    txt = model.encode_text(TEXTS[:4])
    out = {"image_global": img["global"], "image_local": img["local"], "region_present": img["present"],
           "text_global": txt, "text_local": torch.zeros_like(img["local"]),
           "text_local_valid": torch.zeros_like(img["present"]), "logit_scale": model.scale()}
    MedVista3DLoss(use_global_semantic=False, use_local_semantic=False)(out)["loss"].backward()
    first = next(model.image.patch_embed.parameters())  # the first conv of the stem
    assert first.grad.abs().sum() > 0
    assert all(p.grad.abs().sum() > 0 for p in model.text_proj.parameters()) and model.logit_scale.grad is not None
    emb = model.text.model.get_input_embeddings().weight
    assert emb.grad is not None and emb.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["unimiss-tiny", "vit-tiny"])
def test_every_tiny_config_trains_end_to_end_through_the_dual_pathway(name, tiny_text, tmp_path):
    cfg = get_model_config(name)
    cfg["text"] = {"model": str(tiny_text), "max_length": 64}
    torch.manual_seed(0)
    model = MedVista3D(cfg)
    x = torch.randn(2, 1, *cfg["image"]["input_size"])
    masks = torch.zeros(2, *cfg["image"]["input_size"], dtype=torch.int32)
    masks[:, :, :32] |= 1
    out = model.encode_image(x, masks)
    assert out["present"][:, 0].all()
    (out["global"].sum() + out["local"].sum()).backward()
    assert all(p.grad is not None for n, p in model.image.named_parameters() if p.requires_grad), name
    loaded = load_model(model.save(tmp_path / name))
    model.eval(), loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(x, masks)["local"], loaded.encode_image(x, masks)["local"])


def test_batchnorm_statistics_of_the_conv_stem_survive_save_and_load(model, tmp_path):
    assert model.config["image"].get("stem"), "vit-tiny is the hybrid (conv stem) ViT"
    x = torch.randn(3, 1, 16, 32, 32)
    model.train()
    with torch.no_grad():
        model.encode_image(x)  # moves the BatchNorm running statistics away from their defaults
    model.eval()
    with torch.no_grad():
        ref = model.encode_image(x)["global"]
    again = load_model(model.save(tmp_path / "m")).eval()
    with torch.no_grad():
        torch.testing.assert_close(again.encode_image(x)["global"], ref)


def test_the_mlp_text_projection_is_saved_loaded_and_validated(model, tiny_text, tmp_path):
    assert model.config["text_proj"] == "linear"  # vit-tiny's, the paper's
    model = MedVista3D({**model.config, "text_proj": "mlp"}).eval()
    assert isinstance(model.text_proj, torch.nn.Sequential)
    with torch.no_grad():
        model.text_proj[0].bias.add_(0.5)  # away from its initial values
        ref = model.encode_text(TEXTS[:3])
    again = load_model(model.save(tmp_path / "m")).eval()
    with torch.no_grad():
        torch.testing.assert_close(again.encode_text(TEXTS[:3]), ref)
    assert again.text_identity == model.text_identity
    linear = MedVista3D({**model.config, "text_proj": "linear"})  # vit-tiny's
    assert isinstance(linear.text_proj, torch.nn.Linear) and linear.text_identity != model.text_identity
    with pytest.raises(ConfigError, match="'text_proj'.*linear, mlp"):
        MedVista3D({**model.config, "text_proj": "deep"})
