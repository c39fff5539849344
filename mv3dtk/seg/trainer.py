"""``nnUNetTrainer_mv3d``: nnU-Net v2's trainer with the MedVista3D-UniMiSS + STU-Net-B network (issue #19).

What it changes in ``nnUNetTrainer`` (nnunetv2 2.8.1):

* ``build_network_architecture`` (static, the 2.7+ signature ``(plans_manager, configuration_manager,
  num_input_channels, num_output_channels, enable_deep_supervision=True)``): ``mv3dtk.seg.network.build_network``
  on ``configuration_manager.network_arch_init_kwargs`` (the plans' ``architecture.arch_kwargs``). nnU-Net calls
  it for training and, with ``enable_deep_supervision=False`` by keyword, for inference.
* Its settings come from ``plans["mv3d"]`` (:func:`mv3dtk.seg.plans.training_settings`): nnU-Net constructs a
  trainer from ``(plans, configuration, fold, dataset_json, device)`` alone, and stores exactly those in its
  checkpoints, so a resume or ``nnUNetv2_train`` rebuilds the same trainer. ``initial_lr`` = lr (5e-5),
  ``weight_decay`` (3e-5), ``num_epochs`` (1000), ``num_iterations_per_epoch`` (250),
  ``num_val_iterations_per_epoch`` (50).
* ``configure_optimizers``: AdamW (``torch.optim.AdamW``, decoupled weight decay) with nnU-Net's
  ``PolyLRScheduler`` (exponent 0.9, stepped per epoch).
* ``initialize``: nnU-Net's, then on a fresh run with init ``pretrained`` the encoder tensors of the saved mv3d
  model are copied in (:func:`mv3dtk.seg.network.load_encoder_weights`: strict, ConfigError unless every tensor
  matched) and the count is logged and written to ``<fold>/mv3d_init.json``. A resumed run (continue_training
  with a checkpoint present) takes every weight from the checkpoint. With init ``random`` nothing is loaded.
* ``load_checkpoint``: nnU-Net's, but the file is read with ``torch.load(weights_only=True)`` (the restricted
  unpickler, numpy scalars allowed for nnU-Net's logging): resuming never runs pickled code. nnU-Net writes its
  ``checkpoint_*.pth`` files itself (``torch.save``): they are its own resume format and stay as they are.
* ``on_train_end``: nnU-Net's (``checkpoint_final.pth``), plus ``network_final.safetensors`` and
  ``network_final.json`` (trainer, configuration, fold, mirroring axes), from which :func:`export_weights` builds
  the model folder that prediction loads without unpickling.

:func:`train` drives it through the Python API (never nnU-Net's trainer search, which imports torchvision, broken
beside a CPU torch). On a GPU box the class can also be found by ``nnUNetv2_train`` through ``nnUNet_extTrainer`` pointed at
:mod:`mv3dtk.seg.nnunet_ext`.

This module imports nnunetv2 (the class subclasses its trainer): import it only where nnU-Net is wanted; a missing
nnunetv2 raises the ConfigError that names the extra.
"""

from __future__ import annotations

import importlib
import os
import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from .plans import require_nnunet

require_nnunet()

import numpy as np  # noqa: E402
import torch  # noqa: E402
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler  # noqa: E402
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer  # noqa: E402
from torch import nn  # noqa: E402

from ..errors import ConfigError, DataError, MissingInputError  # noqa: E402
from ..fs import atomic_path, atomic_write_json, read_json  # noqa: E402
from .network import build_network, load_encoder_weights  # noqa: E402
from .plans import (CONFIGURATION, NETWORK_CLASS, PLANS_NAME, check_fold, dataset_dir, nnunet_env,  # noqa: E402
                    read_plans, training_settings)

# nnU-Net's trainer module: it holds its own copy of nnUNet_def_n_proc, read at import (see _worker_counts)
_nnunet_trainer_module = importlib.import_module(nnUNetTrainer.__module__)

