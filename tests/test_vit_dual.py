"""The 3D ViT and the dual pathway: token selection, batched local pathway, split points."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mv3dtk.models.dual import encode_dual, region_weights, select_tokens
from mv3dtk.models.vit3d import ViT3D


@pytest.fixture
def vit():
    torch.manual_seed(0)
    return ViT3D(embed_dim=32, depth=3, heads=4, patch_size=(4, 8, 8), input_size=(16, 32, 32)).eval()


def _masks():
    m = torch.zeros(2, 16, 32, 32, dtype=torch.int32)  # token grid (4, 4, 4): 4x8x8 voxels per token
    m[0, :8, :16, :16] |= 1  # region 0: exactly tokens (0..1, 0..1, 0..1) of sample 0
    m[0, :6, :12, :12] |= 2  # region 1: covers token (0,0,0) fully, its neighbours at 50 % or less
    m[0, 0, 0, 0] |= 4  # region 2: one voxel; no token reaches 0.5
    m[1] |= 8  # region 3: the whole volume of sample 1
    return m


def test_mask_pooling_selects_exactly_the_expected_tokens(vit):
    weights = region_weights(_masks(), 4, (4, 4, 4))
    keep, present = select_tokens(weights)
    assert present.tolist() == [[True, True, True, False], [False, False, False, True]]
    idx = lambda b, r: keep[b, r].nonzero().squeeze(1).tolist()  # noqa: E731  token = d*16 + h*4 + w
    assert idx(0, 0) == [0, 1, 4, 5, 16, 17, 20, 21]
    # region 1: token (0,0,0) is covered fully; (1,0,0) is covered 2/4 in d -> 0.5 (kept), (0,1,0) 4/8 in h
    # -> 0.5 (kept); (1,1,0) 0.25 (dropped)
    assert idx(0, 1) == [0, 1, 4, 16]
    assert idx(0, 2) == [0]  # too small for any token: its best token
    assert idx(1, 3) == list(range(64)) and idx(1, 0) == []


def test_local_pathway_runs_the_late_blocks_on_the_region_tokens_only(vit):
    x = torch.randn(2, 1, 16, 32, 32)
    masks = _masks()
    out = encode_dual(vit, x, masks, 4)
    early, grid = vit.forward_early(x)
    keep, _ = select_tokens(region_weights(masks, 4, grid))
    for b, r in [(0, 0), (0, 1), (0, 2), (1, 3)]:
        idx = keep[b, r].nonzero().squeeze(1)
        expected = vit.forward_late(early[b:b + 1, idx]).mean(1)[0]
        torch.testing.assert_close(out["local"][b, r], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["local"][1, 3], out["global"][1], atol=1e-5, rtol=1e-5)  # whole volume
    assert (out["local"][~out["present"]] == 0).all()


def test_absent_regions_and_no_masks(vit):
    x = torch.randn(2, 1, 16, 32, 32)
    none = encode_dual(vit, x, None, 4)
    zero = encode_dual(vit, x, torch.zeros(2, 16, 32, 32, dtype=torch.int32), 4)
    assert not none["present"].any() and not zero["present"].any()
    torch.testing.assert_close(none["global"], zero["global"])


@pytest.mark.parametrize("split", [-1, 0, 1, -3])
def test_split_points_compose_to_the_full_forward(split):
    torch.manual_seed(1)
    ref = ViT3D(embed_dim=32, depth=3, heads=4, patch_size=(4, 8, 8), input_size=(16, 32, 32)).eval()
    m = ViT3D(embed_dim=32, depth=3, heads=4, patch_size=(4, 8, 8), input_size=(16, 32, 32),
              mask_pool_layer=split).eval()
    m.load_state_dict(ref.state_dict())
    x = torch.randn(1, 1, 16, 32, 32)
    torch.testing.assert_close(m(x), ref(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="outside"):
        ViT3D(embed_dim=32, depth=3, heads=4, patch_size=(4, 8, 8), input_size=(16, 32, 32), mask_pool_layer=3)


def test_padding_tokens_are_never_attended_to(vit):
    tokens = torch.randn(2, 7, 32)
    keep = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
    garbage = tokens.clone()
    garbage[1, 4:] = 1e3
    out = vit.forward_late(garbage, keep)
    torch.testing.assert_close(out[1, :4], vit.forward_late(tokens[1:2, :4])[0], atol=1e-5, rtol=1e-5)


def test_position_embeddings_resize_trilinearly_for_other_inputs(vit):
    from mv3dtk.models.vit3d import resize_pos_embed

    early, grid = vit.forward_early(torch.randn(1, 1, 24, 48, 64))  # grid (6, 6, 8) instead of (4, 4, 4)
    assert grid == (6, 6, 8) and early.shape == (1, 288, 32)
    table = vit.pos_embed.reshape(1, 4, 4, 4, 32).permute(0, 4, 1, 2, 3)  # (1, C, d, h, w)
    expected = F.interpolate(table, size=(6, 6, 8), mode="trilinear", align_corners=False)
    torch.testing.assert_close(resize_pos_embed(vit.pos_embed, (4, 4, 4), (6, 6, 8)),
                               expected.permute(0, 2, 3, 4, 1).reshape(1, 288, 32))
    with pytest.raises(ValueError, match="multiple of the patch size"):
        vit.forward_early(torch.randn(1, 1, 15, 32, 32))


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(2)
    a = ViT3D(embed_dim=32, depth=2, heads=4, patch_size=(4, 8, 8), input_size=(16, 32, 32))
    b = ViT3D(embed_dim=32, depth=2, heads=4, patch_size=(4, 8, 8), input_size=(16, 32, 32), grad_checkpointing=True)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 1, 16, 32, 32)
    a(x).square().mean().backward()
    b(x).square().mean().backward()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5, msg=n)


def test_conv_stem_keeps_the_token_grid_and_learns_batch_statistics():
    torch.manual_seed(0)
    plain = ViT3D(embed_dim=32, depth=1, heads=4, patch_size=(4, 8, 8), input_size=(16, 32, 32))
    hybrid = ViT3D(embed_dim=32, depth=1, heads=4, patch_size=(4, 8, 8), input_size=(16, 32, 32), stem=[8, 16, 32])
    x = torch.randn(2, 1, 16, 32, 32)
    assert plain.patch_embed(x).shape == hybrid.patch_embed(x).shape == (2, 32, 4, 4, 4)
    strides = [m.stride for m in hybrid.patch_embed if isinstance(m, torch.nn.Conv3d)]
    assert strides == [(2, 2, 2), (2, 2, 2), (1, 2, 2), (1, 1, 1)]  # the stages use up the 4x8x8 patch
    bn = [m for m in hybrid.patch_embed if isinstance(m, torch.nn.BatchNorm3d)]
    hybrid.train()(x)
    assert all(int(m.num_batches_tracked) == 2 for m in bn) and not torch.equal(bn[0].running_mean, torch.zeros(8))


def test_input_windows_stretch_the_lung_range_into_a_channel_of_its_own():
    from mv3dtk.models.base import InputWindows

    win = InputWindows([[-1.0, 1.0], [-1.0, -0.5]])
    x = torch.tensor([-1.0, -0.95, -0.85, -0.5, 0.04, 1.0]).reshape(1, 1, 1, 1, 6)  # air, emphysema, lung, ..
    out = win(x)  # (1, 2, 1, 1, 6)
    torch.testing.assert_close(out[0, 0].flatten(), x.flatten())  # the full window is the input itself
    torch.testing.assert_close(out[0, 1].flatten(), torch.tensor([-1.0, -0.8, -0.4, 1.0, 1.0, 1.0]))
    vit = ViT3D(embed_dim=32, depth=1, heads=4, patch_size=(4, 8, 8), input_size=(16, 32, 32), stem=[8, 16, 32],
                windows=[[-1.0, 1.0], [-1.0, -0.5]])
    assert vit.patch_embed[0].in_channels == 2 and vit(torch.randn(2, 1, 16, 32, 32)).shape == (2, 64, 32)
    assert not any("window" in k for k in vit.state_dict())  # rebuilt from the config, not stored
    with pytest.raises(ValueError, match="lo < hi"):
        InputWindows([[-0.5, -1.0]])
    with pytest.raises(ValueError, match="one-channel"):
        ViT3D(in_chans=2, embed_dim=32, depth=1, heads=4, patch_size=(4, 8, 8), input_size=(16, 32, 32),
              windows=[[-1.0, 1.0]])


def test_meanmax_pooling_concatenates_mean_and_max_over_valid_tokens():
    from mv3dtk.models.dual import pool_tokens, pool_width

    tokens = torch.tensor([[[1.0, -2.0], [3.0, 0.0], [100.0, 100.0]]])  # (1, 3, 2); the last token is padding
    valid = torch.tensor([[True, True, False]])
    torch.testing.assert_close(pool_tokens(tokens, valid, "meanmax"), torch.tensor([[2.0, -1.0, 3.0, 0.0]]))
    assert pool_width("meanmax") == 2 and pool_width("max") == pool_width("mean") == 1
