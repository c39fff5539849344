"""nnU-Net planning and the trainer of ``mv3d segment-finetune`` (issue #19), on real nnU-Net 2.8 on CPU.

One tiny raw dataset (5 cases of 32x64x64 at 3 x 1.5 x 1.5 mm: a sphere and a box over noise, values in [-1, 1],
channel ``noNorm``) is planned and preprocessed once per module; a saved ``unimiss-tiny`` model gives the encoder.
The plans variant uses small decoder widths so that a 2 x 2-iteration training run stays short (the real widths,
STU-Net-B's, are checked in the plans and, on meta tensors, in test_seg_network)."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mv3dtk import errors as mv3d_errors
from mv3dtk.errors import ConfigError, MissingInputError
from mv3dtk.seg.plans import (CONFIGURATION, PLANS_NAME, TRAINING_DEFAULTS, check_fold, nnunet_env, plans_path,
                              read_plans, require_nnunet, write_plans_variant)

DATASET = 501
PATCH = (32, 64, 64)  # (D, H, W): the smallest patch whose bottleneck has two voxels
SMALL = (8, 16, 16, 32, 32, 32)  # decoder widths for the tests
TEXTS = ["Pleural effusion is present.", "No cardiomegaly.", "Emphysema is present in both lungs."] * 4


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_raw_dataset(raw_root, dataset_id: int = DATASET, n: int = 5, seed: int = 0, slice_first: bool = False):
    """nnU-Net's raw format: a sphere (label 1) and a box (label 2) over noise, 32x64x64 voxels (D, H, W) at
    3 x 1.5 x 1.5 mm. Stored slice-last (nibabel axes W, H, D: SimpleITK reads D, H, W) unless ``slice_first``."""
    import nibabel as nib

    folder = raw_root / f"Dataset{dataset_id:03d}_Tiny"
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.meshgrid(np.arange(32), np.arange(64), np.arange(64), indexing="ij")  # (D, H, W)
    for i in range(n):
        seg = np.zeros((32, 64, 64), np.uint8)
        cz, cy, cx = 16 + rng.integers(-3, 4), 24 + rng.integers(-4, 5), 24 + rng.integers(-4, 5)
        seg[(3 * (zz - cz)) ** 2 + (1.5 * (yy - cy)) ** 2 + (1.5 * (xx - cx)) ** 2 < 12 ** 2] = 1  # 12 mm radius
        z0, y0, x0 = 6 + rng.integers(0, 8), 42 + rng.integers(0, 6), 36 + rng.integers(0, 8)
        seg[z0:z0 + 8, y0:y0 + 14, x0:x0 + 16] = 2
        img = rng.normal(0.0, 0.1, seg.shape) + 0.6 * (seg == 1) - 0.6 * (seg == 2)
        img = np.clip(img, -1, 1).astype(np.float32)  # (D, H, W)
        if slice_first:
            arrays, affine = (img, seg), np.diag([3.0, 1.5, 1.5, 1.0])
        else:
            arrays, affine = (img.transpose(2, 1, 0), seg.transpose(2, 1, 0)), np.diag([1.5, 1.5, 3.0, 1.0])
        nib.save(nib.Nifti1Image(arrays[0], affine), folder / "imagesTr" / f"case{i:02d}_0000.nii.gz")
        nib.save(nib.Nifti1Image(arrays[1], affine), folder / "labelsTr" / f"case{i:02d}.nii.gz")
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "noNorm"}, "labels": {"background": 0, "sphere": 1, "box": 2}, "numTraining": n,
        "file_ending": ".nii.gz"}))
    return folder


@pytest.fixture(scope="module")
def nn():
    pytest.importorskip("nnunetv2")
    from mv3dtk.seg import trainer

    return trainer


@pytest.fixture(scope="module")
def planned(nn, tmp_path_factory):
    """The tiny dataset planned and preprocessed by nnU-Net, and the variant written (small widths, 2 x 2)."""
    from mv3dtk.seg.plans import plan_and_preprocess
    from mv3dtk.testing.tiny_models import make_tiny_bert, save_tiny_model

    root = tmp_path_factory.mktemp("segtrain")
    text = make_tiny_bert(root / "bert", TEXTS, vocab_size=120, seed=0)
    model = save_tiny_model(root / "unimiss", "unimiss-tiny", text)
    run = root / "run"
    write_raw_dataset(run / "nnUNet_raw")
    assert plan_and_preprocess(run, DATASET).name == "nnUNetPlans.json"
    write_plans_variant(run, DATASET, model, patch=PATCH, batch_size=2, widths=SMALL, epochs=2, iterations=2,
                        val_iterations=1)
    return SimpleNamespace(root=root, run=run, model=model)


def _trainer(nn, planned, fold, encoder=None, **settings):
    """nnUNetTrainer_mv3d as nnU-Net builds it, on CPU, with the variant's plans (``settings`` override mv3d's,
    ``encoder`` the encoder config of the plans' arch_kwargs)."""
    plans = read_plans(planned.run, DATASET)
    plans["mv3d"].update(settings)
    plans["configurations"][CONFIGURATION]["architecture"]["arch_kwargs"]["encoder"].update(encoder or {})
    plans["continue_training"] = False
    dataset_json = json.loads((plans_path(planned.run, DATASET).parent / "dataset.json").read_text())
    with nnunet_env(planned.run):
        return nn.nnUNetTrainer_mv3d(plans=plans, configuration=CONFIGURATION, fold=fold,
                                     dataset_json=dataset_json, device=torch.device("cpu"))


