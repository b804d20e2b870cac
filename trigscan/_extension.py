"""Loading of the compiled extension ``trigscan._C`` and what it was built with.

Importing ``_C`` runs its static ``TORCH_LIBRARY`` initialisers, which register
every ``torch.ops.trigscan.*`` schema and its CPU (and, when compiled, CUDA)
kernels.  A tree whose extension is not built still imports, so that the pure
Python parts (data, zoo, detection statistics) stay usable; the first call that
needs a kernel raises with the reason the load failed.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

_LOAD_ERROR: Exception | None = None
try:
    from . import _C  # noqa: F401  (import registers the ops)
except ImportError as exc:  # not built, or built against another torch
    _LOAD_ERROR = exc

_BUILD_INFO_PATH = Path(__file__).with_name("_build_info.json")


def has_ops() -> bool:
    """True when the compiled kernels are loaded."""
    return _LOAD_ERROR is None


def assert_has_ops() -> None:
    if _LOAD_ERROR is not None:
        raise RuntimeError(
            "trigscan's compiled extension (trigscan._C) could not be loaded: "
            f"{_LOAD_ERROR}. Build it with `pip install --no-build-isolation -e .` "
            "(or `python setup.py build_ext --inplace` in a checkout)."
        )


def build_info() -> dict:
    """What the extension was built with and which kernels are registered.

    Keys: ``loaded``, ``load_error``, ``cuda_compiled``, ``cuda_arch_list``,
    ``torch_built_with``, ``torch_runtime``, ``cuda_version``, ``ops`` (op name ->
    list of dispatch keys with a kernel), ``threads``.
    """
    info: dict = {}
    if _BUILD_INFO_PATH.exists():
        info.update(json.loads(_BUILD_INFO_PATH.read_text()))
    info["loaded"] = has_ops()
    info["load_error"] = None if _LOAD_ERROR is None else str(_LOAD_ERROR)
    info["torch_runtime"] = torch.__version__
    info["threads"] = torch.get_num_threads()
    ops = {}
    if has_ops():
        for name in OP_NAMES:
            qualified = f"trigscan::{name}"
            ops[name] = [
                key
                for key in ("CPU", "CUDA", "Meta", "Autograd")
                if torch._C._dispatch_has_kernel_for_dispatch_key(qualified, key)
            ]
    info["ops"] = ops
    return info


# The public kernels, in the order the README documents them.
OP_NAMES = (
    "stamp",
    "stamp_backward",
    "nes_sample_stamp",
    "nes_sample_stamp_out",
    "nes_grad",
    "nes_samples",
    "pixel_stamp",
    "pixel_stamp_backward",
    "pixel_size_loss",
    "pixel_size_loss_backward",
)
