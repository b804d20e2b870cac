"""trigscan: backdoor (trojan) scanning for image classifiers.

The compiled kernels live under ``torch.ops.trigscan`` (typed wrappers in
:mod:`trigscan.ops`); the scanners, data and zoo build on them.
"""
__version__ = "0.1.0"

import torch  # noqa: F401  (must be imported before the extension)

from ._extension import build_info, has_ops

if has_ops():
    from . import ops  # noqa: F401  (registers fake kernels and autograd)
    from .scanners import b3d, dtinspector, lred, nc, pixel, tabor  # noqa: F401  (registers the scanners)

from .api import load_model, scan
from .result import ScanResult

__all__ = ["__version__", "build_info", "has_ops", "load_model", "scan", "ScanResult"]