# ---------------------------------------------------------------------------------------------- environment
def test_nnunet_env_points_into_the_run_and_restores(tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_raw", "/elsewhere")
    monkeypatch.delenv("nnUNet_results", raising=False)
    with nnunet_env(tmp_path / "run") as roots:
        assert os.environ["nnUNet_raw"] == str((tmp_path / "run" / "nnUNet_raw").resolve())
        assert os.environ["nnUNet_results"] == str(roots["nnUNet_results"])
        assert all(p.is_dir() for p in roots.values())
    assert os.environ["nnUNet_raw"] == "/elsewhere" and "nnUNet_results" not in os.environ


def test_a_missing_nnunet_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "nnunetv2", None)  # import nnunetv2 -> ImportError
    with pytest.raises(ConfigError, match=r'nnU-Net v2 is not installed: pip install "mv3d\[seg\]"'):
        require_nnunet()


def test_fewer_than_5_cases_with_a_numeric_fold_suggests_fold_all():
    with pytest.raises(ConfigError, match="at least 5 training cases, and the dataset has 4: pass --fold all"):
        check_fold(4, 0)
    assert check_fold(4, "all") == "all" and check_fold(5, "3") == 3 and check_fold(250, 4) == 4
    with pytest.raises(ConfigError, match="fold must be 0-4"):
        check_fold(10, 5)
    with pytest.raises(ConfigError, match="fold must be 0-4 or 'all'"):
        check_fold(10, "first")


