"""A folder for nnU-Net's ``nnUNet_extTrainer`` variable: point it here and ``nnUNetv2_train ... -tr
nnUNetTrainer_mv3d`` finds mv3d's trainer (nnU-Net imports the modules of the folder by their bare names)::

    export nnUNet_extTrainer=$(python -c "import mv3dtk.seg.nnunet_ext as m; print(m.__path__[0])")
"""
