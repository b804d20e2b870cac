"""Procedural "shapes and textures" images: 10 classes whose label is a global property.

Every image is drawn at ``SS`` x the output resolution (PIL for the polygons and
ellipses, numpy for the stripe textures) as a coverage mask, box-averaged down
(anti-aliased), and composited over a random background.  Everything comes from
``numpy.random.default_rng`` seeded with (seed, split, index), so the bytes depend
only on the arguments and not on the order images are made in.

Classes (random size, position, rotation, intensity/colour and stroke in each):
    0 disc              filled ellipse (aspect 0.8-1)
    1 square            filled, rotated
    2 triangle          filled equilateral, rotated
    3 ring              ellipse outline
    4 cross             two perpendicular bars, any rotation (plus or X)
    5 star              filled five-pointed star, rotated
    6 h-stripes         stripes within +-15 deg of horizontal, over a large box
    7 v-stripes         stripes within +-15 deg of vertical
    8 d-stripes         stripes within +-15 deg of one of the two diagonals
    9 concentric        2-3 nested square outlines, rotated

Backgrounds: smooth value noise (a random k x k grid, bicubic-upsampled), a
linear gradient, or both; ``photos=True`` also uses crops of scikit-learn's two
sample photographs (like trigscan.data.color_digits).  ``clutter`` adds that
many small distractor blobs/strokes of random intensity that carry no label.

Greyscale: channels=1.  Colour: channels=3 (random-hue ink, colour backgrounds).
Output: x float32 [N, C, S, S] in [0, 1], y int64 [N] (classes balanced).
"""
from __future__ import annotations

import colorsys
import math
import time
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("disc", "square", "triangle", "ring", "cross", "star", "h-stripes", "v-stripes", "d-stripes", "concentric")
SS = 4  # supersampling factor
SPLIT_ID = {"train": 1, "test": 2}