# ---------------------------------------------------------------------------------------------- plans
@pytest.mark.nnunet
def test_the_plans_variant_carries_the_encoder_strides_patch_batch_and_settings(nn, planned, tmp_path):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from mv3dtk.seg.network import SEG_STRIDES, STU_B_WIDTHS, encoder_config

    run = shutil.copytree(planned.run / "nnUNet_preprocessed", tmp_path / "run" / "nnUNet_preprocessed")
    run = run.parent
    assert write_plans_variant(run, DATASET, planned.model) == (PLANS_NAME, CONFIGURATION)  # the paper's defaults
    source, variant = read_plans(run, DATASET, "nnUNetPlans"), read_plans(run, DATASET)
    assert plans_path(run, DATASET).name == "mv3dPlans.json" and variant["plans_name"] == "mv3dPlans"
    assert list(variant["configurations"]) == ["3d_fullres_mv3d"]
    cfg, base = variant["configurations"]["3d_fullres_mv3d"], source["configurations"]["3d_fullres"]
    assert "inherits_from" not in cfg
    assert cfg["patch_size"] == [128, 128, 128] and cfg["batch_size"] == 2
    assert cfg["architecture"] == {
        "network_class_name": "mv3dtk.seg.network.SegNetwork",
        "arch_kwargs": {"encoder": encoder_config(planned.model), "strides": SEG_STRIDES,
                        "widths": list(STU_B_WIDTHS), "n_stages": 6},
        "_kw_requires_import": []}
    # everything that describes the preprocessed data is 3d_fullres's: nothing is preprocessed again
    assert {k: v for k, v in cfg.items() if k not in ("patch_size", "batch_size", "architecture")} == \
           {k: v for k, v in base.items() if k not in ("patch_size", "batch_size", "architecture")}
    assert cfg["data_identifier"] == "nnUNetPlans_3d_fullres"
    # the planner put the through-plane axis (3 mm) first; the variant keeps its transpose
    assert source["transpose_forward"] == variant["transpose_forward"] == [0, 1, 2]
    assert cfg["spacing"] == [3.0, 1.5, 1.5]
    # nnU-Net reads its deep-supervision strides from the arch kwargs
    manager = PlansManager(variant).get_configuration(CONFIGURATION)
    assert manager.pool_op_kernel_sizes == SEG_STRIDES and manager.network_arch_init_kwargs["strides"] == SEG_STRIDES
    assert variant["mv3d"] == {**TRAINING_DEFAULTS, "model_dir": str(planned.model.resolve())}
    assert variant["mv3d"]["lr"] == 5e-5 and variant["mv3d"]["epochs"] == 1000 and variant["mv3d"]["iterations"] == 250

    write_plans_variant(run, DATASET, planned.model, patch=(64, 96, 160), batch_size=3, lr=1e-4, init="random",
                        epochs=7, seed=None)
    again = read_plans(run, DATASET)
    assert again["configurations"][CONFIGURATION]["patch_size"] == [64, 96, 160]
    assert again["configurations"][CONFIGURATION]["batch_size"] == 3
    assert {k: again["mv3d"][k] for k in ("lr", "init", "epochs", "seed")} == {"lr": 1e-4, "init": "random",
                                                                              "epochs": 7, "seed": None}


@pytest.mark.nnunet
def test_a_bad_patch_or_setting_is_refused_with_the_fix(nn, planned):
    before = plans_path(planned.run, DATASET).read_bytes()
    with pytest.raises(ConfigError, match="nearest valid patch is 32 64 64"):
        write_plans_variant(planned.run, DATASET, planned.model, patch=(32, 48, 64))
    with pytest.raises(ConfigError, match="nearest valid patch is 128 128 128"):
        write_plans_variant(planned.run, DATASET, planned.model, patch=(120, 130, 128))
    with pytest.raises(ConfigError, match="init must be one of pretrained, random"):
        write_plans_variant(planned.run, DATASET, planned.model, patch=PATCH, init="imagenet")
    with pytest.raises(ConfigError, match=r"unknown mv3d settings \['learning_rate'\]"):
        write_plans_variant(planned.run, DATASET, planned.model, patch=PATCH, learning_rate=1e-3)
    with pytest.raises(ConfigError, match="not a saved mv3d model"):
        write_plans_variant(planned.run, DATASET, planned.root / "nowhere", patch=PATCH)
    with pytest.raises(MissingInputError, match="no Dataset502_<name> folder .* plan and preprocess first"):
        write_plans_variant(planned.run, 502, planned.model, patch=PATCH)
    assert plans_path(planned.run, DATASET).read_bytes() == before  # nothing was rewritten


