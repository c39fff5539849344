"""Segment CT volumes with a ``segment/<run>/model`` folder (``mv3d segment-predict``), through nnU-Net's predictor.

The model folder (:func:`mv3dtk.seg.trainer.export_weights`) is read without unpickling
(:func:`~mv3dtk.seg.trainer.load_exported`) and handed to ``nnUNetPredictor.manual_initialization``; each volume
then goes through nnU-Net's own steps in this process (no worker pools): the plans' reader (SimpleITK for NIfTI),
the intensity mv3d's export wrote (see below), nnU-Net's preprocessing (crop, resampling, normalisation),
sliding-window prediction with Gaussian weighting and test-time mirroring, and the resampling of the logits back to
the input's grid; the label map is written by the same reader/writer, on the input's geometry (size, spacing,
origin, direction).

**Intensity.** Inputs hold HU. A model trained on ``--intensity mv3d`` inputs gets prep's window (HU [-1000, 1000]
-> [-1, 1], from the model's ``dataset.json``) first, as at export; ``nnunet`` models get the HU. ``hu_source``
is prep's ``--hu-source``: ``auto`` reads the voxels (:func:`mv3dtk.data.ctrate.guess_hu`) and subtracts 1,024
from a raw-stored volume (HU + 1024, CT-RATE v1) with a warning; ``raw`` always does; ``fixed`` never does.

**Failures.** A file that cannot be read or segmented is reported and skipped: one bad
volume does not sink a folder. Each label map is written atomically, and a rerun skips volumes whose label map
exists unless ``overwrite``.
"""

from __future__ import annotations

import logging
import re
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, MissingInputError
from ..fs import atomic_path, clean_temporaries
from .plans import require_nnunet

__all__ = ["PredictReport", "find_inputs", "predict_folder", "Segmenter"]

HU_SOURCES = ("auto", "raw", "fixed")
RAW_OFFSET = -1024.0  # CT-RATE v1: HU = stored - 1024
_CHANNEL = re.compile(r"_(\d{4})$")


@dataclass
class PredictReport:
    written: list[Path] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # case -> why
    existing: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _case_name(path: Path) -> str:
    stem = path.name[: -len(".nii.gz")] if path.name.endswith(".nii.gz") else path.stem
    return _CHANNEL.sub("", stem)  # nnU-Net's <case>_0000 naming, or a plain file name


def find_inputs(inputs: str | Path | list[str | Path], file_ending: str = ".nii.gz") -> list[tuple[str, Path]]:
    """``(case, file)`` for a folder (every ``*.nii.gz`` / ``*.nii`` in it; nnU-Net's ``<case>_0000`` names are
    shortened to ``<case>``) or a list of files. MissingInputError when there is nothing to segment; ConfigError
    when two files would write the same label map."""
    paths: list[Path]
    if isinstance(inputs, (list, tuple)):
        paths = [Path(p) for p in inputs]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise MissingInputError(f"no such file: {', '.join(missing[:3])}")
    else:
        folder = Path(inputs)
        if not folder.is_dir():
            raise MissingInputError(f"{folder} is not a folder of CT volumes (NIfTI, {file_ending})")
        paths = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith((".nii.gz", ".nii")))
        if not paths:
            raise MissingInputError(f"no NIfTI volumes (*.nii.gz, *.nii) in {folder}")
    cases: dict[str, Path] = {}
    for p in paths:
        m = _CHANNEL.search(p.name.split(".")[0])
        if m and m.group(1) != "0000":
            raise ConfigError(f"{p}: channel {m.group(1)} of a multi-channel case; mv3d segmentation models read "
                              "one CT channel (<case>_0000 or a plain file name)")
        case = _case_name(p)
        if case in cases:
            raise ConfigError(f"{cases[case]} and {p} would both write {case}: rename one of them")
        cases[case] = p
    return list(cases.items())