__all__ = ["CHECKPOINTS", "FINAL_WEIGHTS", "MODEL_FILES", "export_weights", "load_exported", "nnUNetTrainer_mv3d",
           "output_folder", "train", "unwrap"]

CHECKPOINTS = ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth")  # nnU-Net's resume order
FINAL_WEIGHTS = "network_final.safetensors"
FINAL_INFO = "network_final.json"
INIT_INFO = "mv3d_init.json"
MODEL_FILES = ("network.safetensors", "plans.json", "dataset.json", "nnunet.json")
FORMAT = "mv3d-seg"


def unwrap(network: nn.Module) -> nn.Module:
    """The bare network under nnU-Net's DDP and ``torch.compile`` wrappers (as its ``save_checkpoint`` does)."""
    from torch._dynamo import OptimizedModule
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(network, DistributedDataParallel):
        network = network.module
    if isinstance(network, OptimizedModule):
        network = network._orig_mod
    return network


def _plain_state(network: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in unwrap(network).state_dict().items()}


def _safe_load(path: str | os.PathLike, device: torch.device) -> dict[str, Any]:
    """nnU-Net's checkpoint through the restricted unpickler (tensors, containers, numpy scalars, torch.device)."""
    try:
        from numpy._core.multiarray import _reconstruct, scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct, scalar  # type: ignore[no-redef]
    kinds = (np.float16, np.float32, np.float64, np.int8, np.int16, np.int32, np.int64, np.uint8, np.bool_)
    allowed = [np.dtype, np.ndarray, scalar, _reconstruct, *{type(np.dtype(k)) for k in kinds}]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(str(path), map_location=device, weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, EOFError ...
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        why = next((line for line in lines if "GLOBAL" in line or "Unsupported" in line), lines[0])
        raise DataError(f"cannot read the checkpoint {path} with torch's weights-only loader ({why}); mv3d does not "
                        "unpickle arbitrary objects: start a new run instead of --resume") from None


def _keeping_matplotlib_style(plot):
    """nnU-Net's progress plot calls ``seaborn.set()``, which rewrites matplotlib's global rcParams (grey
    background, seaborn's colour cycle) for the rest of the process: every later plot of the process (mv3d's ROC
    curves, a notebook's figures) would change. Run it inside ``matplotlib.rc_context()``, which restores them."""
    def plot_progress_png(*args, **kwargs):
        import matplotlib

        with matplotlib.rc_context():
            return plot(*args, **kwargs)

    return plot_progress_png


# ---------------------------------------------------------------------------------------------- the trainer
class nnUNetTrainer_mv3d(nnUNetTrainer):  # noqa: N801 - nnU-Net's naming convention for trainer variants
    """nnU-Net's trainer for :class:`mv3dtk.seg.network.SegNetwork` (see the module docstring)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        # nnU-Net records its __init__ arguments by these exact names: keep the signature as it is
        self.mv3d = training_settings(plans)
        self._continuing = bool(plans.get("continue_training", False))
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = self.mv3d["lr"]
        self.weight_decay = self.mv3d["weight_decay"]
        self.num_epochs = self.mv3d["epochs"]
        self.num_iterations_per_epoch = self.mv3d["iterations"]
        self.num_val_iterations_per_epoch = self.mv3d["val_iterations"]
        self.loaded_encoder_tensors = 0
        self.logger.plot_progress_png = _keeping_matplotlib_style(self.logger.plot_progress_png)

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
        name = configuration_manager.network_arch_class_name
        if name != NETWORK_CLASS:
            raise ConfigError(f"nnUNetTrainer_mv3d builds {NETWORK_CLASS}, but the configuration names {name}: train "
                              f"with -p {PLANS_NAME} -c {CONFIGURATION} (mv3dtk.seg.plans.write_plans_variant)")
        return build_network(configuration_manager.network_arch_init_kwargs, num_input_channels,
                             num_output_channels, enable_deep_supervision=enable_deep_supervision)

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.network.parameters(), lr=self.initial_lr, weight_decay=self.weight_decay)
        return optimizer, PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs)

    def _resuming(self) -> bool:
        return self._continuing and any(os.path.isfile(os.path.join(self.output_folder, c)) for c in CHECKPOINTS)

    def initialize(self):
        if not self.was_initialized and self.mv3d["seed"] is not None:
            seed = self.mv3d["seed"]
            random.seed(seed)
            np.random.seed(seed)
            torch.manual_seed(seed)
        super().initialize()
        init, model_dir = self.mv3d["init"], self.mv3d["model_dir"]
        if self._resuming():
            what = "the checkpoint's weights (resumed run)"
        elif init == "pretrained":
            self.loaded_encoder_tensors = load_encoder_weights(unwrap(self.network), model_dir)
            what = f"{self.loaded_encoder_tensors} pretrained encoder tensors from {model_dir}"
        else:
            what = "a randomly initialised encoder (init random)"
        self.print_to_log_file(f"mv3d: the network starts from {what}")
        if self.local_rank == 0 and not self._resuming():
            atomic_write_json(Path(self.output_folder) / INIT_INFO,
                              {"init": init, "model_dir": model_dir, "encoder_tensors": self.loaded_encoder_tensors})

    def load_checkpoint(self, filename_or_checkpoint: dict | str) -> None:
        """nnU-Net's ``load_checkpoint`` (2.8.1) with the file read weights-only (see the module docstring)."""
        if not self.was_initialized:
            self.initialize()
        checkpoint = filename_or_checkpoint
        if not isinstance(checkpoint, dict):
            checkpoint = _safe_load(checkpoint, self.device)
        network = unwrap(self.network)
        own = network.state_dict()
        weights = {k[7:] if k not in own and k.startswith("module.") else k: v
                   for k, v in checkpoint["network_weights"].items()}
        self.my_init_kwargs = checkpoint["init_args"]
        self.current_epoch = checkpoint["current_epoch"]
        self.logger.load_checkpoint(checkpoint["logging"])
        self._best_ema = checkpoint["_best_ema"]
        self.inference_allowed_mirroring_axes = checkpoint.get("inference_allowed_mirroring_axes",
                                                               self.inference_allowed_mirroring_axes)
        network.load_state_dict(weights)
        self.optimizer.load_state_dict(checkpoint["optimizer_state"])
        if self.grad_scaler is not None and checkpoint.get("grad_scaler_state") is not None:
            self.grad_scaler.load_state_dict(checkpoint["grad_scaler_state"])

    def inference_info(self) -> dict[str, Any]:
        axes = self.inference_allowed_mirroring_axes
        return {"format": FORMAT, "version": 1, "trainer_name": type(self).__name__,
                "plans_name": self.plans_manager.plans_name, "configuration": self.configuration_name,
                "fold": self.fold, "epochs_trained": int(self.current_epoch),
                "inference_allowed_mirroring_axes": None if axes is None else [int(a) for a in axes],
                "num_input_channels": self.num_input_channels,
                "num_output_channels": self.label_manager.num_segmentation_heads}

    def on_train_end(self):
        super().on_train_end()
        if self.local_rank == 0 and not self.disable_checkpointing:
            from safetensors.torch import save_file

            folder = Path(self.output_folder)
            with atomic_path(folder / FINAL_WEIGHTS) as tmp:
                save_file(_plain_state(self.network), str(tmp), metadata={"format": FORMAT, "version": "1"})
            atomic_write_json(folder / FINAL_INFO, self.inference_info())


# ---------------------------------------------------------------------------------------------- the driver
def output_folder(run_dir: str | os.PathLike, dataset_id: int, fold: int | str) -> Path:
    """``<run_dir>/nnUNet_results/Dataset<ID>_<name>/nnUNetTrainer_mv3d__mv3dPlans__3d_fullres_mv3d/fold_<fold>``."""
    name = dataset_dir(run_dir, dataset_id).name
    return (Path(run_dir).resolve() / "nnUNet_results" / name /
            f"{nnUNetTrainer_mv3d.__name__}__{PLANS_NAME}__{CONFIGURATION}" / f"fold_{fold}")


def _device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {device!r}: use cuda or cpu") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda, but torch sees no CUDA GPU: pass --device cpu")
        if dev.index not in (None, 0):
            raise ConfigError(f"nnU-Net trains on the first visible GPU only; instead of --device {device}, select "
                              f"it with CUDA_VISIBLE_DEVICES={dev.index} and pass --device cuda")
    elif dev.type != "cpu":
        raise ConfigError(f"nnU-Net trains on cuda or cpu, not {device!r}")
    return dev


