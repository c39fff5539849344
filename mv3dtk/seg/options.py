"""``mv3d segment-finetune``'s options, written once (:mod:`mv3dtk.options`), with the paper's defaults.

MedVista3D's segmentation transfer (Table 6): lr 5e-5, batch 2, 128^3 crops, nnU-Net's 1,000 epochs of 250
iterations on its 5-fold split. Imported by ``--help``: nothing heavy here (no torch, no nnU-Net).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..options import option

LAYOUTS = ("auto", "totalseg", "ctrate", "radgenome", "csv")  # mv3dtk.seg.export.LAYOUTS, without its imports
INTENSITIES = ("mv3d", "nnunet")
INITS = ("pretrained", "random")


@dataclass(kw_only=True)
class SegmentOptions:
    model: str | None = option(None, "Pretrained UniMiSS model whose encoder starts the network, e.g. "
                                     "pretrain/<run>/model [default: the project's latest].", path="dir")
    data: str | None = option(None, "The labelled dataset: a TotalSegmentator root (meta.csv, <case>/ct.nii.gz, "
                                    "<case>/segmentations/) or a CT-RATE / RadGenome root with region masks. Needed "
                                    "unless --resume.", path="dir")
    layout: str = option("auto", "The dataset's layout [auto: TotalSegmentator if it has meta.csv and "
                                 "<case>/segmentations/].", choices=LAYOUTS)
    labels: str | None = option(None, "A text file of the structures to segment, one name per line, in merge order "
                                      "(a later one wins where masks overlap) [default: every mask name, sorted].",
                                path="file")
    split: tuple[str, ...] = option((), "Source split to export (TotalSegmentator's train / val / test, CT-RATE's "
                                        "train / valid); repeatable [default: all].", multiple=True)
    dataset_id: int = option(501, "nnU-Net dataset id (the folder Dataset<ID>_<name>).", min=1)
    fold: str = option("0", "nnU-Net's fold: 0-4 (its 5-fold split; validation on that fold) or 'all' (train and "
                            "validate on every case).")
    patch: tuple[int, int, int] = option((128, 128, 128), "Patch size D H W (divisible by the total stride "
                                                          "16 32 32).", nargs=3)
    batch_size: int = option(2, "Patches per step.", min=1)
    lr: float = option(5e-5, "AdamW peak learning rate (nnU-Net's poly decay per epoch).")
    epochs: int = option(1000, "Epochs (nnU-Net's default).", min=1)
    iterations: int = option(250, "Training iterations per epoch.", min=1)
    val_iterations: int = option(50, "Pseudo-Dice iterations per epoch (nnU-Net's progress estimate).", min=1)
    intensity: str = option("mv3d", "mv3d: prep's HU window [-1000, 1000] -> [-1, 1], what the encoder was "
                                    "pretrained on; nnunet: HU with nnU-Net's CT normalisation.", choices=INTENSITIES)
    init: str = option("pretrained", "pretrained: copy the model's encoder weights in (every tensor must match); "
                                     "random: the same network from scratch (the baseline).", choices=INITS)
    decoder_widths: tuple[int, int, int, int, int, int] | None = option(
        None, "Decoder widths of the six stages, highest resolution first [default: STU-Net-B's 32 64 128 256 512 "
              "512].", nargs=6)
    device: str | None = option(None, "cuda or cpu [default: cuda when available].")
    workers: int = option(1, "Processes for nnU-Net's planning and preprocessing.", min=1)
    seed: int = option(0, "Seed of the decoder's initialisation and the training order.")
    resume: bool = option(False, "Continue the run's nnU-Net training from its latest checkpoint.", is_flag=True)
    run_name: str | None = option(None, "Run name (folder under segment/) [default: <model run>-<time>].",
                                  flags=("--run",))
