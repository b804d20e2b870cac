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

When the scan is over, the scanner saves its final state once more with
``"complete": True`` and leaves the file in place: running the same scan again
returns the same result at once (it only recomputes the final evaluation), and
a multi-method run killed in its second method does not redo the first. Delete
the file (or ``clear()``) to scan from scratch.

Conventions for a scanner's state (helpers below):
- live tensors created the usual way before the loop are overwritten in place
  with ``restore_into`` (shapes checked, device and dtype kept);
- optimisers (``trigscan.optim.Adam``, whose layout is torch.optim's):
  ``optimizer.state_dict()`` / ``load_state_dict()`` (Adam moments and step
  counts are plain tensors);
- ``torch.Generator``: ``generator.get_state()`` (a uint8 tensor) /
  ``set_state()``;
- objects whose state is exactly their tensor attributes (the cost schedule,
  the best-trigger tracker): ``tensor_fields`` / ``load_fields``;
- wrap the restoring code in ``with checkpoint.restoring():`` so that a state
  that does not fit (a damaged or hand-edited file) is refused with a clear
  error instead of a KeyError deep inside the scan.

Cost: one ``torch.save`` of the state plus an fsync per step. ``min_interval``
(seconds, default 0: every step) spaces the saves out for scans whose steps
are much cheaper than a save; a kill then loses at most that much work.
"""
from __future__ import annotations

import hashlib
import contextlib
import os
import time
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
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # 0-d: reshape first
    return h.hexdigest()


def module_digest(module) -> str | None:
    """sha256 of a torch module's named parameters and buffers: identifies a
    white-box model. None for anything else (a query-only model has no weights
    to read)."""
    if not isinstance(module, torch.nn.Module):
        return None
    state = module.state_dict()
    names = sorted(state)
    return tensor_digest(*(state[n] for n in names)) + ":" + hashlib.sha256("\0".join(names).encode()).hexdigest()[:16]


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
    """State of one scan in one file. ``fingerprint`` must identify the scan.

    min_interval: ``save`` skips the write when the last one is less than this
    many seconds old (``force=True`` always writes).
    """

    def __init__(self, path, fingerprint: dict | None = None, *, min_interval: float = 0.0):
        if not (isinstance(min_interval, (int, float)) and min_interval >= 0):
            raise ValueError(f"min_interval: expected seconds >= 0, got {min_interval!r}")
        self.path = Path(path)
        self.fingerprint = _plain(fingerprint or {})
        self.min_interval = float(min_interval)
        self._saved_at = -float("inf")

    def load(self) -> dict | None:
        if not self.path.exists():
            return None
        try:
            blob = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception:  # truncated, damaged or foreign file
            # (torch's own message for a refused pickle suggests weights_only=False: not for untrusted files)
            raise CheckpointMismatch(f"checkpoint {self.path}: unreadable (truncated, damaged, or holding more "
                                     "than tensors and plain data); delete it to start over") from None
        if not isinstance(blob, dict) or blob.get("format") != FORMAT or not isinstance(blob.get("state"), dict):
            raise CheckpointMismatch(f"checkpoint {self.path}: not a trigscan checkpoint; delete it to start over")
        if blob.get("fingerprint") != self.fingerprint:
            theirs = blob.get("fingerprint") or {}
            differ = sorted(k for k in set(theirs) | set(self.fingerprint)
                            if theirs.get(k) != self.fingerprint.get(k))
            raise CheckpointMismatch(f"checkpoint {self.path}: written by a different scan "
                                     f"(differs in {', '.join(differ)}); delete it or use another --out")
        return blob["state"]

    def save(self, state: dict, *, force: bool = False) -> bool:
        """Write `state` (returns False when skipped for min_interval)."""
        now = time.monotonic()
        if not force and now - self._saved_at < self.min_interval:
            return False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "wb") as f:
            torch.save({"format": FORMAT, "fingerprint": self.fingerprint, "state": state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)  # atomic: a kill leaves the old or the new file, never half of one
        self._saved_at = now
        return True

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)

    @contextlib.contextmanager
    def restoring(self):
        """Refuse, clearly, a state that does not fit the scan restoring it."""
        try:
            yield
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError, AttributeError) as e:
            if isinstance(e, CheckpointMismatch):
                raise
            raise CheckpointMismatch(f"checkpoint {self.path}: its state does not fit this scan "
                                     f"({type(e).__name__}: {e}); delete it to start over") from None


# ---------------------------------------------------------------------------
# Saving and restoring scan state
# ---------------------------------------------------------------------------
def restore_into(live: dict[str, torch.Tensor], saved: dict) -> None:
    """Copy saved tensors into the live ones in place (the live tensors keep
    their device and dtype; a shape that differs is an error)."""
    for name, tensor in live.items():
        value = saved[name]
        if not isinstance(value, torch.Tensor) or value.shape != tensor.shape:
            raise ValueError(f"{name}: saved {getattr(value, 'shape', type(value).__name__)}, "
                             f"expected shape {tuple(tensor.shape)}")
        with torch.no_grad():
            tensor.copy_(value)


def to_device(value: Any, device) -> Any:
    """The same nested dicts/lists with every tensor moved to `device`."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, list):
        return [to_device(v, device) for v in value]
    return value


def tensor_fields(obj) -> dict[str, Any]:
    """An object's tensor attributes and dicts of tensors: its state, for objects
    whose other attributes are configuration (restore with ``load_fields``)."""
    def is_state(v):
        return isinstance(v, torch.Tensor) or (
            isinstance(v, dict) and all(isinstance(t, torch.Tensor) for t in v.values()))
    return {name: value for name, value in vars(obj).items() if is_state(value)}


def load_fields(obj, state: dict, device) -> None:
    """Set the attributes ``tensor_fields`` saved, on `device`; every one must be there."""
    for name in tensor_fields(obj):
        if name not in state:
            raise KeyError(f"{type(obj).__name__}.{name}")
        setattr(obj, name, to_device(state[name], device))
