"""Image and text encoders, the MedVista3D model, configs (one JSON per architecture)."""
