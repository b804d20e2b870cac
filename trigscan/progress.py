"""Progress of a scan: the bar a person sees on a terminal, and events for logs.

Every scanner makes its bar with ``scanners.base.progress_bar``, which returns a
:class:`Bar`. A ``Bar`` draws a tqdm bar on stderr when asked to (``show``) and,
independently, sends events to the functions registered with :func:`listen`
(the CLI's ``--log jsonl`` mode, a scheduler's per-task log):

    {"event": "bar_start", "bar": "nc (10 classes)", "total": 300}
    {"event": "bar", "bar": ..., "step": 40, "total": 300, "elapsed_s": 3.1,
     "eta_s": 20.2, "found": 2, ...}          # the scanner's postfix fields
    {"event": "bar_end", "bar": ..., "step": 300, "total": 300, "elapsed_s": 24.0}

"bar" events come at most once per ``interval`` seconds per bar (default 1).
"""
from __future__ import annotations

import contextlib
import math
import sys
import time
from typing import Callable

from tqdm.auto import tqdm

_listeners: list[Callable[[dict], None]] = []


@contextlib.contextmanager
def listen(fn: Callable[[dict], None]):
    """Call ``fn(event)`` for every progress event while the block runs."""
    _listeners.append(fn)
    try:
        yield fn
    finally:
        _listeners.remove(fn)


def emit(event: dict) -> None:
    for fn in list(_listeners):
        fn(event)


class Bar:
    """tqdm's interface as the scanners use it: update, set_postfix, close."""

    interval = 1.0

    def __init__(self, total: int, desc: str, show: bool):
        self.total, self.desc, self.n = int(total), desc, 0
        self.postfix: dict = {}
        self._bar = (tqdm(total=total, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True)
                     if show else None)
        self._started = time.monotonic()
        self._sent = -math.inf
        if _listeners:
            emit({"event": "bar_start", "bar": desc, "total": self.total})

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        now = time.monotonic()
        if _listeners and (now - self._sent >= self.interval or self.n >= self.total):
            self._sent = now
            elapsed = now - self._started
            eta = elapsed / self.n * (self.total - self.n) if self.n else None
            emit({"event": "bar", "bar": self.desc, "step": self.n, "total": self.total,
                  "elapsed_s": round(elapsed, 3), "eta_s": None if eta is None else round(eta, 3),
                  **self.postfix})

    def set_postfix(self, **fields) -> None:
        self.postfix = fields
        if self._bar is not None:
            self._bar.set_postfix(**fields)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if _listeners:
            emit({"event": "bar_end", "bar": self.desc, "step": self.n, "total": self.total,
                  "elapsed_s": round(time.monotonic() - self._started, 3), **self.postfix})
