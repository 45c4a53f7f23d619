"""Datasets: files (local or downloaded) -> uint8 tensors + labels + class names.

Submodules are imported where used, so listing datasets does not import torch.
"""
