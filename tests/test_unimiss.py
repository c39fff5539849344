"""UniMiSS backbone: shapes and parameter counts against the reference (shared/reference/unimiss-nnunet.md
section 1), the early/late split, padding masks, official checkpoint loading, activation checkpointing."""

from __future__ import annotations

import argparse
import math
import os
import re
import shlex

import pytest
import torch
import torch.nn.functional as F

from mv3dtk.errors import Mv3dError
from mv3dtk.models.base import Backbone
from mv3dtk.models.unimiss import PRESETS, UniMiSS, build_unimiss, resize_pos_embed
from mv3dtk.models.unimiss_weights import load_official_checkpoint, load_official_state_dict

TINY = PRESETS["unimiss-tiny"]


def _tiny(seed: int = 0, **kw) -> UniMiSS:
    torch.manual_seed(seed)
    return build_unimiss("unimiss-tiny", **kw).eval()


def _nparams(m: torch.nn.Module, prefix: str = "") -> int:
    return sum(p.numel() for n, p in m.named_parameters() if n.startswith(prefix))


# ---------------------------------------------------------------------- reference shapes and counts
def test_small_shapes_at_96x320x320_on_meta():
    with torch.device("meta"):
        m = build_unimiss("unimiss-small")
    assert isinstance(m, Backbone) and m.embed_dim == 512
    assert m.token_grid((96, 320, 320)) == (6, 10, 10)
    assert m.stage_grids((96, 320, 320)) == [(96, 160, 160), (48, 80, 80), (24, 40, 40), (12, 20, 20), (6, 10, 10)]
    sr_out = {}
    for i in range(3):
        m.stages[i].blocks[0].attn.sr.register_forward_hook(
            lambda mod, inp, out, i=i: sr_out.__setitem__(i, tuple(out.shape)))
    x = torch.empty(2, 1, 96, 320, 320, device="meta")
    maps = m.forward_pyramid(x)
    assert [tuple(a.shape) for a in maps] == [
        (2, 32, 96, 160, 160), (2, 48, 48, 80, 80), (2, 128, 24, 40, 40), (2, 256, 12, 20, 20), (2, 512, 6, 10, 10)]
    # reference 1.4.2: SR conv floors: 8x13x13 = 1,352 keys at stage 1, 6x10x10 at stages 2 and 3
    assert sr_out == {0: (2, 48, 8, 13, 13), 1: (2, 128, 6, 10, 10), 2: (2, 256, 6, 10, 10)}
    tokens, grid = m.forward_early(x)
    assert grid == (6, 10, 10) and tuple(tokens.shape) == (2, 600, 512)
    assert tuple(m.forward_late(tokens).shape) == (2, 600, 512)
    assert [tuple(st.pos_embed.shape) for st in m.stages] == [
        (1, 307201, 48), (1, 38401, 128), (1, 4801, 256), (1, 600, 512)]


def _official_minus_ours(m: UniMiSS) -> int:
    """Parameters the official encoder has and ``m`` lacks, read off the built model: stage 4's class
    projection Linear(C3, C4) and the class row of its position table (C4), which ``m`` drops (its stage 4
    has no class token), less the final norm that only ``m`` has."""
    c3, c4 = m.stages[2].pos_embed.shape[-1], m.stages[3].pos_embed.shape[-1]
    assert m.stages[3].num_prefix == 0 and m.stages[3].cls_proj is None  # what makes them differ
    return (c3 * c4 + c4) + c4 - _nparams(m, "norm.")


