"""The scanner registry: every method registers its class under a short name.

``get("nc")`` returns the class; ``available()`` lists the names.  Each scanner
class has ``access`` ("white" needs gradients, "black" only queries),
``needs_labels`` (True when the images must come with labels),
``uses_training_set`` (DTInspector: it inspects the model's training set) and
``uses_images`` (False for B3D-SS, which makes its own noise inputs);
``scan_data`` reads them in one place for every caller that feeds scanners.
"""
from __future__ import annotations

_REGISTRY: dict[str, type] = {}


def register(name: str):
    def decorator(cls):
        if name in _REGISTRY:
            raise ValueError(f"scanner {name!r} is registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorator


def get(name: str) -> type:
    key = name.lower()
    if key not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY)) or "none yet"
        raise ValueError(f"method: unknown scanner {name!r} (known: {known})")
    return _REGISTRY[key]


def available() -> list[str]:
    return sorted(_REGISTRY)


def scan_data(cls) -> str:
    """What a scanner class scans: ``"training"`` (the model's training set with its
    labels), ``"none"`` (no images: it makes its own inputs) or ``"clean"`` (clean
    images, with labels when it ``needs_labels``)."""
    if getattr(cls, "uses_training_set", False):
        return "training"
    if not getattr(cls, "uses_images", True):
        return "none"
    return "clean"
