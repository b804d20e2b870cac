"""Data for trigscan: embedded datasets (no download) and loaders for user data.

Pixels are float32 in [0, 1], shape [N, C, H, W]; labels int64 [N].
Normalisation is never applied here: it belongs to the model wrapper.
"""
from .embedded import balanced_subset, color_digits, digits, noise, split_indices
from .files import atomic_write, load_image_folder, load_npz, read_npz, save_npz
from .shapes import shapes

__all__ = [
    "atomic_write",
    "balanced_subset",
    "color_digits",
    "digits",
    "load_image_folder",
    "load_npz",
    "noise",
    "read_npz",
    "save_npz",
    "shapes",
    "split_indices",
]