@pytest.mark.parametrize("input_size, ours, official, official_m, pos_official, pos_m", [
    ((16, 96, 96), 24_512_992, 24_644_064, 24.64, 318_896, 0.32),
    ((96, 320, 320), 45_391_840, 45_522_912, 45.52, 21_197_744, 21.20),
])
def test_small_parameter_counts_match_reference(input_size, ours, official, official_m, pos_official, pos_m):
    """``official``, ``official_m`` and ``pos_*`` are the reference's (unimiss-nnunet.md 1.3) figures."""
    with torch.device("meta"):
        m = build_unimiss("unimiss-small", input_size=input_size)
    assert _nparams(m) == ours
    official_counted = _nparams(m) + _official_minus_ours(m)
    assert official_counted == official and round(official_counted / 1e6, 2) == official_m
    pos = sum(st.pos_embed.numel() for st in m.stages) + 512  # + the official stage-4 class position
    assert pos == pos_official and round(pos / 1e6, 2) == pos_m
    # per-part split (reference 1.3): blocks 1.05/3.74/5.26/9.46 M; embeds 0.011/0.042/0.166/0.885/3.54 M
    blocks = [_nparams(m, f"stages.{i}.blocks.") for i in range(4)]
    assert blocks == [1_052_160, 3_741_696, 5_259_264, 9_457_152]
    assert [round(b / 1e6, 2) for b in blocks] == [1.05, 3.74, 5.26, 9.46]
    embeds = [_nparams(m, "stem.")] + [_nparams(m, f"stages.{i}.embed.") for i in range(4)]
    assert embeds == [11_040, 41_568, 166_144, 885_248, 3_539_968]


