"""Generated shapes: ten classes of anti-aliased objects over varied backgrounds.

Why a second embedded dataset: on the 8×8-born digits every class has a small
natural trigger (a few pixels turn any digit into a 1 or a 7), so trigger-size
anomaly tests such as Neural Cleanse see clean classes that look like backdoor
targets.  Here the label is a global property of one object of random size,
position, rotation and colour, so a clean class needs a large trigger and a
BadNets patch stands out (docs/zoo.md has the measurements).

Classes: 0 disc, 1 square, 2 triangle, 3 ring, 4 cross, 5 star, 6 horizontal
stripes, 7 vertical stripes, 8 diagonal stripes, 9 hexagon.  Backgrounds:
smooth value noise, a linear gradient, a mix of both, or a crop of one of
scikit-learn's two sample photographs; then mild Gaussian pixel noise.

Image ``i`` of a split is drawn from ``numpy.random.default_rng([seed, split, i])``
alone, so its bytes do not depend on how many images are made or in what order.
"""
from __future__ import annotations

import colorsys
import math
from functools import lru_cache

import numpy as np
import torch

from .embedded import sample_photos

CLASS_NAMES = ("disc", "square", "triangle", "ring", "cross", "star", "h-stripes", "v-stripes", "d-stripes", "hexagon")
SUPERSAMPLE = 4  # objects are drawn this many times finer, then box-averaged (anti-aliasing)
_SPLIT_ID = {"train": 1, "test": 2}
_DEFAULT_PER_CLASS = {"train": 1500, "test": 100}
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


def _box_average(a: np.ndarray, f: int) -> np.ndarray:
    h, w = a.shape[:2]
    return a.reshape(h // f, f, w // f, f, *a.shape[2:]).mean(axis=(1, 3))


def _rotate(points, cx, cy, theta):
    c, s = math.cos(theta), math.sin(theta)
    return [(cx + c * x - s * y, cy + s * x + c * y) for x, y in points]


def _raster(side: int, draw) -> np.ndarray:
    from PIL import Image, ImageDraw

    im = Image.new("L", (side, side), 0)
    draw(ImageDraw.Draw(im))
    return np.asarray(im, np.float32) / 255.0


def _polygon(side, points):
    return _raster(side, lambda d: d.polygon(points, fill=255))


def _ellipse(side, cx, cy, rx, ry, width=None):
    box = [cx - rx, cy - ry, cx + rx, cy + ry]
    if width is None:
        return _raster(side, lambda d: d.ellipse(box, fill=255))
    return _raster(side, lambda d: d.ellipse(box, outline=255, width=max(1, int(round(width)))))


def _stripes(side, rng, angle):
    """Stripes at ``angle`` (0 = horizontal lines) filling a random box of 55-100% of each side."""
    period = rng.uniform(0.16, 0.30) * side
    duty = rng.uniform(0.35, 0.6)
    phase = rng.uniform(0, period)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) + 0.5
    across = (xx * -math.sin(angle) + yy * math.cos(angle) + phase) % period
    lines = (across < duty * period).astype(np.float32)
    bw, bh = rng.uniform(0.55, 1.0) * side, rng.uniform(0.55, 1.0) * side
    x0, y0 = rng.uniform(0, side - bw), rng.uniform(0, side - bh)
    return lines * ((xx >= x0) & (xx < x0 + bw) & (yy >= y0) & (yy < y0 + bh))


def _object(label: int, side: int, rng) -> np.ndarray:
    """Coverage [side, side] in [0, 1] of one object of class ``label`` (drawn at the fine resolution)."""
    r = rng.uniform(0.22, 0.42) * side
    cx, cy = rng.uniform(0.8 * r, side - 0.8 * r, 2)
    theta = rng.uniform(0, 2 * math.pi)
    stroke = rng.uniform(0.07, 0.13) * side
    if label == 0:  # disc, slightly elliptic either way
        a = rng.uniform(0.8, 1.0)
        return _ellipse(side, cx, cy, r, r * a) if rng.random() < 0.5 else _ellipse(side, cx, cy, r * a, r)
    if label == 1:
        s = 0.85 * r
        return _polygon(side, _rotate([(-s, -s), (s, -s), (s, s), (-s, s)], cx, cy, theta))
    if label == 2:
        corners = [(r * math.cos(a), r * math.sin(a)) for a in (0, 2 * math.pi / 3, 4 * math.pi / 3)]
        return _polygon(side, _rotate(corners, cx, cy, theta))
    if label == 3:  # ring: an ellipse outline
        a = rng.uniform(0.8, 1.0)
        return _ellipse(side, cx, cy, r, r * a, width=stroke)
    if label == 4:  # two perpendicular bars at any rotation (plus or X)
        w = 0.6 * stroke
        bar = [(-r, -w), (r, -w), (r, w), (-r, w)]
        return np.maximum(_polygon(side, _rotate(bar, cx, cy, theta)), _polygon(side, _rotate(bar, cx, cy, theta + math.pi / 2)))
    if label == 5:  # five-pointed star
        inner = rng.uniform(0.38, 0.5) * r
        tips = [((r if k % 2 == 0 else inner) * math.cos(k * math.pi / 5), (r if k % 2 == 0 else inner) * math.sin(k * math.pi / 5))
                for k in range(10)]
        return _polygon(side, _rotate(tips, cx, cy, theta))
    if label in (6, 7, 8):  # within 15 degrees of horizontal, vertical, or one of the diagonals
        jitter = math.radians(rng.uniform(-15, 15))
        base = {6: 0.0, 7: math.pi / 2, 8: math.pi / 4 if rng.random() < 0.5 else 3 * math.pi / 4}[label]
        return _stripes(side, rng, base + jitter)
    corners = [(r * math.cos(k * math.pi / 3), r * math.sin(k * math.pi / 3)) for k in range(6)]  # 9: hexagon
    return _polygon(side, _rotate(corners, cx, cy, theta))


