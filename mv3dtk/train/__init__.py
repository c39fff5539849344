"""Losses, the Radiology Semantic Matching Bank, distributed helpers, the training loop."""
