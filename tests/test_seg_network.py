"""The segmentation network (issue #19): UniMiSS encoder + stride-1 stem + adapters + STU-Net-B decoder.

Deep-supervision outputs against nnU-Net's own targets (its trainer's scales, its downsampling transform, its
loss), the deep-supervision flag through nnU-Net's own setter, the pretrained encoder copied bit for bit from a
saved ``unimiss-tiny`` mv3d model, gradients reaching every new part, and the clear errors."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from mv3dtk.errors import ConfigError
from mv3dtk.models.factory import get_model_config
from mv3dtk.models.medvista3d import load_model
from mv3dtk.seg.network import (SEG_STRIDES, STU_B_WIDTHS, SegNetwork, UpConv, build_network, check_patch_size,
                                encoder_config, load_encoder_weights, nearest_valid_patch, total_stride)
from mv3dtk.testing.tiny_models import make_tiny_bert, save_tiny_model, seeded

TEXTS = ["Pleural effusion is present.", "No cardiomegaly.", "Emphysema is present in both lungs."] * 4
NOT_UNIMISS = "segmentation needs a UniMiSS model: pretrain with --backbone unimiss"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("seg")
    text = make_tiny_bert(root / "bert", TEXTS, vocab_size=120, seed=0)
    return SimpleNamespace(unimiss=save_tiny_model(root / "unimiss", "unimiss-tiny", text, 0),
                           vit=save_tiny_model(root / "vit", "vit-tiny", text, 0), root=root)


def _arch(model_dir) -> dict:
    """The plans' arch_kwargs, through JSON as nnU-Net reads them."""
    return json.loads(json.dumps({"encoder": encoder_config(model_dir), "strides": SEG_STRIDES,
                                  "widths": STU_B_WIDTHS, "n_stages": 6}))


def _net(model_dir, classes: int = 3, ds: bool = True, seed: int = 0) -> SegNetwork:
    return seeded(seed, lambda: build_network(_arch(model_dir), 1, classes, enable_deep_supervision=ds))