@pytest.mark.nnunet
def test_plans_whose_first_axis_is_not_the_through_plane_one_are_refused(nn, planned, tmp_path):
    folder = tmp_path / "run" / "nnUNet_preprocessed" / "Dataset501_Tiny"
    folder.mkdir(parents=True)
    plans = read_plans(planned.run, DATASET, "nnUNetPlans")
    plans["configurations"]["3d_fullres"]["spacing"] = [1.5, 3.0, 1.5]  # e.g. a custom planner's choice
    (folder / "nnUNetPlans.json").write_text(json.dumps(plans))
    with pytest.raises(ConfigError, match=r"axis 1 has 3\.0 .* needs the through-plane \(largest-spacing\) axis "
                                          "first"):
        write_plans_variant(tmp_path / "run", DATASET, planned.model, patch=PATCH)


@pytest.mark.nnunet
def test_nnunets_planner_puts_the_slice_axis_first_for_a_slice_first_file(nn, planned, tmp_path, monkeypatch):
    """A volume stored slice-first reads (W, H, D) through SimpleITK; the planner's transpose_forward [2, 0, 1]
    brings D first, and the variant keeps it (the preprocessed data were transposed with it)."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, plan_experiments

    run = tmp_path / "run"
    write_raw_dataset(run / "nnUNet_raw", 502, slice_first=True)
    monkeypatch.setenv("nnUNet_n_proc_DA", "1")
    with nnunet_env(run):
        extract_fingerprints([502], num_processes=1, check_dataset_integrity=False, verbose=False,
                             show_progress_bar=False)
        plan_experiments([502])
    source = read_plans(run, 502, "nnUNetPlans")
    assert source["transpose_forward"] == [2, 0, 1] and source["transpose_backward"] == [1, 2, 0]
    assert source["configurations"]["3d_fullres"]["spacing"] == [3.0, 1.5, 1.5]
    write_plans_variant(run, 502, planned.model, patch=PATCH)
    variant = read_plans(run, 502)
    assert variant["transpose_forward"] == [2, 0, 1] and variant["transpose_backward"] == [1, 2, 0]


# ---------------------------------------------------------------------------------------------- the trainer
@pytest.mark.nnunet
def test_deep_supervision_outputs_match_the_trainers_targets_and_loss(nn, planned):
    from mv3dtk.seg.network import SEG_STRIDES, SegNetwork

    trainer = _trainer(nn, planned, 1, init="random")
    trainer.initialize()
    net = nn.unwrap(trainer.network)
    assert isinstance(net, SegNetwork) and net.widths == SMALL and net.decoder.deep_supervision is True
    scales = trainer._get_deep_supervision_scales()
    assert np.allclose(scales, 1 / np.cumprod(np.array(SEG_STRIDES), axis=0)[:-1]) and len(scales) == 5
    # the targets exactly as the trainer's pipeline makes them (its validation transforms), batched by hand
    transform = trainer.get_validation_transforms(scales)
    segs = [transform(image=torch.zeros(1, *PATCH), segmentation=torch.randint(0, 3, (1, *PATCH)).to(torch.int16))
            ["segmentation"] for _ in range(2)]
    targets = [torch.stack([s[i] for s in segs]) for i in range(len(scales))]  # (B, 1, d, h, w) each
    x = torch.randn(2, 1, *PATCH)  # (B, 1, D, H, W)
    with torch.no_grad():
        out = trainer.network(x)
    assert [tuple(o.shape) for o in out] == [(2, 3, *t.shape[2:]) for t in targets] == [
        (2, 3, 32, 64, 64), (2, 3, 32, 32, 32), (2, 3, 16, 16, 16), (2, 3, 8, 8, 8), (2, 3, 4, 4, 4)]
    # nnU-Net's own train step (its DS loss, AdamW, clipping) runs on them
    assert isinstance(trainer.optimizer, torch.optim.AdamW)
    assert trainer.optimizer.param_groups[0]["lr"] == 5e-5 and trainer.optimizer.param_groups[0]["weight_decay"] == 3e-5
    assert (trainer.num_epochs, trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch) == (2, 2, 1)
    loss = trainer.train_step({"data": x, "target": targets})["loss"]
    assert np.isfinite(loss)


@pytest.mark.nnunet
def test_initialize_loads_the_pretrained_encoder_bit_for_bit_and_random_does_not(nn, planned):
    from mv3dtk.models.medvista3d import load_model

    ref = load_model(planned.model).image.state_dict()
    trainer = _trainer(nn, planned, 2)
    trainer.initialize()
    loaded = nn.unwrap(trainer.network).encoder.state_dict()
    assert set(loaded) == set(ref) and all(torch.equal(loaded[k], ref[k]) for k in ref)
    assert trainer.loaded_encoder_tensors == len(ref)
    info = json.loads((Path(trainer.output_folder) / "mv3d_init.json").read_text())
    assert info == {"init": "pretrained", "model_dir": str(planned.model.resolve()), "encoder_tensors": len(ref)}

    # the exported folder rebuilds the same function without unpickling
    model_out = nn.export_weights(trainer, planned.root / "model-init")
    exported = nn.load_exported(model_out)
    x = torch.randn(1, 1, *PATCH)  # (B, 1, D, H, W)
    trainer.set_deep_supervision_enabled(False)
    trainer.network.eval()
    with torch.no_grad():
        assert torch.equal(exported.network(x), trainer.network(x))
    assert exported.trainer_name == "nnUNetTrainer_mv3d" and exported.mirror_axes is None  # set at train start

    rand = _trainer(nn, planned, 3, init="random")
    rand.initialize()
    fresh = nn.unwrap(rand.network).encoder.state_dict()
    assert not any(torch.equal(fresh[k], ref[k]) for k in ref)
    assert rand.loaded_encoder_tensors == 0
    assert json.loads((Path(rand.output_folder) / "mv3d_init.json").read_text())["init"] == "random"


@pytest.mark.nnunet
def test_initialize_fails_unless_every_encoder_tensor_matches(nn, planned):
    from safetensors.torch import load_file, save_file

    # the network was planned for a UniMiSS with one stage-4 block; the model has two
    trainer = _trainer(nn, planned, 4, encoder={"depths": [1, 1, 1, 1]})
    with pytest.raises(ConfigError, match=r"unexpected \['stages\.3\.blocks\.1\.attn\.kv\.bias'"):
        trainer.initialize()
    # the model's own file lacks a tensor
    broken = shutil.copytree(planned.model, planned.root / "broken")
    state = load_file(str(broken / "model.safetensors"))
    del state["image.stages.1.blocks.0.attn.q.weight"]
    save_file(state, str(broken / "model.safetensors"), metadata={"format": "mv3d", "version": "1"})
    trainer = _trainer(nn, planned, 4, model_dir=str(broken))
    with pytest.raises(ConfigError, match=r"missing \['image\.stages\.1\.blocks\.0\.attn\.q\.weight'\]"):
        trainer.initialize()


@pytest.mark.nnunet
def test_the_trainer_refuses_plans_without_its_section_or_network(nn, planned):
    plans = read_plans(planned.run, DATASET)
    del plans["mv3d"]
    plans["continue_training"] = False
    with nnunet_env(planned.run), pytest.raises(ConfigError, match="no 'mv3d' section.*-p mv3dPlans"):
        nn.nnUNetTrainer_mv3d(plans, CONFIGURATION, 0, {}, torch.device("cpu"))
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    source = PlansManager(read_plans(planned.run, DATASET, "nnUNetPlans"))
    with pytest.raises(ConfigError, match="configuration names dynamic_network_architectures"):
        nn.nnUNetTrainer_mv3d.build_network_architecture(source, source.get_configuration("3d_fullres"), 1, 3)


@pytest.mark.nnunet
def test_train_refuses_a_numeric_fold_on_4_cases_and_a_resume_without_checkpoint(nn, planned, tmp_path):
    folder = tmp_path / "run" / "nnUNet_preprocessed" / "Dataset501_Tiny"
    folder.mkdir(parents=True)
    shutil.copy(plans_path(planned.run, DATASET), folder)
    (folder / "dataset.json").write_text(json.dumps({**json.loads(
        (plans_path(planned.run, DATASET).parent / "dataset.json").read_text()), "numTraining": 4}))
    with pytest.raises(ConfigError, match="pass --fold all"):
        nn.train(tmp_path / "run", DATASET, fold=0)
    with pytest.raises(MissingInputError, match="nothing to resume: no nnU-Net checkpoint .*fold_all"):
        nn.train(tmp_path / "run", DATASET, fold="all", resume=True)


@pytest.mark.nnunet
def test_a_short_training_run_writes_checkpoints_and_a_model_that_predicts_the_same(nn, planned):
    """2 epochs x 2 iterations through the driver (no trainer search), nnU-Net's final validation, the export,
    and a resume of the finished run."""
    import matplotlib

    style = dict(matplotlib.rcParams)
    out = nn.train(planned.run, DATASET, fold=0, device="cpu")
    assert out == nn.output_folder(planned.run, DATASET, 0)
    # nnU-Net's progress plot (seaborn.set) leaves matplotlib's global style as it was: later plots are unchanged
    changed = {k for k in style if k != "backend" and str(matplotlib.rcParams[k]) != str(style[k])}
    assert not changed, f"training changed matplotlib's rcParams: {sorted(changed)[:5]}"
    assert out.name == "fold_0" and out.parent.name == "nnUNetTrainer_mv3d__mv3dPlans__3d_fullres_mv3d"
    for name in ("checkpoint_final.pth", "network_final.safetensors", "network_final.json", "mv3d_init.json"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "validation" / "summary.json").read_text())
    assert set(summary["mean"]) == {"1", "2"}  # nnU-Net's per-class Dice on fold 0's validation case
    assert json.loads((out / "mv3d_init.json").read_text())["encoder_tensors"] > 0

    model = nn.export_weights(out, planned.root / "model")
    assert sorted(p.name for p in model.iterdir()) == sorted(nn.MODEL_FILES)
    exported = nn.load_exported(model)
    assert exported.info["epochs_trained"] == 2 and exported.mirror_axes == (0, 1, 2)
    assert exported.configuration_manager.patch_size == list(PATCH)
    # the exported tensors are the final checkpoint's, bit for bit (nnU-Net's file, read weights-only)
    checkpoint = nn._safe_load(out / "checkpoint_final.pth", torch.device("cpu"))
    assert checkpoint["trainer_name"] == "nnUNetTrainer_mv3d" and checkpoint["current_epoch"] == 2
    weights = checkpoint["network_weights"]
    assert set(weights) == set(exported.state) and all(torch.equal(weights[k], exported.state[k]) for k in weights)
    fresh = nn.nnUNetTrainer_mv3d.build_network_architecture(
        exported.plans_manager, exported.configuration_manager, 1, 3, enable_deep_supervision=False)
    fresh.load_state_dict(weights)
    x = torch.randn(1, 1, *PATCH)  # (B, 1, D, H, W)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), exported.network(x))

    # --resume continues nnU-Net's own training: the finished run loads its checkpoint and has nothing left to do
    init = (out / "mv3d_init.json").read_bytes()
    assert nn.train(planned.run, DATASET, fold=0, resume=True, validate=False) == out
    assert (out / "mv3d_init.json").read_bytes() == init  # the encoder came from the checkpoint, not the model
    logs = sorted(out.glob("training_log_*.txt"))
    assert any("starts from the checkpoint's weights (resumed run)" in p.read_text() for p in logs)


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


@pytest.mark.nnunet
def test_a_checkpoint_with_pickled_code_is_refused_on_resume(nn, tmp_path):
    path = tmp_path / "checkpoint_latest.pth"
    torch.save({"network_weights": {}, "payload": _Payload()}, path)
    with pytest.raises(mv3d_errors.DataError, match=r"weights-only loader \(.*GLOBAL posix\.system.*\); mv3d does not unpickle .*--resume"):
        nn._safe_load(path, torch.device("cpu"))
