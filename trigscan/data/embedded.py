"""Datasets that ship with the installed packages: nothing is downloaded.

* :func:`digits` — scikit-learn's 1797 scanned handwritten digits (8×8, 17 grey
  levels), upsampled to ``size``×``size``; one channel.
* :func:`color_digits` — the same digits, each coloured with a random hue and
  composited over a random crop of one of scikit-learn's two bundled sample
  photographs (``china.jpg``, ``flower.jpg``); three channels.  Image ``i`` of
  ``color_digits`` is image ``i`` of ``digits`` with the same label and split,
  so grey and colour models see the same writing.
* :func:`noise` — uniform synthetic images (what B3D-SS scans with).

All return ``(x, y)``: ``x`` float32 ``[N, C, S, S]`` in [0, 1], ``y`` int64 ``[N]``.
The train/test split is stratified and fixed by ``seed``; every random choice
comes from a numpy/torch generator seeded explicitly, so the bytes are the same
on every call.
"""
from __future__ import annotations

import colorsys
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

SPLITS = ("train", "test", "all")


def _check_size(size) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 4:
        raise ValueError(f"size: expected an integer >= 4 (pixels per side), got {size!r}")
    return int(size)


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    # antialias only matters when shrinking; clamp because interpolation can
    # overshoot [0, 1] by a rounding error
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    out = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return out.clamp_(0.0, 1.0)


def split_indices(y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split: ``round(test_fraction * n_c)`` random images of each class go to test.

    Returns sorted (train, test) index arrays.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction: expected a number in (0, 1), got {test_fraction!r}")
    rng = np.random.default_rng(seed)
    test = []
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        k = int(round(test_fraction * len(members)))
        test.append(rng.permutation(members)[:k])
    test = np.sort(np.concatenate(test))
    train = np.setdiff1d(np.arange(len(y)), test)
    return train, test


def balanced_subset(y, n: int, seed: int = 0) -> np.ndarray:
    """``n`` indices drawn at random with the classes as even as possible (sorted).

    Used to pick a fixed set of scan images: a scanner that works per source
    class then gets a similar number of each.
    """
    y = np.asarray(y)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n: expected a positive integer, got {n!r}")
    n = min(int(n), len(y))
    order = np.random.default_rng(seed).permutation(len(y))
    # rank of each image within its class in the random order; taking the
    # smallest ranks first deals the classes out like cards
    rank = np.empty(len(y), dtype=np.int64)
    for c in np.unique(y):
        members = order[y[order] == c]
        rank[members] = np.arange(len(members))
    chosen = order[np.argsort(rank[order], kind="stable")[:n]]
    return np.sort(chosen)


def _select(x: torch.Tensor, y: torch.Tensor, split: str, test_fraction: float, seed: int):
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
    if split == "all":
        return x.clone(), y.clone()
    train, test = split_indices(y.numpy(), test_fraction, seed)
    idx = torch.from_numpy(train if split == "train" else test)
    return x[idx], y[idx]


@lru_cache(maxsize=8)
def _digits_all(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)  # 0..16 grey levels
    y = torch.from_numpy(bunch.target.astype(np.int64))
    return _resize(x, size), y


def digits(size: int = 24, split: str = "all", seed: int = 0, test_fraction: float = 0.25):
    """Handwritten digits, greyscale: ``x`` [N, 1, size, size], ``y`` in 0..9.

    ``split`` is "train", "test" or "all"; the split is stratified and fixed by ``seed``.
    """
    x, y = _digits_all(_check_size(size))
    return _select(x, y, split, test_fraction, seed)


@lru_cache(maxsize=1)
def sample_photos() -> tuple[np.ndarray, ...]:
    """scikit-learn's two bundled photographs, uint8 [H, W, 3]."""
    from sklearn.datasets import load_sample_images  # ships with sklearn; reading needs pillow

    return tuple(np.array(img) for img in load_sample_images().images)


@lru_cache(maxsize=4)
def _photos() -> tuple[torch.Tensor, ...]:
    return tuple(torch.from_numpy(img).permute(2, 0, 1).float().div(255.0) for img in sample_photos())


@lru_cache(maxsize=4)
def _color_digits_all(size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    ink, y = _digits_all(size)
    photos = _photos()
    rng = np.random.default_rng(seed)
    out = torch.empty(len(y), 3, size, size)
    for i in range(len(y)):
        photo = photos[rng.integers(len(photos))]
        side = int(rng.integers(2 * size, 6 * size + 1))  # crop 2x..6x the output side
        top = int(rng.integers(photo.shape[1] - side + 1))
        left = int(rng.integers(photo.shape[2] - side + 1))
        bg = _resize(photo[None, :, top : top + side, left : left + side], size)[0]
        # squeeze the photo to mid-range so the digit can always stand out,
        # then pick bright ink on dark backgrounds and dark ink on bright ones
        bg = 0.2 + 0.5 * bg
        hue = float(rng.random())
        colour = torch.tensor(colorsys.hsv_to_rgb(hue, 1.0, 1.0), dtype=torch.float32)
        colour = colour * 0.2 if bg.mean() > 0.45 else 0.6 + 0.4 * colour
        alpha = ink[i]
        out[i] = (1 - alpha) * bg + alpha * colour[:, None, None]
    return out.clamp_(0.0, 1.0), y


def color_digits(size: int = 24, split: str = "all", seed: int = 0, test_fraction: float = 0.25):
    """Handwritten digits in colour over photo crops: ``x`` [N, 3, size, size].

    Image ``i`` and its split are those of :func:`digits` with the same ``seed``;
    ``seed`` also drives the crops and hues.
    """
    x, y = _color_digits_all(_check_size(size), int(seed))
    return _select(x, y, split, test_fraction, seed)


def noise(n: int, shape=(1, 24, 24), seed: int = 0) -> torch.Tensor:
    """``n`` images of i.i.d. uniform [0, 1) pixels, float32 [n, *shape]."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n: expected a positive integer, got {n!r}")
    shape = tuple(shape)
    if len(shape) != 3 or not all(isinstance(s, (int, np.integer)) and s > 0 for s in shape):
        raise ValueError(f"shape: expected (C, H, W) with positive integers, got {shape!r}")
    g = torch.Generator().manual_seed(int(seed))
    return torch.rand((int(n), *shape), generator=g, dtype=torch.float32)