def test_attention_matches_a_naive_spatial_reduction_attention():
    torch.manual_seed(0)
    m = _tiny()
    attn = m.stages[2].blocks[0].attn  # dim 48, 2 heads, sr 2
    grid = (4, 4, 6)
    c, h = 48, attn.heads
    assert h == 2 and attn.sr_ratio == 2
    x = torch.randn(2, 1 + math.prod(grid), c)
    q = x @ attn.q.weight.T + attn.q.bias
    vol = x[:, 1:].transpose(1, 2).reshape(2, c, *grid)
    red = F.conv3d(vol, attn.sr.weight, attn.sr.bias, stride=2).flatten(2).transpose(1, 2)
    kv_in = F.layer_norm(torch.cat([x[:, :1], red], 1), (c,), attn.sr_norm.weight, attn.sr_norm.bias, 1e-5)
    k, v = (kv_in @ attn.kv.weight.T + attn.kv.bias).chunk(2, dim=-1)
    assert k.shape[1] == 1 + 2 * 2 * 3
    split = lambda t: t.reshape(2, t.shape[1], h, c // h).transpose(1, 2)  # noqa: E731
    w = (split(q) @ split(k).transpose(-1, -2) / math.sqrt(c // h)).softmax(-1)
    ref = (w @ split(v)).transpose(1, 2).reshape(2, -1, c) @ attn.proj.weight.T + attn.proj.bias
    torch.testing.assert_close(attn(x, grid), ref, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------- tiny: forward, resize
def test_tiny_early_late_equals_forward_and_pyramid():
    m = _tiny()
    x = torch.randn(2, 1, 32, 64, 64)
    with torch.no_grad():
        tokens, grid = m.forward_early(x)
        late = m.forward_late(tokens)
        full = m(x)
        pyr = m.forward_pyramid(x)
    assert grid == m.token_grid((32, 64, 64)) == (2, 2, 2) and tokens.shape == (2, 8, 64)
    torch.testing.assert_close(late, full, rtol=0, atol=0)
    torch.testing.assert_close(pyr[-1], full.transpose(1, 2).reshape(2, 64, *grid))
    assert [a.shape[1] for a in pyr] == [8, 16, 32, 48, 64]


def test_other_input_size_resizes_position_tables_trilinearly():
    m = _tiny()
    x = torch.randn(2, 1, 32, 48, 80)
    grids = m.stage_grids((32, 48, 80))
    assert grids[-1] == m.token_grid((32, 48, 80)) == (2, 2, 3)
    with torch.no_grad():
        out = m(x)
    assert out.shape == (2, 12, 64) and torch.isfinite(out).all()
    # the resize is trilinear on the 3D grid, class position kept apart
    st = m.stages[0]
    g0, g = st.pos_grid, grids[1]
    table = st.pos_embed.detach()
    vol = table[:, 1:].reshape(1, *g0, -1).permute(0, 4, 1, 2, 3)
    want = F.interpolate(vol, size=g, mode="trilinear", align_corners=False).permute(0, 2, 3, 4, 1).reshape(1, -1, 16)
    got = st.pos_for(g).detach()
    torch.testing.assert_close(got[:, :1], table[:, :1], rtol=0, atol=0)
    torch.testing.assert_close(got[:, 1:], want)
    # and the forward really uses it: a model built for 32x48x80 holding those resized tables gives the same output
    m2 = build_unimiss("unimiss-tiny", input_size=(32, 48, 80)).eval()
    sd = {k: v for k, v in m.state_dict().items() if not k.endswith("pos_embed")}
    for i, s in enumerate(m.stages):
        sd[f"stages.{i}.pos_embed"] = s.pos_for(grids[i + 1]).detach()
    m2.load_state_dict(sd)
    with torch.no_grad():
        torch.testing.assert_close(m2(x), out)


def test_too_small_input_is_a_clear_error():
    m = _tiny()
    with pytest.raises(ValueError, match="too small"):
        m(torch.randn(1, 1, 8, 16, 16))
    with pytest.raises(ValueError, match=r"\(B, 1, D, H, W\)"):
        m(torch.randn(1, 2, 32, 64, 64))


def test_constructor_kwargs():
    UniMiSS(name="unimiss-tiny", backbone="unimiss", **{k: list(v) if isinstance(v, tuple) else v
                                                         for k, v in TINY.items()})
    with pytest.raises(TypeError, match="embed_dim"):
        UniMiSS(embed_dim=64, **TINY)


# ---------------------------------------------------------------------- dual-pathway split
def test_split_positions_compose_to_the_same_function():
    kw = dict(depths=(1, 1, 1, 3))
    ref = _tiny(mask_pool_layer=-1, **kw)
    x = torch.randn(2, 1, 32, 64, 64)
    outs, early_lens = [], []
    for k in (-1, 0, 1, -3):
        m = build_unimiss("unimiss-tiny", mask_pool_layer=k, **kw).eval()
        m.load_state_dict(ref.state_dict())
        assert m.split == k % 3
        with torch.no_grad():
            tokens, _ = m.forward_early(x)
            outs.append(m.forward_late(tokens))
        early_lens.append(len(m.stages[3].blocks[: m.split]))
    assert early_lens == [2, 0, 1, 0]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], atol=1e-5, rtol=1e-5)
    for bad in (3, -4, 7):
        with pytest.raises(ValueError, match="spatial-reduction"):
            build_unimiss("unimiss-tiny", mask_pool_layer=bad, **kw)


def test_padding_mask_subsets_of_different_lengths():
    m = _tiny(depths=(1, 1, 1, 3), mask_pool_layer=1)
    with torch.no_grad():
        tokens, _ = m.forward_early(torch.randn(2, 1, 32, 64, 64))  # (2, 8, 64)
        subsets = [[0, 2, 5], [1, 3, 4, 6, 7]]
        alone = [m.forward_late(tokens[b : b + 1, idx]) for b, idx in enumerate(subsets)]
        # padded batch of length 6; sample 0 has its padding in the middle and at the end, full of garbage
        padded = torch.randn(2, 6, 64) * 100
        keep = torch.zeros(2, 6, dtype=torch.bool)
        slots = [[0, 2, 3], [0, 1, 2, 3, 5]]
        for b, (idx, pos) in enumerate(zip(subsets, slots)):
            padded[b, pos] = tokens[b, idx]
            keep[b, pos] = True
        out = m.forward_late(padded, keep)
        for b, pos in enumerate(slots):
            torch.testing.assert_close(out[b, pos], alone[b][0], atol=1e-5, rtol=1e-5)
        # a sample with no kept token gives finite (ignored) outputs, not NaN
        keep[1] = False
        assert torch.isfinite(m.forward_late(padded, keep)).all()


# ---------------------------------------------------------------------- official checkpoints
def _to_official(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """mv3d keys -> official MiT_encoder 3D keys (written independently of the module's table)."""
    out = {}
    for k, v in sd.items():
        if k.startswith("norm."):
            continue  # the official encoder has no final norm
        k2 = re.sub(r"^stem\.", "patch_embed3D0.", k)
        k2 = re.sub(r"^stages\.(\d)\.embed\.", lambda m: f"patch_embed3D{int(m[1]) + 1}.proj.", k2)
        k2 = re.sub(r"^stages\.(\d)\.pos_embed$", lambda m: f"pos_embed3D{int(m[1]) + 1}", k2)
        k2 = re.sub(r"^stages\.0\.cls_token$", "cls_tokens1", k2)
        k2 = re.sub(r"^stages\.(\d)\.cls_proj\.", lambda m: f"cls_tokens{int(m[1]) + 1}.", k2)
        k2 = re.sub(r"^stages\.(\d)\.blocks\.", lambda m: f"block{int(m[1]) + 1}.", k2)
        k2 = k2.replace(".attn.sr.", ".attn.sr3D.").replace(".attn.sr_norm.", ".attn.norm.")
        if k2 == "pos_embed3D4":  # the official stage-4 table has a class row
            v = torch.cat([torch.randn(1, 1, v.shape[-1]), v], dim=1)
        out["transformer." + k2] = v.clone()
    c3, c4 = sd["stages.2.cls_proj.weight"].shape[0], sd["stages.3.embed.conv.weight"].shape[0]
    out.update({  # official-only keys: stage-4 class projection, 2D path, decoder, DINO head
        "transformer.cls_tokens4.weight": torch.randn(c4, c3), "transformer.cls_tokens4.bias": torch.randn(c4),
        "transformer.patch_embed2D0.conv.weight": torch.randn(8, 3, 7, 7),
        "transformer.patch_embed2D1.proj.norm.weight": torch.randn(16),
        "transformer.pos_embed2D1": torch.randn(1, 50, 16),
        "transformer.block1.0.attn.sr2D.weight": torch.randn(16, 16, 4, 4),
        "DecEmbed3D0.proj.weight": torch.randn(64, 48, 2, 2, 2), "DecPosEmbed3D0": torch.randn(1, 9, 48),
        "Decblock0.0.attn.q.weight": torch.randn(48, 48), "norm.weight": torch.randn(16),
        "cls_tokens0.weight": torch.randn(48, 64), "head.mlp.0.weight": torch.randn(32, 64),
    })
    return out


def _official_checkpoint(model: UniMiSS) -> dict:
    enc = _to_official(model.state_dict())
    return {
        "teacher": {"backbone." + k: v for k, v in enc.items()},
        "student": {"module.backbone." + k: v + 1.0 for k, v in enc.items()},
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]},
        "epoch": 100,
        "args": argparse.Namespace(arch="model_small", img_size3D=[16, 96, 96], lr=8e-4),
        "loss": {"center": torch.zeros(1, 8)},
    }


def test_official_checkpoint_round_trip(tmp_path):
    src = _tiny(seed=1)
    path = tmp_path / "UniMiss_tiny.pth"
    torch.save(_official_checkpoint(src), path)
    dst = _tiny(seed=2)
    x = torch.randn(2, 1, 32, 64, 64)
    with torch.no_grad():
        assert not torch.allclose(dst(x), src(x))
        missing, unexpected = load_official_checkpoint(dst, path)
        torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)
    assert missing == ["norm.weight", "norm.bias"]
    assert unexpected == ["transformer.cls_tokens4.weight", "transformer.cls_tokens4.bias"]
    # the student (module.backbone.*) on request
    stud = _tiny(seed=3)
    load_official_checkpoint(stud, path, which="student")
    torch.testing.assert_close(stud.stages[2].blocks[0].attn.q.weight, src.stages[2].blocks[0].attn.q.weight + 1)
    # a bare encoder state dict (no DINO wrapper, no transformer. prefix) also loads
    bare = {k.removeprefix("transformer."): v for k, v in _to_official(src.state_dict()).items()
            if k.startswith("transformer.")}
    other = _tiny(seed=4)
    load_official_state_dict(other, bare)
    torch.testing.assert_close(other.stages[3].pos_embed, src.stages[3].pos_embed)


