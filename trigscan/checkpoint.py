"""Resumable scan state: one file per scan, rewritten atomically after each step.

A scanner given ``checkpoint=Checkpoint(path, fingerprint)`` calls ``load()``
once before its loop (None: start fresh; a dict: the state it saved last) and
``save(state)`` after every completed step. The state holds everything the next
step reads — trigger variables, optimiser moments, cost schedule, best
triggers, step counters, generator states — so a resumed scan is bitwise the
scan that was never interrupted. A kill loses at most the step in flight.

Files are read with ``torch.load(weights_only=True)``: tensors, numbers,
strings, lists and dicts only, never arbitrary pickled objects. The
fingerprint (method, options, seed, classes, data digest, ...) is stored beside
the state; a file written by a different scan is refused, not silently mixed in.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch

FORMAT = 1


class CheckpointMismatch(ValueError):
    """The checkpoint file belongs to a different scan (other method, options, seed or data)."""


def tensor_digest(*tensors: torch.Tensor) -> str:
    """sha256 of tensors' shapes, dtypes and bytes: identifies the scanned data."""
    h = hashlib.sha256()
    for t in tensors:
        if t is None:
            h.update(b"none")
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _plain(value: Any) -> Any:
    """Fingerprints compare as JSON-like values (tuples become lists)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return repr(value)


class Checkpoint:
    """State of one scan in one file. ``fingerprint`` must identify the scan."""

    def __init__(self, path, fingerprint: dict | None = None):
        self.path = Path(path)
        self.fingerprint = _plain(fingerprint or {})

    def load(self) -> dict | None:
        if not self.path.exists():
            return None
        try:
            blob = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated or foreign file
            raise CheckpointMismatch(f"checkpoint {self.path}: unreadable ({e}); delete it to start over") from None
        if not isinstance(blob, dict) or blob.get("format") != FORMAT or "state" not in blob:
            raise CheckpointMismatch(f"checkpoint {self.path}: not a trigscan checkpoint; delete it to start over")
        if blob.get("fingerprint") != self.fingerprint:
            theirs = blob.get("fingerprint") or {}
            differ = sorted(k for k in set(theirs) | set(self.fingerprint)
                            if theirs.get(k) != self.fingerprint.get(k))
            raise CheckpointMismatch(f"checkpoint {self.path}: written by a different scan "
                                     f"(differs in {', '.join(differ)}); delete it or use another --out")
        return blob["state"]

    def save(self, state: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "wb") as f:
            torch.save({"format": FORMAT, "fingerprint": self.fingerprint, "state": state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)  # atomic: a kill leaves the old or the new file, never half of one

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)
