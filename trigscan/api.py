"""The one-call API: ``trigscan.load_model`` and ``trigscan.scan``."""
from __future__ import annotations

from pathlib import Path

from . import scanners
from .models import load_torchscript
from .result import ScanResult


def load_model(path):
    """Load a model file for scanning.

    ``.pt`` / ``.ts`` / ``.torchscript``: a TorchScript archive (white-box).
    Pickled checkpoints are refused: they can run arbitrary code when loaded.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        from .models import load_onnx  # arrives with the black-box scanners

        return load_onnx(path)
    if suffix in (".pt", ".pth", ".ts", ".torchscript", ".jit", ""):
        return load_torchscript(path)
    raise ValueError(f"model: don't know how to load {path} (expected TorchScript .pt or .onnx)")


def scan(model, images, labels=None, method: str = "nc", seed: int = 0, *, classes=None,
         progress: bool | None = None, checkpoint=None, **options) -> ScanResult:
    """Scan `model` with one method. images: float [N, C, H, W] in [0, 1].

    options are the method's configuration (see ``trigscan.scanners.get(method).Config``).
    checkpoint: a file to save the scan's state to after every step and to
    resume from if it exists (methods with ``resumable = True``).
    Returns a ScanResult with ``backdoored`` and ``targets`` among its attributes.
    """
    scanner = scanners.get(method)(**options)
    return scanner.scan(model, images, labels, seed=seed, classes=classes, progress=progress,
                        checkpoint=checkpoint)
