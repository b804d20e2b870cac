"""The scanner registry: every method registers its class under a short name.

``get("nc")`` returns the class; ``available()`` lists the names.  Each scanner
class has ``access`` ("white" needs gradients, "black" only queries) and
``needs_labels`` (True when the images must come with labels); DTInspector
says ``uses_training_set`` (it inspects the model's training set).
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
