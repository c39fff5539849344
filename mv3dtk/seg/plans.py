"""nnU-Net v2 planning for ``mv3d segment-finetune``: its environment pointed into the run, its fingerprint, plans
and preprocessing through its Python API, then the plans variant the UniMiSS encoder needs (issue #19).

A run's nnU-Net roots are ``<run_dir>/nnUNet_raw``, ``<run_dir>/nnUNet_preprocessed`` and
``<run_dir>/nnUNet_results`` (:func:`nnunet_env`).

:func:`plan_and_preprocess` runs nnU-Net's default planner (``ExperimentPlanner``, plans ``nnUNetPlans``) and
preprocesses ``3d_fullres`` only. :func:`write_plans_variant` then writes
``nnUNet_preprocessed/Dataset<ID>_<name>/mv3dPlans.json`` with one configuration, ``3d_fullres_mv3d``:

* a full copy of ``3d_fullres`` (no ``inherits_from``), so its ``data_identifier``, spacing, normalisation and
  resampling stay those of the preprocessed data: nothing is preprocessed again;
* ``patch_size`` and ``batch_size`` (the paper's 128^3 and 2 by default); the patch must be divisible by the
  network's total stride (16, 32, 32), ConfigError naming the nearest valid patch otherwise;
* ``architecture``: ``network_class_name`` ``mv3dtk.seg.network.SegNetwork``, ``arch_kwargs`` ``{"encoder":
  encoder_config(model_dir), "strides": SEG_STRIDES, "widths": STU_B_WIDTHS, "n_stages": 6}`` and
  ``_kw_requires_import`` ``[]``. nnU-Net's ``ConfigurationManager.pool_op_kernel_sizes`` *is*
  ``architecture.arch_kwargs.strides`` (plans_handler.py, 2.8.1), so the deep-supervision targets it derives
  (``1 / cumprod(strides)[:-1]``) have the shapes of the network's outputs;

and, at the top level of the plans, ``"mv3d"``: the trainer's settings (:data:`TRAINING_DEFAULTS`: lr,
weight_decay, epochs, iterations, val_iterations, init, model_dir, seed). nnU-Net builds its trainer from the
plans alone (``__init__(plans, configuration, fold, dataset_json, device)``, and a checkpoint stores those
arguments), so the settings travel with the plans: a resumed run, ``nnUNetv2_train -tr nnUNetTrainer_mv3d -p
mv3dPlans -c 3d_fullres_mv3d`` and the copy nnU-Net keeps in ``nnUNet_results`` all rebuild the same trainer.

Axis order (``transpose_forward``)
----------------------------------
The encoder wants the through-plane axis, the one with the largest spacing, first (its stem steps (1, 2, 2); it
was pretrained on 3 x 1 x 1 mm D x H x W). nnU-Net's planner (``ExperimentPlanner.determine_transpose``, 2.8.1)
sets ``transpose_forward = [argmax(target spacing)] + the other two axes``: the preprocessed data, and every
network input at training and inference, already have the largest-spacing axis first. A CT stored slice-last in
the NIfTI (the usual case) reads as (z, y, x) through SimpleITK and gets ``[0, 1, 2]``; one stored slice-first
gets ``[2, 0, 1]``: either way D comes first. The variant therefore keeps the planner's ``transpose_forward`` /
``transpose_backward`` as they are: the preprocessed arrays were transposed with them, and another transpose in
the variant (which shares their ``data_identifier``) would make inference disagree with training.
:func:`write_plans_variant` checks the invariant (the configuration's spacing is largest on axis 0) and refuses
plans that break it (another planner, hand-edited plans) rather than train on a rotated volume. For isotropic
data the planner's ``argmax`` takes the first array axis: the file's last (k) axis, which is the slice axis of a CT
stored slice-last.

Process counts: ``nnUNet_n_proc_DA`` 0 (no augmentation workers) is for training only; the planner calls
``torch.set_num_threads(get_allowed_n_proc_DA())``, which fails on 0, so planning raises it to 1 while it runs.
nnU-Net uses spawn-context pools: a script that calls these functions needs an ``if __name__ == "__main__":``
guard.

Heavy imports (nnunetv2, torch) stay inside functions: the CLI imports this module lazily, but ``--help`` must
stay light.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DataError, MissingInputError
from ..fs import atomic_write_json, read_json

__all__ = [
    "BASE_CONFIGURATION",
    "CONFIGURATION",
    "NETWORK_CLASS",
    "NNUNET_MISSING",
    "PLANS_NAME",
    "ROOTS",
    "SOURCE_PLANS",
    "TRAINING_DEFAULTS",
    "check_fold",
    "dataset_dir",
    "nnunet_env",
    "plan_and_preprocess",
    "plans_path",
    "read_plans",
    "require_nnunet",
    "training_settings",
    "write_plans_variant",
]

PLANS_NAME = "mv3dPlans"
CONFIGURATION = "3d_fullres_mv3d"
BASE_CONFIGURATION = "3d_fullres"
SOURCE_PLANS = "nnUNetPlans"
NETWORK_CLASS = "mv3dtk.seg.network.SegNetwork"
ROOTS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
NNUNET_MISSING = 'nnU-Net v2 is not installed: pip install "mv3d[seg]"'
N_FOLDS = 5  # nnU-Net's cross-validation split
INITS = ("pretrained", "random")

# The trainer's settings (plans["mv3d"]): the paper's recipe. weight_decay is nnU-Net's default (3e-5, also what
# its own AdamW trainer, nnUNetTrainerAdam, uses); AdamW decouples it, so at lr 5e-5 it barely decays anything.
TRAINING_DEFAULTS: dict[str, Any] = {
    "lr": 5e-5,
    "weight_decay": 3e-5,
    "epochs": 1000,
    "iterations": 250,
    "val_iterations": 50,
    "init": "pretrained",
    "model_dir": None,
    "seed": 0,
}


# ---------------------------------------------------------------------------------------------- environment
def require_nnunet() -> None:
    """ConfigError naming the extra to install unless nnunetv2 imports."""
    try:
        import nnunetv2  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"{NNUNET_MISSING} ({e})") from None


@contextmanager
def nnunet_env(run_dir: str | os.PathLike) -> Iterator[dict[str, Path]]:
    """Point nnU-Net's ``nnUNet_raw`` / ``nnUNet_preprocessed`` / ``nnUNet_results`` into ``run_dir`` (created)
    for the block, restoring the previous values (or their absence) on exit. nnU-Net reads them lazily, at use,
    so this works after nnunetv2 was imported; spawned workers inherit them."""
    run_dir = Path(run_dir).resolve()
    roots = {name: run_dir / name for name in ROOTS}
    old = {name: os.environ.get(name) for name in ROOTS}
    try:
        for name, path in roots.items():
            path.mkdir(parents=True, exist_ok=True)
            os.environ[name] = str(path)
        yield roots
    finally:
        for name, value in old.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextmanager
def _env_defaults(values: Mapping[str, str], *, force: Mapping[str, str] | None = None) -> Iterator[None]:
    """Set ``values`` where the user has not, and ``force`` always, restoring the environment on exit."""
    force = force or {}
    names = set(values) | set(force)
    old = {name: os.environ.get(name) for name in names}
    try:
        for name, value in values.items():
            os.environ.setdefault(name, value)
        os.environ.update(force)
        yield
    finally:
        for name, value in old.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _planning_processes() -> Any:
    """nnUNet_n_proc_DA >= 1 while planning (the planner sets torch's thread count from it; 0 crashes)."""
    current = os.environ.get("nnUNet_n_proc_DA")
    force = {"nnUNet_n_proc_DA": "1"} if current is not None and current.strip() in ("0", "") else {}
    return _env_defaults({"nnUNet_n_proc_DA": "1", "nnUNet_def_n_proc": "1"}, force=force)


# ---------------------------------------------------------------------------------------------- folders
def dataset_dir(run_dir: str | os.PathLike, dataset_id: int, root: str = "nnUNet_preprocessed") -> Path:
    """``<run_dir>/<root>/Dataset<ID>_<name>``: MissingInputError if there is none, ConfigError if several."""
    base = Path(run_dir) / root
    found = sorted(p for p in base.glob(f"Dataset{int(dataset_id):03d}_*") if p.is_dir())
    if not found:
        step = "export the dataset first" if root == "nnUNet_raw" else "plan and preprocess first"
        raise MissingInputError(f"no Dataset{int(dataset_id):03d}_<name> folder in {base}: {step}")
    if len(found) > 1:
        raise ConfigError(f"several datasets with id {int(dataset_id)} in {base} ({', '.join(p.name for p in found)}):"
                          " remove the stale ones or pick another --dataset-id")
    return found[0]


def plans_path(run_dir: str | os.PathLike, dataset_id: int, plans_name: str = PLANS_NAME) -> Path:
    return dataset_dir(run_dir, dataset_id) / f"{plans_name}.json"


def read_plans(run_dir: str | os.PathLike, dataset_id: int, plans_name: str = PLANS_NAME) -> dict[str, Any]:
    path = plans_path(run_dir, dataset_id, plans_name)
    if not path.is_file():
        step = "plan and preprocess first" if plans_name == SOURCE_PLANS else "write the plans variant first"
        raise MissingInputError(f"no {path.name} in {path.parent}: {step} (mv3dtk.seg.plans)")
    try:
        plans = read_json(path)
    except ValueError as e:
        raise DataError(f"{path} is not valid JSON ({e}): plan again") from None
    if not isinstance(plans, dict) or not isinstance(plans.get("configurations"), dict):
        raise DataError(f"{path} has no 'configurations': it is not nnU-Net plans; plan again")
    return plans


# ---------------------------------------------------------------------------------------------- planning
def plan_and_preprocess(run_dir: str | os.PathLike, dataset_id: int, *, num_processes: int = 1,
                        verify: bool = True) -> Path:
    """nnU-Net's fingerprint (with its dataset integrity check when ``verify``), its default plans
    (``nnUNetPlans``) and the preprocessing of ``3d_fullres`` only, for ``<run_dir>/nnUNet_raw/Dataset<ID>_*``,
    through nnU-Net's Python API with its environment pointed into the run. Returns the plans file.

    DataError when nnU-Net rejects the dataset or plans no 3D configuration (a 2D dataset)."""
    require_nnunet()
    raw = dataset_dir(run_dir, dataset_id, "nnUNet_raw")
    if num_processes < 1:
        raise ConfigError(f"num_processes must be at least 1, not {num_processes}")
    with nnunet_env(run_dir), _planning_processes():
        from nnunetv2.experiment_planning.plan_and_preprocess_api import (extract_fingerprints, plan_experiments,
                                                                          preprocess)
        try:
            extract_fingerprints([int(dataset_id)], num_processes=num_processes, check_dataset_integrity=verify,
                                 clean=True, verbose=False, show_progress_bar=False)
        except (AssertionError, RuntimeError, ValueError) as e:
            raise DataError(f"nnU-Net rejected the dataset {raw}: {e or type(e).__name__}; fix the export and "
                            "plan again") from e
        plans_name = plan_experiments([int(dataset_id)])
        plans = read_plans(run_dir, dataset_id, plans_name)
        if BASE_CONFIGURATION not in plans["configurations"]:
            raise DataError(f"nnU-Net planned no {BASE_CONFIGURATION} configuration for {raw} (its median image "
                            "has one slice): segment-finetune needs 3D volumes")
        preprocess([int(dataset_id)], plans_name, configurations=(BASE_CONFIGURATION,),
                   num_processes=(num_processes,), verbose=False, show_progress_bar=False)
    return plans_path(run_dir, dataset_id, plans_name)


# ---------------------------------------------------------------------------------------------- the variant
def check_fold(n_cases: int, fold: int | str) -> int | str:
    """The fold nnU-Net gets: ``"all"`` or 0-4. ConfigError for anything else, and for a numeric fold when the
    dataset has fewer than 5 cases (nnU-Net's 5-fold split cannot be made), suggesting ``--fold all``."""
    if str(fold).strip().lower() == "all":
        return "all"
    try:
        value = int(str(fold).strip())
    except ValueError:
        raise ConfigError(f"fold must be 0-{N_FOLDS - 1} or 'all', not {fold!r}") from None
    if not 0 <= value < N_FOLDS:
        raise ConfigError(f"fold must be 0-{N_FOLDS - 1} (nnU-Net's {N_FOLDS}-fold split) or 'all', not {value}")
    if n_cases < N_FOLDS:
        raise ConfigError(f"fold {value} needs nnU-Net's {N_FOLDS}-fold split, which needs at least {N_FOLDS} "
                          f"training cases, and the dataset has {n_cases}: pass --fold all (train and validate on "
                          "every case) or add cases")
    return value


def training_settings(plans: Mapping[str, Any], where: str = "the plans") -> dict[str, Any]:
    """``plans["mv3d"]`` checked and completed with :data:`TRAINING_DEFAULTS`. ConfigError if it is missing or
    holds a bad value."""
    raw = plans.get("mv3d")
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where} have no 'mv3d' section: nnUNetTrainer_mv3d trains only with the plans variant "
                          f"(mv3dtk.seg.plans.write_plans_variant; -p {PLANS_NAME} -c {CONFIGURATION})")
    unknown = sorted(set(raw) - set(TRAINING_DEFAULTS))
    if unknown:
        raise ConfigError(f"{where}: unknown mv3d settings {unknown} (known: {sorted(TRAINING_DEFAULTS)})")
    s = {**TRAINING_DEFAULTS, **raw}
    try:
        s["lr"], s["weight_decay"] = float(s["lr"]), float(s["weight_decay"])
        for key in ("epochs", "iterations", "val_iterations"):
            s[key] = int(s[key])
        s["seed"] = None if s["seed"] is None else int(s["seed"])
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: bad mv3d setting ({e})") from None
    if not (math.isfinite(s["lr"]) and s["lr"] > 0) or not (math.isfinite(s["weight_decay"])
                                                             and s["weight_decay"] >= 0):
        raise ConfigError(f"{where}: lr must be > 0 and weight_decay >= 0 (got {s['lr']}, {s['weight_decay']})")
    if min(s["epochs"], s["iterations"], s["val_iterations"]) < 1:
        raise ConfigError(f"{where}: epochs, iterations and val_iterations must be at least 1")
    if s["init"] not in INITS:
        raise ConfigError(f"{where}: init must be one of {', '.join(INITS)}, not {s['init']!r}")
    if s["init"] == "pretrained" and not s["model_dir"]:
        raise ConfigError(f"{where}: init 'pretrained' needs the model_dir of a saved UniMiSS mv3d model")
    return s


