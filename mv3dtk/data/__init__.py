"""Dataset readers, preprocessing and the synthetic CT-RATE generator."""
