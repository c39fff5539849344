"""Organ segmentation inside nnU-Net v2 (issue #19): the MedVista3D-UniMiSS encoder with an STU-Net-B style
decoder. ``export`` writes nnU-Net's raw dataset, ``plans`` plans and preprocesses through nnU-Net's Python API
and writes the plans variant the encoder needs, ``network`` builds the network. Heavy imports stay inside
functions: ``mv3d --help`` never imports torch or nnunetv2."""