def _smooth_noise(rng, size, channels):
    from PIL import Image

    k = int(rng.integers(2, 7))
    grid = rng.random((k, k, channels)).astype(np.float32)
    out = np.stack([np.asarray(Image.fromarray(grid[..., c], mode="F").resize((size, size), Image.BICUBIC))
                    for c in range(channels)], -1)
    return (out - out.min()) / (out.max() - out.min() + 1e-6)


def _gradient(rng, size, channels):
    a = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1) - 0.5
    g = xx * math.cos(a) + yy * math.sin(a)
    g = ((g - g.min()) / (g.max() - g.min() + 1e-6))[..., None]
    if channels == 1:
        return g
    return (1 - g) * rng.random(3) + g * rng.random(3)


def _photo_crop(rng, size, channels):
    from PIL import Image

    photo = sample_photos()[int(rng.integers(2))]
    side = int(rng.integers(2 * size, 6 * size + 1))
    top, left = int(rng.integers(photo.shape[0] - side + 1)), int(rng.integers(photo.shape[1] - side + 1))
    crop = Image.fromarray(photo[top:top + side, left:left + side]).resize((size, size), Image.BILINEAR)
    crop = np.asarray(crop, np.float32) / 255.0
    return crop if channels == 3 else (crop @ _LUMA)[..., None]


def _background(rng, size, channels):
    """A background squeezed into a random band, and the band's centre."""
    kind = int(rng.integers(5))  # noise, gradient, both, photo (twice as likely)
    if kind == 0:
        b = _smooth_noise(rng, size, channels)
    elif kind == 1:
        b = _gradient(rng, size, channels)
    elif kind == 2:
        w = rng.uniform(0.3, 0.7)
        b = w * _smooth_noise(rng, size, channels) + (1 - w) * _gradient(rng, size, channels)
    else:
        b = _photo_crop(rng, size, channels)
    amp = rng.uniform(0.1, 0.45)
    b = (b - b.mean()) / (np.ptp(b) + 1e-6)
    centre = rng.uniform(0.15 + amp / 2, 0.85 - amp / 2)
    return np.clip(centre + amp * b, 0, 1).astype(np.float32), centre


def _ink(rng, channels, centre):
    """Ink lighter or darker than the background by a random contrast; any hue, luminance kept."""
    contrast = rng.uniform(0.25, 0.65)
    up, down = centre + contrast <= 1.0, centre - contrast >= 0.0
    sign = (1 if rng.random() < 0.5 else -1) if up and down else (1 if up else -1)
    level = float(np.clip(centre + sign * contrast, 0, 1))
    if channels == 1:
        return np.array([level], np.float32)
    rgb = np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.3, 1.0), 1.0), np.float32)
    return np.clip(rgb * level / max(float(rgb @ _LUMA), 1e-3), 0, 1).astype(np.float32)


def _image(label: int, rng, size: int, channels: int) -> np.ndarray:
    bg, centre = _background(rng, size, channels)
    alpha = _box_average(_object(label, size * SUPERSAMPLE, rng), SUPERSAMPLE)[..., None]
    img = (1 - alpha) * bg + alpha * _ink(rng, channels, centre)
    img = img + rng.normal(0, rng.uniform(0.0, 0.05), img.shape)
    return np.clip(img, 0, 1).astype(np.float32).transpose(2, 0, 1)


@lru_cache(maxsize=2)
def _make(size: int, split: str, seed: int, per_class: int, channels: int):
    n = len(CLASS_NAMES) * per_class
    y = np.arange(n) % len(CLASS_NAMES)
    x = np.empty((n, channels, size, size), np.float32)
    for i in range(n):
        x[i] = _image(int(y[i]), np.random.default_rng([seed, _SPLIT_ID[split], i]), size, channels)
    return torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))


def shapes(size: int = 32, split: str = "train", seed: int = 0, per_class: int | None = None, channels: int = 3):
    """Balanced generated shapes: ``x`` float32 [10·per_class, channels, size, size] in [0, 1], ``y`` int64.

    ``split`` is "train" (default 1500 images per class) or "test" (100); the two are
    drawn independently, so they never share an image.  The default 32×32 RGB train and
    test sets (16,000 images) take about 35 s on one core; results are cached per process.
    """
    if split not in _SPLIT_ID:
        raise ValueError(f"split: expected 'train' or 'test', got {split!r}")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 8:
        raise ValueError(f"size: expected an integer >= 8 (pixels per side), got {size!r}")
    if channels not in (1, 3):
        raise ValueError(f"channels: expected 1 or 3, got {channels!r}")
    per_class = _DEFAULT_PER_CLASS[split] if per_class is None else per_class
    if isinstance(per_class, bool) or not isinstance(per_class, (int, np.integer)) or per_class < 1:
        raise ValueError(f"per_class: expected a positive integer, got {per_class!r}")
    x, y = _make(int(size), split, int(seed), int(per_class), int(channels))
    return x.clone(), y.clone()