def test_official_position_tables_of_another_grid_are_resized():
    src = _tiny(seed=1, input_size=(32, 48, 80))
    dst = _tiny(seed=2)
    missing, _ = load_official_state_dict(dst, _to_official(src.state_dict()), source_input_size=(32, 48, 80))
    assert missing == ["norm.weight", "norm.bias"]
    for s_st, d_st in zip(src.stages, dst.stages):
        table = s_st.pos_embed.detach()
        p = s_st.num_prefix
        vol = table[:, p:].reshape(1, *s_st.pos_grid, -1).permute(0, 4, 1, 2, 3)
        want = F.interpolate(vol, size=d_st.pos_grid, mode="trilinear", align_corners=False)
        want = torch.cat([table[:, :p], want.permute(0, 2, 3, 4, 1).reshape(1, -1, table.shape[-1])], 1)
        torch.testing.assert_close(d_st.pos_embed.detach(), want)
    # by default the source grid is the official pre-training crop, 16x96x96
    pre, tgt = _tiny(seed=3, input_size=(16, 96, 96)), _tiny(seed=4)
    load_official_state_dict(tgt, {"teacher": {"backbone." + k: v for k, v in _to_official(pre.state_dict()).items()}})
    torch.testing.assert_close(tgt.stages[0].pos_embed.detach(), resize_pos_embed(
        pre.stages[0].pos_embed.detach(), (8, 24, 24), (16, 16, 16), num_prefix=1))
    torch.testing.assert_close(tgt.stages[3].pos_embed.detach(), resize_pos_embed(
        pre.stages[3].pos_embed.detach(), (1, 3, 3), (2, 2, 2)))
    # a grid that fits neither the source size nor the model is refused with the fix
    with pytest.raises(Mv3dError, match="source_input_size"):
        load_official_state_dict(_tiny(), _to_official(src.state_dict()))
    # so is a checkpoint of another configuration
    with pytest.raises(Mv3dError, match="preset"):
        load_official_state_dict(_tiny(), _to_official(_tiny(stem_dim=16).state_dict()))
    assert resize_pos_embed(table, (2, 2, 3), (2, 2, 3), num_prefix=1) is table


