"""Organ segmentation inside nnU-Net v2 (issue #19): the MedVista3D-UniMiSS encoder with an STU-Net-B style
decoder. ``export`` writes nnU-Net's raw dataset, ``plans`` plans and preprocesses through nnU-Net's Python API
and writes the plans variant the encoder needs, ``network`` builds the network, ``trainer`` is
``nnUNetTrainer_mv3d``, ``run`` chains the steps of ``mv3d segment-finetune``, ``predict`` segments volumes
through nnU-Net's predictor (``mv3d segment-predict``), ``metrics`` scores them (Dice). ``options`` is light;
heavy imports stay inside functions or in ``trainer``: ``mv3d --help`` never imports torch or nnunetv2."""