# ---------------------------------------------------------------------------------------------- shapes
@pytest.mark.nnunet
def test_deep_supervision_outputs_are_nnunets_targets(dirs):
    """The outputs have the shapes of the targets nnU-Net builds from the plans' strides, and its DS loss runs."""
    pytest.importorskip("nnunetv2")
    from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    trainer = SimpleNamespace(enable_deep_supervision=True,
                              configuration_manager=SimpleNamespace(pool_op_kernel_sizes=SEG_STRIDES))
    scales = nnUNetTrainer._get_deep_supervision_scales(trainer)
    assert np.allclose(scales, 1 / np.cumprod(np.array(SEG_STRIDES), axis=0)[:-1])
    assert len(scales) == 5 and total_stride() == (16, 32, 32)

    net = _net(dirs.unimiss).eval()
    x = torch.randn(1, 1, 32, 64, 64)  # (B, 1, D, H, W)
    with torch.no_grad():
        out = net(x)
    seg = torch.randint(0, 3, (1, 32, 64, 64), dtype=torch.int16)  # one case's label map (1, D, H, W)
    targets = DownsampleSegForDSTransform(scales)._apply_to_segmentation(seg)
    assert isinstance(out, tuple) and len(out) == len(targets) == 5
    assert [tuple(o.shape[2:]) for o in out] == [tuple(t.shape[1:]) for t in targets] == [
        (32, 64, 64), (32, 32, 32), (16, 16, 16), (8, 8, 8), (4, 4, 4)]
    assert all(o.shape[:2] == (1, 3) for o in out)
    # nnU-Net's own loss, weighted as its trainer does, accepts them (it zips outputs with targets)
    weights = np.array([1 / 2 ** i for i in range(len(scales))])
    weights[-1] = 0
    loss = DeepSupervisionWrapper(DC_and_CE_loss({"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False},
                                                 {}, weight_ce=1, weight_dice=1), weights / weights.sum())
    value = loss(list(out), [t[None].long() for t in targets])  # targets (B, 1, d, h, w)
    assert torch.isfinite(value)


@pytest.mark.nnunet
def test_nnunets_setter_switches_to_the_full_resolution_logits(dirs):
    pytest.importorskip("nnunetv2")
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    net = _net(dirs.unimiss).eval()
    x = torch.randn(1, 1, 32, 64, 64)  # (B, 1, D, H, W)
    with torch.no_grad():
        on = net(x)
        nnUNetTrainer.set_deep_supervision_enabled(SimpleNamespace(is_ddp=False, network=net), False)
        assert net.decoder.deep_supervision is False
        off = net(x)
    assert isinstance(off, torch.Tensor) and off.shape == (1, 3, 32, 64, 64)
    assert torch.equal(off, on[0])  # the same logits, only the coarser heads are skipped
    built_off = _net(dirs.unimiss, ds=False)
    assert built_off.decoder.deep_supervision is False


def test_bridge_reads_channels_from_the_encoder_and_strides_from_its_convs(dirs):
    net = _net(dirs.unimiss)
    tiny = get_model_config("unimiss-tiny")["image"]
    assert net.strides == [tuple(s) for s in SEG_STRIDES]
    adapters = net.adapters
    assert isinstance(adapters[0], torch.nn.Identity)
    assert [a.in_channels for a in adapters[1:]] == [tiny["stem_dim"], *tiny["dims"]]  # 8, 16, 32, 48, 64
    assert [a.out_channels for a in adapters[1:]] == list(STU_B_WIDTHS[1:])
    assert net.stem.conv1.in_channels == 1 and net.stem.conv2.out_channels == STU_B_WIDTHS[0]
    assert [b.conv1.in_channels for b in net.decoder.blocks] == [2 * w for w in STU_B_WIDTHS[:-1]]
    assert [u.step for u in net.decoder.up] == [tuple(s) for s in SEG_STRIDES[1:]]


def test_unimiss_small_with_the_decoder_matches_stu_net_b_on_meta():
    """The decoder (upsampling, blocks, heads) at 105 classes is STU-Net-B's: 29.53 M (reference 2.2)."""
    arch = {"encoder": get_model_config("unimiss-small")["image"], "strides": SEG_STRIDES, "widths": STU_B_WIDTHS,
            "n_stages": 6}
    with torch.device("meta"):
        net = build_network(arch, 1, 105)
        out = net(torch.empty(2, 1, 128, 128, 128))  # (B, 1, D, H, W): the paper's crop
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert round(count(net.decoder) / 1e6, 2) == 29.53
    assert count(net.encoder) == 45_391_840  # test_unimiss: unimiss-small at 96x320x320
    assert [tuple(o.shape) for o in out] == [(2, 105, 128, 128, 128), (2, 105, 128, 64, 64), (2, 105, 64, 32, 32),
                                             (2, 105, 32, 16, 16), (2, 105, 16, 8, 8)]


def test_upsampling_is_nearest_then_1x1_conv():
    """UpConv runs its conv first; that is STU-Net's nearest upsampling followed by the 1x1x1 conv."""
    up = seeded(0, lambda: UpConv(6, 4, (1, 2, 2)))
    x = torch.randn(2, 6, 3, 4, 5)  # (B, C, d, h, w)
    ref = up.conv(F.interpolate(x, scale_factor=(1, 2, 2), mode="nearest"))  # (B, 4, 3, 8, 10)
    assert up(x).shape == ref.shape == (2, 4, 3, 8, 10)
    assert torch.allclose(up(x), ref, atol=1e-6)


# ---------------------------------------------------------------------------------------------- weights
def test_encoder_weights_are_the_pretrained_ones_bit_for_bit(dirs):
    ref = load_model(dirs.unimiss).image.state_dict()
    net = _net(dirs.unimiss)
    fresh = net.encoder.state_dict()
    assert set(fresh) == set(ref)
    assert not any(torch.equal(fresh[k], ref[k]) for k in ref)  # a fresh network's encoder is not the model's
    stem = {k: v.clone() for k, v in net.stem.state_dict().items()}
    assert load_encoder_weights(net, dirs.unimiss) == len(ref)
    loaded = net.encoder.state_dict()
    assert all(torch.equal(loaded[k], ref[k]) for k in ref)
    assert all(torch.equal(v, stem[k]) for k, v in net.stem.state_dict().items())  # the new stem is untouched
    assert {k for k in net.state_dict() if k.startswith("encoder.")} == {f"encoder.{k}" for k in ref}


def test_a_vit_model_is_refused(dirs):
    with pytest.raises(ConfigError, match=NOT_UNIMISS):
        encoder_config(dirs.vit)
    with pytest.raises(ConfigError, match=NOT_UNIMISS):
        load_encoder_weights(_net(dirs.unimiss), dirs.vit)
    vit_arch = {**_arch(dirs.unimiss), "encoder": get_model_config("vit-tiny")["image"]}
    with pytest.raises(ConfigError, match=NOT_UNIMISS):
        build_network(vit_arch, 1, 3)
    with pytest.raises(ConfigError, match="not a saved mv3d model"):
        encoder_config(dirs.root / "nowhere")


def test_weights_missing_a_tensor_are_refused(dirs):
    broken = shutil.copytree(dirs.unimiss, dirs.root / "broken")
    state = load_file(str(broken / "model.safetensors"))
    del state["image.stages.2.blocks.0.attn.q.weight"]
    save_file(state, str(broken / "model.safetensors"), metadata={"format": "mv3d", "version": "1"})
    with pytest.raises(ConfigError, match=r"missing \['image\.stages\.2\.blocks\.0\.attn\.q\.weight'\]"):
        load_encoder_weights(_net(dirs.unimiss), broken)


def test_a_network_planned_for_another_encoder_is_refused(dirs):
    arch = _arch(dirs.unimiss)
    fewer = {**arch, "encoder": {**arch["encoder"], "depths": [1, 1, 1, 1]}}  # the model has 2 stage-4 blocks
    with pytest.raises(ConfigError, match=r"unexpected \['stages\.3\.blocks\.1\.attn\.kv\.bias'"):
        load_encoder_weights(build_network(fewer, 1, 3), dirs.unimiss)
    wider = {**arch, "encoder": {**arch["encoder"], "input_size": [32, 96, 96]}}  # other position tables
    with pytest.raises(ConfigError, match=r"shape mismatches \['stages\.0\.pos_embed"):
        load_encoder_weights(build_network(wider, 1, 3), dirs.unimiss)
    heads = {**arch, "encoder": {**arch["encoder"], "heads": [1, 1, 1, 1]}}  # same shapes, another function
    with pytest.raises(ConfigError, match=r"differs in \['heads'\]"):
        load_encoder_weights(build_network(heads, 1, 3), dirs.unimiss)


# ---------------------------------------------------------------------------------------------- training
def test_backward_reaches_the_stem_adapters_decoder_heads_and_encoder(dirs):
    net = _net(dirs.unimiss).train()
    x = torch.randn(2, 1, 32, 32, 32)  # (B, 1, D, H, W): the smallest patch with a 2-voxel bottleneck
    out = net(x)
    assert [tuple(o.shape[2:]) for o in out] == [(32, 32, 32), (32, 16, 16), (16, 8, 8), (8, 4, 4), (4, 2, 2)]
    sum(F.cross_entropy(o, torch.randint(0, 3, (2, *o.shape[2:]))) for o in out).backward()
    no_grad = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []
    parts = {n.split(".")[0] if not n.startswith("decoder.") else ".".join(n.split(".")[:2])
             for n, _ in net.named_parameters()}
    assert parts == {"stem", "encoder", "adapters", "decoder.up", "decoder.blocks", "decoder.seg_layers"}


# ---------------------------------------------------------------------------------------------- bad input
def test_a_patch_the_strides_cannot_divide_names_the_nearest_valid_size(dirs):
    net = _net(dirs.unimiss).eval()
    with torch.no_grad(), pytest.raises(ConfigError, match="nearest valid patch is 32 64 64"):
        net(torch.zeros(1, 1, 32, 48, 64))  # H = 48 is no multiple of 32
    with torch.no_grad(), pytest.raises(ConfigError, match="1x1x1 bottleneck.*nearest valid patch is 32 32 32"):
        net(torch.zeros(1, 1, 16, 32, 32))
    with pytest.raises(ConfigError, match="nearest valid patch is 96 96 96"):
        check_patch_size((100, 100, 100))
    check_patch_size((128, 128, 128))  # the paper's crop
    assert nearest_valid_patch((112, 130, 60)) == (112, 128, 64)


def test_plans_that_disagree_with_the_network_are_refused(dirs):
    arch = _arch(dirs.unimiss)
    isotropic = [[1, 1, 1]] + [[2, 2, 2]] * 5  # nnU-Net's default plans for a 128^3 patch
    with pytest.raises(ConfigError, match=r"strides .* are not what the network does"):
        build_network({**arch, "strides": isotropic}, 1, 3)
    with pytest.raises(ConfigError, match="n_stages must be 6"):
        build_network({**arch, "n_stages": 5, "widths": STU_B_WIDTHS[:5]}, 1, 3)
    with pytest.raises(ConfigError, match="CT is one channel"):
        build_network(arch, 2, 3)
    with pytest.raises(ConfigError, match=r"unknown \['kernel_sizes'\]"):
        build_network({**arch, "kernel_sizes": [[3, 3, 3]] * 6}, 1, 3)
