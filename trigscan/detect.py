"""Anomaly statistics over per-class scan statistics, and the verdict rules.

Pure functions over 1-D arrays; no model, no torch required.
"""
from __future__ import annotations

import math

import numpy as np

MAD_CONSISTENCY = 1.4826  # makes MAD estimate the standard deviation of a normal


def true_median(values) -> float:
    """The median, averaging the two middle values when the count is even."""
    v = np.sort(np.asarray(values, dtype=np.float64))
    if v.size == 0:
        raise ValueError("values: need at least one value for a median")
    mid = v.size // 2
    return float(v[mid]) if v.size % 2 else float((v[mid - 1] + v[mid]) / 2)


def mad_anomaly_index(values) -> np.ndarray:
    """A_k = |s_k - median| / (1.4826 * median(|s - median|)).

    MAD = 0 guard: when more than half of the values are equal, MAD is 0; the
    values equal to the median then get index 0 and any other value +inf (it
    stands out from an exactly-agreeing majority). All equal -> all 0.
    """
    s = np.asarray(values, dtype=np.float64)
    if s.ndim != 1 or s.size < 2:
        raise ValueError(f"values: need a 1-D array of at least 2 statistics, got shape {s.shape}")
    if not np.all(np.isfinite(s)):
        raise ValueError("values: statistics must be finite")
    med = true_median(s)
    deviation = np.abs(s - med)
    mad = MAD_CONSISTENCY * true_median(deviation)
    if mad == 0:
        return np.where(deviation == 0, 0.0, math.inf)
    return deviation / mad


def mad_outliers(values, threshold: float = 2.0, side: str = "low", eligible=None) -> list[int]:
    """Indices whose anomaly index exceeds `threshold` on `side` of the median.

    side: "low" (small statistics are suspicious, e.g. trigger size), "high", or
    "both". eligible: optional boolean mask; ineligible entries (e.g. inversions
    that never reached the success threshold) count for the median but are never
    flagged.
    """
    if side not in ("low", "high", "both"):
        raise ValueError(f"side: expected 'low', 'high' or 'both', got {side!r}")
    s = np.asarray(values, dtype=np.float64)
    index = mad_anomaly_index(s)
    med = true_median(s)
    on_side = {"low": s < med, "high": s > med, "both": np.ones_like(s, dtype=bool)}[side]
    flagged = on_side & (index > threshold)
    if eligible is not None:
        flagged &= np.asarray(eligible, dtype=bool)
    return [int(i) for i in np.flatnonzero(flagged)]