def _down(a: np.ndarray, f: int) -> np.ndarray:
    """Box-average an [H, W] (or [H, W, C]) array by an integer factor."""
    h, w = a.shape[:2]
    return a.reshape(h // f, f, w // f, f, *a.shape[2:]).mean(axis=(1, 3))


def _rot(points, cx, cy, theta):
    c, s = math.cos(theta), math.sin(theta)
    return [(cx + c * x - s * y, cy + s * x + c * y) for x, y in points]


def _polygon(H, pts):
    im = Image.new("L", (H, H), 0)
    ImageDraw.Draw(im).polygon(pts, fill=255)
    return np.asarray(im, np.float32) / 255.0


def _ellipse(H, cx, cy, rx, ry, width=None):
    im = Image.new("L", (H, H), 0)
    box = [cx - rx, cy - ry, cx + rx, cy + ry]
    d = ImageDraw.Draw(im)
    if width is None:
        d.ellipse(box, fill=255)
    else:
        d.ellipse(box, outline=255, width=max(1, int(round(width))))
    return np.asarray(im, np.float32) / 255.0


def _grid(H):
    yy, xx = np.mgrid[0:H, 0:H].astype(np.float32) + 0.5
    return xx, yy


def _stripes(H, rng, angle, xx, yy, cover):
    """Stripes at ``angle`` (radians, 0 = horizontal lines) inside a random box covering ``cover`` of each side."""
    period = rng.uniform(0.16, 0.30) * H
    duty = rng.uniform(0.35, 0.6)
    phase = rng.uniform(0, period)
    # distance across the stripes: normal direction of lines at `angle`
    nx, ny = -math.sin(angle), math.cos(angle)
    t = (xx * nx + yy * ny + phase) % period
    m = (t < duty * period).astype(np.float32)
    bw, bh = rng.uniform(cover, 1.0) * H, rng.uniform(cover, 1.0) * H
    x0, y0 = rng.uniform(0, H - bw), rng.uniform(0, H - bh)
    box = (xx >= x0) & (xx < x0 + bw) & (yy >= y0) & (yy < y0 + bh)
    return m * box


def shape_mask(label: int, H: int, rng: np.random.Generator, p: dict) -> np.ndarray:
    """Hi-res coverage mask [H, H] in [0, 1] of one object of class ``label``."""
    lo, hi = p["radius"]
    r = rng.uniform(lo, hi) * H
    margin = r * 0.8
    cx, cy = rng.uniform(margin, H - margin), rng.uniform(margin, H - margin)
    theta = rng.uniform(0, 2 * math.pi)
    stroke = rng.uniform(0.07, 0.13) * H
    xx, yy = _grid(H)
    if label == 0:  # disc
        a = rng.uniform(0.8, 1.0)
        return _ellipse(H, cx, cy, r, r * a) if rng.random() < 0.5 else _ellipse(H, cx, cy, r * a, r)
    if label == 1:  # square
        s = r * 0.85
        return _polygon(H, _rot([(-s, -s), (s, -s), (s, s), (-s, s)], cx, cy, theta))
    if label == 2:  # triangle
        pts = [(r * math.cos(a), r * math.sin(a)) for a in (0, 2 * math.pi / 3, 4 * math.pi / 3)]
        return _polygon(H, _rot(pts, cx, cy, theta))
    if label == 3:  # ring
        a = rng.uniform(0.8, 1.0)
        return _ellipse(H, cx, cy, r, r * a, width=stroke)
    if label == 4:  # cross: two bars
        w = stroke * 0.6
        bar = [(-r, -w), (r, -w), (r, w), (-r, w)]
        return np.maximum(_polygon(H, _rot(bar, cx, cy, theta)), _polygon(H, _rot(bar, cx, cy, theta + math.pi / 2)))
    if label == 5:  # star
        inner = rng.uniform(0.38, 0.5) * r
        pts = [((r if k % 2 == 0 else inner) * math.cos(k * math.pi / 5), (r if k % 2 == 0 else inner) * math.sin(k * math.pi / 5))
               for k in range(10)]
        return _polygon(H, _rot(pts, cx, cy, theta))
    if label in (6, 7, 8):
        jitter = math.radians(rng.uniform(-15, 15))
        base = {6: 0.0, 7: math.pi / 2, 8: math.pi / 4 if rng.random() < 0.5 else 3 * math.pi / 4}[label]
        return _stripes(H, rng, base + jitter, xx, yy, p["texture_cover"])
    if label == 9:  # concentric square outlines
        n = int(rng.integers(2, 4))
        s_out = r * 0.95
        gap = s_out / (n + 0.3)
        w = min(stroke * 0.6, gap * 0.5)
        # distance in the square's frame (Chebyshev) -> rings of width w every gap
        c, s = math.cos(theta), math.sin(theta)
        u = (xx - cx) * c + (yy - cy) * s
        v = -(xx - cx) * s + (yy - cy) * c
        d = np.maximum(np.abs(u), np.abs(v))
        m = np.zeros((H, H), np.float32)
        for k in range(n):
            side = s_out - k * gap
            m = np.maximum(m, ((d <= side) & (d > side - w)).astype(np.float32))
        return m
    if label == 10:  # half-disc
        pts = [(r * math.cos(a), r * math.sin(a) + 0.4 * r) for a in np.linspace(math.pi, 2 * math.pi, 24)]
        return _polygon(H, _rot(pts, cx, cy, theta))
    if label == 11:  # bar, aspect ~3
        w = r * rng.uniform(0.28, 0.38)
        return _polygon(H, _rot([(-r, -w), (r, -w), (r, w), (-r, w)], cx, cy, theta))
    if label == 12:  # L shape
        s = 0.8 * r
        pts = [(-1, -1), (-0.25, -1), (-0.25, 0.35), (1, 0.35), (1, 1), (-1, 1)]
        return _polygon(H, _rot([(s * a, s * b) for a, b in pts], cx, cy, theta))
    if label == 13:  # crescent: disc minus a shifted disc
        d = 0.5 * r
        return np.clip(_ellipse(H, cx, cy, r, r) - _ellipse(H, cx + d * math.cos(theta), cy + d * math.sin(theta), 0.85 * r, 0.85 * r), 0, 1)
    if label == 14:  # thick annulus
        return _ellipse(H, cx, cy, r, r, width=0.45 * r)
    if label == 15:  # hexagon
        pts = [(r * math.cos(k * math.pi / 3), r * math.sin(k * math.pi / 3)) for k in range(6)]
        return _polygon(H, _rot(pts, cx, cy, theta))
    if label == 16:  # thick cross
        w = 0.32 * r
        bar = [(-r, -w), (r, -w), (r, w), (-r, w)]
        return np.maximum(_polygon(H, _rot(bar, cx, cy, theta)), _polygon(H, _rot(bar, cx, cy, theta + math.pi / 2)))
    raise ValueError(label)


# class sets: output label k is drawn as shape id CLASS_SETS[name][k]
CLASS_SETS = {
    "mixed": list(range(10)),
    # mixed, with the nested-outline texture (a natural easy target) replaced by a filled hexagon
    "mixed-hex": [0, 1, 2, 3, 4, 5, 6, 7, 8, 15],
    # ten filled silhouettes, no outlines, no textures
    "solid": [0, 1, 2, 5, 16, 10, 11, 12, 13, 14],
}


def _smooth_noise(rng, S, C):
    k = int(rng.integers(2, 7))
    g = rng.random((k, k, C)).astype(np.float32)
    out = np.stack([np.asarray(Image.fromarray(g[..., c], mode="F").resize((S, S), Image.BICUBIC)) for c in range(C)], -1)
    lo, hi = out.min(), out.max()
    return (out - lo) / (hi - lo + 1e-6)


def _gradient(rng, S, C):
    a = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32) / (S - 1) - 0.5
    g = xx * math.cos(a) + yy * math.sin(a)
    g = (g - g.min()) / (g.max() - g.min() + 1e-6)
    if C == 1:
        return g[..., None]
    c0, c1 = rng.random(3), rng.random(3)
    return (1 - g[..., None]) * c0 + g[..., None] * c1


