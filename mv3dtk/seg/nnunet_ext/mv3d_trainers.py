"""What nnU-Net's trainer search finds through ``nnUNet_extTrainer`` (see the package docstring)."""

from mv3dtk.seg.trainer import nnUNetTrainer_mv3d  # noqa: F401 - found by name by nnU-Net