class Segmenter:
    """A loaded segmentation model: ``segment(path) -> (labels, properties)``, ``write(labels, properties, out)``.
    ``device``: cpu or cuda. ``mirroring``: nnU-Net's test-time mirroring on the trained axes (its default)."""

    def __init__(self, model_dir: str | Path, device: str | None = None, *, hu_source: str = "auto", mirroring: bool = True,
                 tile_step_size: float = 0.5, exported: bool = False):
        require_nnunet()
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        from ..eval.encode import resolve_device
        from .trainer import load_exported

        if hu_source not in HU_SOURCES:
            raise ConfigError(f"unknown HU source {hu_source!r}; use one of {', '.join(HU_SOURCES)}")
        dev = resolve_device(device)  # None: cuda when available
        self.model = load_exported(model_dir, dev)
        self.hu_source = hu_source
        self.exported = exported  # inputs from the model's own export: their intensities are the model's already
        self.dataset_json = self.model.dataset_json
        mv3d = self.dataset_json.get("mv3d", {})
        self.hu_window = tuple(mv3d["hu_window"]) if mv3d.get("intensity") == "mv3d" else None
        self.predictor = nnUNetPredictor(tile_step_size=tile_step_size, use_gaussian=True, use_mirroring=mirroring,
                                         perform_everything_on_device=dev.type == "cuda", device=dev,
                                         verbose=False, allow_tqdm=False)
        m = self.model
        self.predictor.manual_initialization(m.network, m.plans_manager, m.configuration_manager, [m.state],
                                             m.dataset_json, m.trainer_name, m.mirror_axes)
        self.reader = m.plans_manager.image_reader_writer_class()
        self.labels = {int(v): k for k, v in self.dataset_json["labels"].items() if isinstance(v, int)}

    def intensities(self, image: np.ndarray, name: str) -> tuple[np.ndarray, list[str]]:
        """HU decision, then the window of an ``mv3d``-intensity model. ``image`` is (C, ...) float32."""
        from ..data.ctrate import guess_hu
        from ..data.preprocess import window

        warnings: list[str] = []
        if self.exported:
            return image, warnings
        raw = self.hu_source == "raw"
        if self.hu_source == "auto":
            guess = guess_hu(image[0])
            raw = guess.raw
            if raw:
                warnings.append(f"{name}: the voxels look raw-stored (HU + 1024: {guess.why}); subtracted 1024. Pass "
                                "--hu-source fixed if they are HU")
        if raw:
            image = image + RAW_OFFSET
        if self.hu_window is not None:
            image = window(image, *self.hu_window)
        return image, warnings

    def segment(self, path: str | Path) -> tuple[np.ndarray, dict[str, Any], list[str]]:
        """The label map of one volume on its own grid (nnU-Net's axis order), its reader properties and the
        HU warnings."""
        import torch
        from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape

        m = self.model
        image, props = self.reader.read_images([str(path)])  # (1, z, y, x) in SimpleITK's order
        image, warnings = self.intensities(image.astype(np.float32), str(path))
        preprocessor = m.configuration_manager.preprocessor_class(verbose=False)
        data, _, props = preprocessor.run_case_npy(image, None, props, m.plans_manager, m.configuration_manager,
                                                   m.dataset_json)
        logits = self.predictor.predict_logits_from_preprocessed_data(torch.from_numpy(data)).cpu()
        seg = convert_predicted_logits_to_segmentation_with_correct_shape(
            logits, m.plans_manager, m.configuration_manager, self.predictor.label_manager, props,
            num_threads_torch=max(1, torch.get_num_threads()))
        return np.asarray(seg), props, warnings

    def write(self, seg: np.ndarray, props: dict[str, Any], out_file: Path) -> Path:
        """The label map written atomically by the plans' reader/writer (uint8, the input's geometry)."""
        with atomic_path(out_file) as tmp:  # the temporary keeps the name's ending, which picks the format
            self.reader.write_seg(seg.astype(np.uint8 if seg.max(initial=0) < 256 else np.uint16), str(tmp), props)
        return out_file


def predict_folder(model_dir: str | Path, inputs: str | Path | list[str | Path], out_dir: str | Path, *,
                   device: str | None = None, hu_source: str = "auto", mirroring: bool = True, overwrite: bool = False,
                   exported: bool = False, log: logging.Logger | None = None,
                   progress: Callable[[int, int], None] | None = None) -> PredictReport:
    """Segment every volume of ``inputs`` (a folder or a list of files) into ``out_dir/<case>.nii.gz`` with the
    model folder ``model_dir``. Returns what was written, skipped (with why) or already there. ``exported``: the
    inputs are images of the model's own nnU-Net export (``imagesTr``), whose intensities are already the model's."""
    log = log or logging.getLogger(__name__)
    cases = find_inputs(inputs)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    clean_temporaries(out_dir)
    segmenter = Segmenter(model_dir, device, hu_source=hu_source, mirroring=mirroring, exported=exported)
    ending = segmenter.dataset_json.get("file_ending", ".nii.gz")
    report = PredictReport()
    for done, (case, path) in enumerate(cases, 1):
        out_file = out_dir / f"{case}{ending}"
        if out_file.is_file() and not overwrite:
            report.existing.append(out_file)
        else:
            try:
                seg, props, warnings = segmenter.segment(path)
                report.written.append(segmenter.write(seg, props, out_file))
                report.warnings += warnings
                for w in warnings:
                    log.warning(w)
            except MemoryError:
                report.skipped[case] = f"{path}: out of memory while segmenting"
            except Exception as e:  # one bad volume does not sink the folder
                report.skipped[case] = f"{path}: {type(e).__name__}: {e}"
                log.debug("%s", traceback.format_exc())
            if case in report.skipped:
                log.warning("skipped %s", report.skipped[case])
        if progress is not None:
            progress(done, len(cases))
    return report