@lru_cache(maxsize=1)
def _photos():
    from sklearn.datasets import load_sample_images

    return tuple(np.asarray(im, np.float32) / 255.0 for im in load_sample_images().images)


def _photo_crop(rng, S, C):
    ph = _photos()[int(rng.integers(2))]
    side = int(rng.integers(2 * S, 6 * S + 1))
    t, l = int(rng.integers(ph.shape[0] - side + 1)), int(rng.integers(ph.shape[1] - side + 1))
    crop = np.asarray(Image.fromarray((ph[t:t + side, l:l + side] * 255).astype(np.uint8)).resize((S, S), Image.BILINEAR),
                      np.float32) / 255.0
    if C == 1:
        crop = crop @ np.array([0.299, 0.587, 0.114], np.float32)
        return crop[..., None]
    return crop


def background(rng, S, C, p):
    kinds = ["noise", "gradient", "both"] + (["photo", "photo"] if p["photos"] else [])
    kind = kinds[int(rng.integers(len(kinds)))]
    if kind == "noise":
        b = _smooth_noise(rng, S, C)
    elif kind == "gradient":
        b = _gradient(rng, S, C)
    elif kind == "both":
        w = rng.uniform(0.3, 0.7)
        b = w * _smooth_noise(rng, S, C) + (1 - w) * _gradient(rng, S, C)
    else:
        b = _photo_crop(rng, S, C)
    # squeeze into a band [m - amp/2, m + amp/2]
    amp = rng.uniform(*p["bg_amp"])
    b = (b - b.mean()) / (np.ptp(b) + 1e-6)
    m = rng.uniform(0.15 + amp / 2, 0.85 - amp / 2)
    return np.clip(m + amp * b, 0, 1).astype(np.float32), m


def _ink(rng, C, bg_mean, p):
    contrast = rng.uniform(*p["contrast"])
    up = bg_mean + contrast <= 1.0
    down = bg_mean - contrast >= 0.0
    sign = (1 if rng.random() < 0.5 else -1) if up and down else (1 if up else -1)
    level = float(np.clip(bg_mean + sign * contrast, 0, 1))
    if C == 1:
        return np.array([level], np.float32)
    hue, sat = rng.random(), rng.uniform(0.3, 1.0)
    rgb = np.array(colorsys.hsv_to_rgb(hue, sat, 1.0), np.float32)
    # scale the hue so that its luminance is about `level`
    lum = float(rgb @ np.array([0.299, 0.587, 0.114]))
    return np.clip(rgb * level / max(lum, 1e-3), 0, 1).astype(np.float32)


