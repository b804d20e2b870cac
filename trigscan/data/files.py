"""Reading user data and writing datasets, without pickle.

* :func:`load_npz` — ``x`` [N, C, H, W] (float in [0, 1], or uint8 0–255) and
  ``y`` [N] integer labels; loaded with ``allow_pickle=False``.
* :func:`load_image_folder` — one subfolder per class (sorted names = labels 0..K-1).
* :func:`save_npz` — writes an ``.npz`` that is byte-identical for identical
  arrays (``numpy.savez`` stamps the current time into the zip) and atomically
  (a reader never sees half a file).

Every error is a ``ValueError`` that names the file and says what is wrong.
"""
from __future__ import annotations

import io
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


def atomic_write(path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and a rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_npz(path, **arrays) -> None:
    """Save arrays (numpy or torch) as a compressed ``.npz``; same arrays, same bytes."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, value in arrays.items():
            if isinstance(value, torch.Tensor):
                value = value.detach().cpu().numpy()
            value = np.ascontiguousarray(value)
            if value.dtype == object:
                raise TypeError(f"{name}: object arrays cannot be saved (they would need pickle)")
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, value, allow_pickle=False)
    atomic_write(path, buf.getvalue())


def read_npz(path) -> dict[str, np.ndarray]:
    """All arrays of an ``.npz`` (no pickle), with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    # without this check np.load would try to read any other file as a pickle
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: not a readable .npz file (not a zip archive)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise ValueError(f"{path}: holds object (pickled) arrays, which are refused; save plain numeric arrays") from None
        raise ValueError(f"{path}: not a readable .npz file ({exc})") from None
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise ValueError(f"{path}: not a readable .npz file ({exc})") from None


def check_images(x: np.ndarray, where: str) -> torch.Tensor:
    """Validate images [N, C, H, W] (float in [0, 1] or uint8) and return float32 ones."""
    if x.ndim != 4:
        hint = ""
        if x.ndim == 3:
            hint = " (a single-channel set needs a channel axis: x[:, None])"
        raise ValueError(f"{where}: x must have 4 axes [N, C, H, W], got shape {tuple(x.shape)}{hint}")
    if x.shape[0] == 0:
        raise ValueError(f"{where}: x holds no images")
    if x.shape[1] not in (1, 3) and x.shape[-1] in (1, 3):
        raise ValueError(
            f"{where}: x has shape {tuple(x.shape)}, which looks channels-last [N, H, W, C]; "
            "transpose it to [N, C, H, W]"
        )
    if x.dtype == np.uint8:
        return torch.from_numpy(x.astype(np.float32) / 255.0)
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{where}: x must be float in [0, 1] or uint8 in 0..255, got dtype {x.dtype}")
    if not np.isfinite(x).all():
        raise ValueError(f"{where}: x contains {int((~np.isfinite(x)).sum())} NaN or infinite values")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0:
        hint = " (0..255 pixels must be stored as uint8, or divided by 255)" if hi > 1.0 else ""
        raise ValueError(f"{where}: x values must lie in [0, 1], found min {lo:g} and max {hi:g}{hint}")
    return torch.from_numpy(x.astype(np.float32))


def check_labels(y: np.ndarray, n: int, where: str) -> torch.Tensor:
    """Validate labels: 1-D, integer, non-negative, one per image."""
    if y.ndim != 1:
        raise ValueError(f"{where}: y must have one axis [N], got shape {tuple(y.shape)}")
    if not np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_:
        raise ValueError(f"{where}: y must hold integer class labels, got dtype {y.dtype}")
    if len(y) != n:
        raise ValueError(f"{where}: x has {n} images but y has {len(y)} labels")
    if len(y) and y.min() < 0:
        raise ValueError(f"{where}: labels must be >= 0, found {int(y.min())}")
    return torch.from_numpy(y.astype(np.int64))


def load_npz(path) -> tuple[torch.Tensor, torch.Tensor]:
    """Load ``x`` and ``y`` from an ``.npz``: returns float32 [N, C, H, W] in [0, 1] and int64 [N].

    Other arrays in the file are ignored.
    """
    arrays = read_npz(path)
    missing = [k for k in ("x", "y") if k not in arrays]
    if missing:
        raise ValueError(f"{path}: missing array(s) {', '.join(missing)}; found {sorted(arrays) or 'none'}")
    x = check_images(arrays["x"], str(path))
    y = check_labels(arrays["y"], len(x), str(path))
    return x, y


def load_image_folder(path, size=None, channels: int | None = None):
    """Load ``path/<class>/<image>``: returns ``(x, y, classes)``.

    Classes are the subfolder names in sorted order (label = position).
    ``size`` (int or (H, W)) resizes every image; without it all images must
    share one size.  ``channels`` is 1 or 3; by default 1 when every image is
    greyscale, else 3.
    """
    from PIL import Image, UnidentifiedImageError

    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"{root}: not a folder")
    if channels not in (None, 1, 3):
        raise ValueError(f"channels: expected 1, 3 or None, got {channels!r}")
    if size is not None:
        size = (size, size) if isinstance(size, int) else tuple(size)
        if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
            raise ValueError(f"size: expected a positive int or (H, W), got {size!r}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"{root}: no class subfolders (expected one folder per class holding its images)")
    files, labels = [], []
    for label, name in enumerate(classes):
        found = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise ValueError(f"{root / name}: class folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
        files += found
        labels += [label] * len(found)

    images = []
    for f in files:
        try:
            with Image.open(f) as img:
                img.load()
                grey = img.mode in ("1", "L", "I", "I;16", "F")
                img = img.convert("L" if grey else "RGB")
                if size is not None:
                    img = img.resize((size[1], size[0]), Image.BILINEAR)
                images.append(np.asarray(img, dtype=np.uint8))
        except (UnidentifiedImageError, OSError) as exc:
            raise ValueError(f"{f}: cannot be read as an image ({exc})") from None
    shapes = {a.shape[:2] for a in images}
    if len(shapes) > 1:
        raise ValueError(f"{root}: images have different sizes {sorted(shapes)[:4]}; pass size= to resize them")
    if channels is None:
        channels = 1 if all(a.ndim == 2 for a in images) else 3
    stacked = []
    for a in images:
        if a.ndim == 2:
            a = np.repeat(a[..., None], channels, axis=2)
        elif channels == 1:  # RGB to grey with the ITU-R 601 weights PIL uses
            a = np.rint(a @ np.array([0.299, 0.587, 0.114]))[..., None].astype(np.uint8)
        stacked.append(a)
    x = torch.from_numpy(np.stack(stacked).transpose(0, 3, 1, 2).astype(np.float32) / 255.0)
    return x, torch.tensor(labels, dtype=torch.int64), classes
