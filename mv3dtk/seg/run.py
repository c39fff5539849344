"""``mv3d segment-finetune`` as a library function: export -> plan -> plans variant -> train -> model -> metrics.

``run_segment_finetune(project_root, run_dir, opts, log)`` does, inside ``segment/<run>/``:

1. **Export** the labelled dataset into ``nnUNet_raw/Dataset<ID>_<name>/`` (:func:`mv3dtk.seg.export.export_dataset`).
2. **Plan and preprocess** with nnU-Net's Python API (``nnUNet_preprocessed/``), then write the ``mv3dPlans``
   variant (the paper's patch, batch and training settings, the encoder's strides).
3. **Split.** nnU-Net's own 5-fold split, except where cases share a patient (CT-RATE's reconstructions, several
   scans of one patient): then the folds are drawn over patients (``splits_final.json``, which nnU-Net reads), so
   that no patient is both trained on and validated on.
4. **Train** ``nnUNetTrainer_mv3d`` on the fold (``nnUNet_results/``); ``--resume`` continues nnU-Net's own
   checkpoint.
5. **Model**: ``model/`` (``network.safetensors``, plans, ``dataset.json``): what ``segment-predict`` loads.
6. **Metrics**: the fold's validation cases are segmented from ``model/`` by the same code as ``segment-predict``
   (``validation/<case>.nii.gz``) and scored per class against their exported label maps: ``metrics.json``,
   ``per_class.csv``, ``per_case.csv``.

``run.json`` records the settings, so a ``--resume`` continues with the dataset id and fold the run started with.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, DataError, MissingInputError
from ..fs import atomic_write_json, read_json
from .options import SegmentOptions

__all__ = ["grouped_splits", "patient_of", "read_label_file", "run_segment_finetune", "validation_cases"]

RUN_RECORD = "run.json"
_CTRATE = re.compile(r"^((?:train|valid)_\d+)_[a-z]+_\d+$")


def read_label_file(path: str | Path | None) -> list[str] | None:
    """``--labels FILE``: one structure per line (blank lines and ``#`` comments ignored), in merge order."""
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        raise MissingInputError(f"--labels {p}: no such file; give a text file with one structure name per line")
    names = [line.split("#", 1)[0].strip() for line in p.read_text(encoding="utf-8").splitlines()]
    names = [n for n in names if n]
    if not names:
        raise ConfigError(f"--labels {p} names no structure; write one structure name per line, in merge order")
    return names


def patient_of(case: str) -> str:
    """The patient a case belongs to: ``train_12`` for CT-RATE's ``train_12_a_2``; otherwise the case itself."""
    m = _CTRATE.match(case)
    return m.group(1) if m else case


def grouped_splits(cases: list[str], n_folds: int = 5, seed: int = 12345) -> list[dict[str, list[str]]] | None:
    """nnU-Net's ``splits_final.json`` content with every patient's cases in one fold, or None when every case is
    its own patient (nnU-Net's default split is then kept). Patients are shuffled (``seed``, nnU-Net's) and dealt
    to the fold with the fewest cases so far, largest patients first."""
    groups: dict[str, list[str]] = {}
    for c in sorted(cases):
        groups.setdefault(patient_of(c), []).append(c)
    if all(len(v) == 1 for v in groups.values()):
        return None
    if len(groups) < n_folds:
        raise ConfigError(f"the {len(cases)} cases come from {len(groups)} patients, fewer than nnU-Net's {n_folds} "
                          "folds: pass --fold all, or add patients")
    order = sorted(groups)
    np.random.default_rng(seed).shuffle(order)
    order.sort(key=lambda g: -len(groups[g]))  # stable: shuffled within equal sizes
    folds: list[list[str]] = [[] for _ in range(n_folds)]
    for g in order:
        min(folds, key=len).extend(groups[g])
    return [{"train": sorted(c for j, f in enumerate(folds) if j != i for c in f), "val": sorted(folds[i])}
            for i in range(n_folds)]


def validation_cases(run_dir: Path, dataset_id: int, fold: int | str, cases: list[str]) -> list[str]:
    """The fold's validation cases, as nnU-Net used them (``splits_final.json``); every case for fold ``all``."""
    from .plans import dataset_dir

    if fold == "all":
        return sorted(cases)
    splits_file = dataset_dir(run_dir, dataset_id) / "splits_final.json"
    if not splits_file.is_file():
        raise MissingInputError(f"no {splits_file}: nnU-Net writes it when training starts; rerun with --resume")
    return sorted(read_json(splits_file)[int(fold)]["val"])


def _prepare(run_dir: Path, model_dir: Path, opts: SegmentOptions, log: logging.Logger) -> dict[str, Any]:
    """Steps 1-3 for a fresh run; returns the run record."""
    from .export import export_dataset
    from .plans import N_FOLDS, check_fold, dataset_dir, plan_and_preprocess, write_plans_variant

    if opts.data is None:
        raise ConfigError("--data is needed for a new run: the labelled dataset (TotalSegmentator or CT-RATE / "
                          "RadGenome layout)")
    if any((run_dir / "nnUNet_results").rglob("checkpoint_*.pth")):  # an attempt without one simply starts over
        raise ConfigError(f"{run_dir} already holds a training run with checkpoints: continue it with --resume, or "
                          "pass a new --run")
    labels = read_label_file(opts.labels)
    check_fold(N_FOLDS, opts.fold)  # its spelling, before the export (the case count is checked after it)
    log.info("exporting %s to nnU-Net's raw format", opts.data)
    report = export_dataset(opts.data, run_dir / "nnUNet_raw", dataset_id=opts.dataset_id, layout=opts.layout,
                            labels=labels, intensity=opts.intensity, splits=opts.split or None)
    log.info("%s", report.line())
    for w in report.warnings[:10]:
        log.warning("%s", w)
    for case, why in list(report.skipped.items())[:10]:
        log.warning("skipped %s: %s", case, why.splitlines()[0])
    fold = check_fold(len(report.cases), opts.fold)
    splits = None if fold == "all" else grouped_splits(report.cases)
    log.info("planning and preprocessing with nnU-Net (%d process(es))", opts.workers)
    plan_and_preprocess(run_dir, opts.dataset_id, num_processes=opts.workers)
    write_plans_variant(run_dir, opts.dataset_id, model_dir, patch=opts.patch, batch_size=opts.batch_size,
                        widths=opts.decoder_widths, lr=opts.lr, epochs=opts.epochs, iterations=opts.iterations,
                        val_iterations=opts.val_iterations, init=opts.init, seed=opts.seed)
    if splits is not None:
        atomic_write_json(dataset_dir(run_dir, opts.dataset_id) / "splits_final.json", splits)
        log.info("folds drawn over patients (%d cases): no patient is in both training and validation",
                 len(report.cases))
    record = {"options": dataclasses.asdict(opts), "model": str(model_dir), "dataset_id": opts.dataset_id,
              "fold": fold, "cases": report.cases, "labels": report.labels, "skipped": sorted(report.skipped),
              "grouped_splits": splits is not None}
    atomic_write_json(run_dir / RUN_RECORD, record)
    return record


def _resumed(run_dir: Path, opts: SegmentOptions, log: logging.Logger) -> dict[str, Any]:
    path = run_dir / RUN_RECORD
    if not path.is_file():
        raise MissingInputError(f"nothing to resume in {run_dir} (no {RUN_RECORD}): start the run without --resume")
    record = read_json(path)
    if opts.data is not None:
        log.warning("--resume: the run's exported dataset is kept; --data %s is ignored", opts.data)
    return record


def evaluate(run_dir: Path, record: dict[str, Any], device: str, log: logging.Logger) -> dict[str, Any]:
    """Step 6: segment the fold's validation cases from ``model/`` and score them."""
    from .export import FILE_ENDING
    from .metrics import case_dice, summarize_dice
    from .plans import dataset_dir
    from .predict import predict_folder

    raw = dataset_dir(run_dir, record["dataset_id"], "nnUNet_raw")
    cases = validation_cases(run_dir, record["dataset_id"], record["fold"], record["cases"])
    images = [raw / "imagesTr" / f"{c}_0000{FILE_ENDING}" for c in cases]
    log.info("segmenting the %d validation case(s) of fold %s from model/", len(cases), record["fold"])
    report = predict_folder(run_dir / "model", images, run_dir / "validation", device=device, exported=True,
                            overwrite=True, log=log)
    if report.skipped:
        raise DataError(f"{len(report.skipped)} validation case(s) could not be segmented: "
                          f"{next(iter(report.skipped.values()))}")
    import nibabel as nib

    names = {k: name for k, name in enumerate(record["labels"], 1)}
    per_case, ref_voxels = {}, dict.fromkeys(names, 0)
    for c in cases:
        ref = np.asarray(nib.load(raw / "labelsTr" / f"{c}{FILE_ENDING}").dataobj)
        pred = np.asarray(nib.load(run_dir / "validation" / f"{c}{FILE_ENDING}").dataobj)
        per_case[c] = case_dice(pred, ref, list(names))
        for k in names:
            ref_voxels[k] += int((ref == k).sum())
    return summarize_dice(per_case, names, ref_voxels)


def run_segment_finetune(project_root: str | Path, run_dir: str | Path, opts: SegmentOptions,
                         log: logging.Logger) -> dict[str, Any]:
    """The whole stage (see the module docstring); returns the metrics written to ``metrics.json``."""
    from ..eval.runs import resolve_model_dir
    from .network import check_patch_size, encoder_config
    from .plans import require_nnunet

    require_nnunet()
    run_dir = Path(run_dir).resolve()
    if opts.resume:
        record = _resumed(run_dir, opts, log)
        model_dir = Path(record["model"])
    else:
        model_dir = resolve_model_dir(project_root, opts.model)
        encoder_config(model_dir)  # a ViT or a broken model fails here, before anything is written
        check_patch_size(opts.patch)
        run_dir.mkdir(parents=True, exist_ok=True)
        record = _prepare(run_dir, model_dir, opts, log)
    from ..eval.encode import resolve_device

    device = str(resolve_device(opts.device))  # None: cuda when available
    from .trainer import export_weights, train

    log.info("training nnUNetTrainer_mv3d, fold %s, on %s", record["fold"], device)
    fold_dir = train(run_dir, record["dataset_id"], fold=record["fold"], device=device, resume=opts.resume,
                     validate=False)
    export_weights(fold_dir, run_dir / "model")
    summary = evaluate(run_dir, record, device, log)
    from .metrics import write_metrics

    info = read_json(run_dir / "model" / "nnunet.json")
    extra = {"model": record["model"], "init": record["options"]["init"], "fold": record["fold"],
             "dataset_id": record["dataset_id"], "epochs_trained": info.get("epochs_trained"),
             "intensity": record["options"]["intensity"], "segmentation_model": str(run_dir / "model")}
    write_metrics(run_dir, summary, extra)
    return {**extra, **summary}