def _clutter(rng, H, S):
    """A small random distractor: a blob or a short stroke (hi-res mask)."""
    im = Image.new("L", (H, H), 0)
    d = ImageDraw.Draw(im)
    x, y = rng.uniform(0, H, 2)
    s = rng.uniform(0.04, 0.10) * H
    if rng.random() < 0.5:
        d.ellipse([x - s, y - s, x + s, y + s], fill=255)
    else:
        a = rng.uniform(0, 2 * math.pi)
        L = s * 2.5
        d.line([x - L * math.cos(a), y - L * math.sin(a), x + L * math.cos(a), y + L * math.sin(a)], fill=255,
               width=max(1, int(s * 0.6)))
    return _down(np.asarray(im, np.float32) / 255.0, SS)


DEFAULTS = dict(radius=(0.22, 0.42), texture_cover=0.55, bg_amp=(0.1, 0.45), contrast=(0.25, 0.65),
                noise_sigma=(0.0, 0.05), photos=False, clutter=0, classes="mixed")


def render(label: int, rng: np.random.Generator, S: int, C: int, p: dict) -> np.ndarray:
    H = S * SS
    bg, m = background(rng, S, C, p)
    alpha = _down(shape_mask(CLASS_SETS[p["classes"]][label], H, rng, p), SS)[..., None]
    ink = _ink(rng, C, m, p)
    img = (1 - alpha) * bg + alpha * ink
    for _ in range(int(p["clutter"])):
        a = _clutter(rng, H, S)[..., None] * rng.uniform(0.4, 0.9)
        img = (1 - a) * img + a * _ink(rng, C, m, p)
    sigma = rng.uniform(*p["noise_sigma"])
    if sigma > 0:
        img = img + rng.normal(0, sigma, img.shape).astype(np.float32)
    return np.clip(img, 0, 1).astype(np.float32).transpose(2, 0, 1)


def make(n_per_class: int, split: str = "train", size: int = 24, channels: int = 1, seed: int = 0, **params):
    """Balanced set of ``10 * n_per_class`` images; returns torch tensors (x, y)."""
    import torch

    p = dict(DEFAULTS, **params)
    n = 10 * n_per_class
    y = np.arange(n) % 10
    x = np.empty((n, channels, size, size), np.float32)
    for i in range(n):
        rng = np.random.default_rng([seed, SPLIT_ID[split], i])
        x[i] = render(int(y[i]), rng, size, channels, p)
    return torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))


def contact_sheet(x, y, path, per_class=8, scale=4):
    """PNG grid: one row per class, ``per_class`` examples."""
    x = x.numpy() if hasattr(x, "numpy") else x
    y = y.numpy() if hasattr(y, "numpy") else y
    C, S = x.shape[1], x.shape[2]
    sheet = np.ones((10 * (S + 2), per_class * (S + 2), 3), np.float32)
    for c in range(10):
        idx = np.flatnonzero(y == c)[:per_class]
        for j, i in enumerate(idx):
            im = x[i].transpose(1, 2, 0)
            if C == 1:
                im = np.repeat(im, 3, -1)
            sheet[c * (S + 2):c * (S + 2) + S, j * (S + 2):j * (S + 2) + S] = im
    Image.fromarray((sheet * 255).astype(np.uint8)).resize((sheet.shape[1] * scale, sheet.shape[0] * scale),
                                                            Image.NEAREST).save(path)


if __name__ == "__main__":
    import sys

    t = time.perf_counter()
    x, y = make(500, "train", 24, 1, 0)
    xt, yt = make(100, "test", 24, 1, 0)
    print(f"grey 24: {tuple(x.shape)} + {tuple(xt.shape)} in {time.perf_counter() - t:.1f}s")
    contact_sheet(x, y, "/tmp/shapes_proto/sheet_grey24.png")
    t = time.perf_counter()
    x, y = make(500, "train", 32, 3, 0, photos=True)
    print(f"rgb 32: {tuple(x.shape)} in {time.perf_counter() - t:.1f}s")
    contact_sheet(x, y, "/tmp/shapes_proto/sheet_rgb32.png")