@contextmanager
def _worker_counts(device: torch.device) -> Iterator[None]:
    """On CPU: no augmentation workers (nnUNet_n_proc_DA=0) and one export/evaluation process
    (nnUNet_def_n_proc=1) unless the user set them. nnU-Net reads nnUNet_def_n_proc once, at import, into its
    trainer module, so that module's copy is set for the block as well."""
    from unittest import mock

    names = ("nnUNet_n_proc_DA", "nnUNet_def_n_proc")
    old = {n: os.environ.get(n) for n in names}
    try:
        if device.type == "cpu":
            os.environ.setdefault("nnUNet_n_proc_DA", "0")
            os.environ.setdefault("nnUNet_def_n_proc", "1")
        n_proc = os.environ.get("nnUNet_def_n_proc")
        n_proc = _nnunet_trainer_module.default_num_processes if n_proc is None else max(1, int(n_proc))
        with mock.patch.object(_nnunet_trainer_module, "default_num_processes", n_proc):
            yield
    finally:
        for n, v in old.items():
            if v is None:
                os.environ.pop(n, None)
            else:
                os.environ[n] = v


def train(run_dir: str | os.PathLike, dataset_id: int, *, fold: int | str, device: str | torch.device = "cpu",
          resume: bool = False, validate: bool = True) -> Path:
    """Train ``nnUNetTrainer_mv3d`` on the run's ``mv3dPlans`` / ``3d_fullres_mv3d`` through nnU-Net's Python API
    (no trainer search), then (``validate``) nnU-Net's final validation of the fold (``validation/summary.json``).
    Returns the fold's output folder.

    ``resume`` continues nnU-Net's own training from its latest checkpoint (final, latest, then best, as
    ``nnUNetv2_train --c``), read weights-only, with the plans the run started with (nnU-Net's copy in the
    results folder); MissingInputError if the run has no checkpoint. The settings are the plans'
    (``plans["mv3d"]``). Call from a script with an ``if __name__ == "__main__":`` guard: nnU-Net's final
    validation uses a spawn-context process pool."""
    dev = _device(device)
    with nnunet_env(run_dir), _worker_counts(dev):
        plans = read_plans(run_dir, dataset_id)
        json_path = dataset_dir(run_dir, dataset_id) / "dataset.json"
        if not json_path.is_file():
            raise MissingInputError(f"no dataset.json in {json_path.parent}: plan and preprocess first")
        dataset_json = read_json(json_path)
        fold = check_fold(int(dataset_json.get("numTraining", 0)), fold)
        folder = output_folder(run_dir, dataset_id, fold)
        checkpoint = next((folder / c for c in CHECKPOINTS if (folder / c).is_file()), None) if resume else None
        if resume and checkpoint is None:
            raise MissingInputError(f"nothing to resume: no nnU-Net checkpoint in {folder}; run without --resume")
        if resume and (folder.parent / "plans.json").is_file():
            plans = read_json(folder.parent / "plans.json")  # the plans the run started with (nnU-Net's copy)
        plans["continue_training"] = bool(resume)
        if dev.type == "cuda":
            torch.backends.cudnn.benchmark = True  # as nnU-Net's run_training
        trainer = nnUNetTrainer_mv3d(plans=plans, configuration=CONFIGURATION, fold=fold, dataset_json=dataset_json,
                                     device=dev)
        if checkpoint is not None:
            trainer.load_checkpoint(str(checkpoint))
        trainer.run_training()
        if validate:
            trainer.perform_actual_validation(False)
    return Path(trainer.output_folder)