class _RunsCommand:
    """Unpickling this runs ``touch marker`` in a shell (what a malicious checkpoint does)."""

    def __init__(self, marker):
        self.command = f"touch {shlex.quote(str(marker))}"

    def __reduce__(self):
        return os.system, (self.command,)


def test_checkpoint_with_pickled_code_is_refused(tmp_path):
    path, marker = tmp_path / "evil.pth", tmp_path / "PWNED"
    torch.save({"teacher": _to_official(_tiny().state_dict()), "extra": _RunsCommand(marker)}, path)
    torch.load(path, weights_only=False)  # the control: unpickled, it runs the command
    assert marker.exists()
    marker.unlink()
    with pytest.raises(Mv3dError, match=r"weights_only=True \(.*GLOBAL posix\.system.*\)\. mv3d never unpickles code"):
        load_official_checkpoint(_tiny(), path)
    assert not marker.exists()  # the command never ran
    lst = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], lst)
    with pytest.raises(Mv3dError, match="not a state dict"):
        load_official_checkpoint(_tiny(), lst)
    with pytest.raises(Mv3dError, match="does not exist"):
        load_official_checkpoint(_tiny(), tmp_path / "nope.pth")
    with pytest.raises(Mv3dError, match="no UniMiSS encoder weights"):
        load_official_state_dict(_tiny(), {"head.weight": torch.zeros(2)})


# ---------------------------------------------------------------------- activation checkpointing
def test_gradient_checkpointing_gives_the_same_gradients():
    x = torch.randn(2, 1, 32, 64, 64)
    grads = []
    for gc in (False, True):
        m = _tiny(seed=5, drop_path=0.2, grad_checkpointing=gc).train()
        torch.manual_seed(7)
        tokens, _ = m.forward_early(x)
        keep = torch.ones(2, tokens.shape[1], dtype=torch.bool)
        keep[0, ::2] = False
        loss = m.forward_late(tokens, keep)[keep].square().mean() + m.forward_late(tokens).mean()
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-6, rtol=1e-5, msg=n)