def _check_axis_order(plans: Mapping[str, Any], config: Mapping[str, Any], path: Path) -> None:
    """The largest spacing must be on axis 0 (see the module docstring)."""
    spacing = [float(v) for v in config.get("spacing", [])]
    forward = list(plans.get("transpose_forward", [0, 1, 2]))
    if len(spacing) != 3 or sorted(forward) != [0, 1, 2]:
        raise DataError(f"{path}: {BASE_CONFIGURATION} has spacing {spacing} and transpose_forward {forward}; "
                        "expected three axes: plan again")
    if spacing[0] < max(spacing) - 1e-6:
        raise ConfigError(
            f"{path}: the network input's first axis has spacing {spacing[0]} but axis "
            f"{spacing.index(max(spacing))} has {max(spacing)} (transpose_forward {forward}); the UniMiSS encoder "
            "needs the through-plane (largest-spacing) axis first. Plan with nnU-Net's default ExperimentPlanner "
            "(mv3dtk.seg.plans.plan_and_preprocess), which puts it first")


def write_plans_variant(run_dir: str | os.PathLike, dataset_id: int, model_dir: str | os.PathLike, *,
                        patch: Sequence[int] = (128, 128, 128), batch_size: int = 2,
                        widths: Sequence[int] | None = None, **training: Any) -> tuple[str, str]:
    """Write ``mv3dPlans.json`` next to ``nnUNetPlans.json`` (see the module docstring) and return
    ``(plans_name, configuration)`` = ``("mv3dPlans", "3d_fullres_mv3d")``.

    ``training`` overrides :data:`TRAINING_DEFAULTS` (lr, weight_decay, epochs, iterations, val_iterations, init,
    seed); ``model_dir`` is always the given one, made absolute. ``widths`` (default STU-Net-B's) exists for
    small test networks. ConfigError for a bad patch (naming the nearest valid one), a non-UniMiSS model, a bad
    setting or plans whose axis order the encoder cannot take."""
    from .network import SEG_STRIDES, STU_B_WIDTHS, check_patch_size, encoder_config

    patch = tuple(int(v) for v in patch)
    check_patch_size(patch)
    if int(batch_size) < 1:
        raise ConfigError(f"batch size must be at least 1, not {batch_size}")
    encoder = encoder_config(model_dir)  # ConfigError for a ViT or a missing model
    source = plans_path(run_dir, dataset_id, SOURCE_PLANS)
    plans = read_plans(run_dir, dataset_id, SOURCE_PLANS)
    base = plans["configurations"].get(BASE_CONFIGURATION)
    if not isinstance(base, dict):
        raise DataError(f"{source} has no {BASE_CONFIGURATION} configuration (a 2D dataset?): segment-finetune "
                        "needs 3D volumes; plan again")
    if "inherits_from" in base:
        raise DataError(f"{source}: {BASE_CONFIGURATION} inherits from {base['inherits_from']!r}, which nnU-Net's "
                        "planner never writes: plan again")
    _check_axis_order(plans, base, source)
    settings = training_settings({"mv3d": {**training, "model_dir": str(Path(model_dir).resolve())}},
                                 "write_plans_variant")

    config = copy.deepcopy(base)  # data_identifier, spacing, normalisation, resampling: the preprocessed data's
    config["patch_size"] = list(patch)
    config["batch_size"] = int(batch_size)
    config["architecture"] = {
        "network_class_name": NETWORK_CLASS,
        "arch_kwargs": {"encoder": encoder, "strides": [list(s) for s in SEG_STRIDES],
                        "widths": [int(w) for w in (STU_B_WIDTHS if widths is None else widths)], "n_stages": 6},
        "_kw_requires_import": [],
    }
    variant = copy.deepcopy(plans)
    variant["plans_name"] = PLANS_NAME
    variant["configurations"] = {CONFIGURATION: config}
    variant["mv3d"] = settings
    atomic_write_json(source.with_name(f"{PLANS_NAME}.json"), variant)
    return PLANS_NAME, CONFIGURATION