# ---------------------------------------------------------------------------------------------- the model folder
def export_weights(source: nnUNetTrainer_mv3d | str | os.PathLike, model_out: str | os.PathLike) -> Path:
    """Write the model folder prediction loads without unpickling: ``network.safetensors`` (the network's state
    dict, plain tensors), ``plans.json``, ``dataset.json`` and ``nnunet.json`` (trainer, plans, configuration,
    fold, mirroring axes, epochs trained), atomically (a folder renamed into place).

    ``source`` is a trainer (its network as it is now) or a finished run's fold folder (its
    ``network_final.safetensors``; MissingInputError while training has not finished)."""
    from safetensors.torch import load_file, save_file

    if isinstance(source, nnUNetTrainer):
        if source.network is None:
            raise MissingInputError("the trainer has no network yet: call initialize() or train first")
        state, info = _plain_state(source.network), source.inference_info()
        plans, dataset_json = source.plans_manager.plans, source.dataset_json
    else:
        fold_dir = Path(source)
        weights = fold_dir / FINAL_WEIGHTS
        if not weights.is_file() or not (fold_dir / FINAL_INFO).is_file():
            raise MissingInputError(f"no {FINAL_WEIGHTS} in {fold_dir}: the training has not finished; continue it "
                                    "with --resume")
        state, info = load_file(str(weights)), read_json(fold_dir / FINAL_INFO)
        plans, dataset_json = read_json(fold_dir.parent / "plans.json"), read_json(fold_dir.parent / "dataset.json")
    with atomic_path(model_out) as tmp:
        tmp.mkdir(parents=True)
        save_file(state, str(tmp / MODEL_FILES[0]), metadata={"format": FORMAT, "version": "1"})
        for name, obj in zip(MODEL_FILES[1:], (plans, dataset_json, info)):
            atomic_write_json(tmp / name, obj, fsync=False)
    return Path(model_out)


def load_exported(model_dir: str | os.PathLike, device: str | torch.device = "cpu") -> SimpleNamespace:
    """The model folder of :func:`export_weights`, read without unpickling: ``network`` (built by the trainer's
    ``build_network_architecture`` without deep supervision, weights loaded, in eval mode), ``state`` (its
    tensors), ``plans_manager``, ``configuration_manager``, ``dataset_json``, ``trainer_name``, ``mirror_axes``
    and ``info``: what ``nnUNetPredictor.manual_initialization`` takes."""
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    missing = [n for n in MODEL_FILES if not (model_dir / n).is_file()]
    if missing:
        raise MissingInputError(f"{model_dir} is not a segmentation model folder (missing {', '.join(missing)}): "
                                "point at segment/<run>/model")
    info = read_json(model_dir / "nnunet.json")
    if info.get("format") != FORMAT:
        raise DataError(f"{model_dir / 'nnunet.json'} is not an mv3d segmentation model ({info.get('format')!r})")
    plans_manager = PlansManager(read_json(model_dir / "plans.json"))
    configuration_manager = plans_manager.get_configuration(info["configuration"])
    dataset_json = read_json(model_dir / "dataset.json")
    n_in = determine_num_input_channels(plans_manager, configuration_manager, dataset_json)
    n_out = plans_manager.get_label_manager(dataset_json).num_segmentation_heads
    network = nnUNetTrainer_mv3d.build_network_architecture(plans_manager, configuration_manager, n_in, n_out,
                                                            enable_deep_supervision=False)
    state = load_file(str(model_dir / MODEL_FILES[0]), device=str(torch.device(device)))
    network.load_state_dict(state)
    network.to(device).eval()
    axes = info.get("inference_allowed_mirroring_axes")
    return SimpleNamespace(network=network, state=state, plans_manager=plans_manager,
                           configuration_manager=configuration_manager, dataset_json=dataset_json,
                           trainer_name=info["trainer_name"], mirror_axes=None if axes is None else tuple(axes),
                           info=info)
