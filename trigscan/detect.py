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


def mad_anomaly_index(values, min_mad: float = 0.0) -> np.ndarray:
    """A_k = |s_k - median| / (1.4826 * max(median(|s - median|), min_mad)).

    min_mad: a floor on the median absolute deviation, for statistics with a
    resolution (DTInspector's ratios are counts out of K: a deviation below
    1/K is no agreement finer than one sample).
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
    mad = MAD_CONSISTENCY * max(true_median(deviation), min_mad)
    if mad == 0:
        return np.where(deviation == 0, 0.0, math.inf)
    return deviation / mad


def mad_outliers(values, threshold: float = 2.0, side: str = "low", eligible=None,
                 min_mad: float = 0.0) -> list[int]:
    """Indices whose anomaly index exceeds `threshold` on `side` of the median.

    side: "low" (small statistics are suspicious, e.g. trigger size), "high", or
    "both". eligible: optional boolean mask; ineligible entries (e.g. inversions
    that never reached the success threshold) count for the median but are never
    flagged.
    """
    if side not in ("low", "high", "both"):
        raise ValueError(f"side: expected 'low', 'high' or 'both', got {side!r}")
    s = np.asarray(values, dtype=np.float64)
    index = mad_anomaly_index(s, min_mad)
    med = true_median(s)
    on_side = {"low": s < med, "high": s > med, "both": np.ones_like(s, dtype=bool)}[side]
    flagged = on_side & (index > threshold)
    if eligible is not None:
        flagged &= np.asarray(eligible, dtype=bool)
    return [int(i) for i in np.flatnonzero(flagged)]


def gamma_order_pvalue(statistics) -> dict:
    """L-RED's test: fit a Gamma null (location 0) to every statistic but the
    largest, and return the order-statistic p-value of the largest,
    pv = 1 - G(r_max)^K with K the number of statistics.

    Returns {"p_value", "index" (of r_max), "shape", "scale"}. Computed in log
    space, so a p-value below double precision is reported as 0, never NaN.
    Degenerate nulls (all equal) give pv = 1 when r_max equals them and 0 when
    it exceeds them.
    """
    from scipy import stats

    r = np.asarray(statistics, dtype=np.float64)
    if r.ndim != 1 or r.size < 3:
        raise ValueError(f"statistics: need a 1-D array of at least 3 values, got shape {r.shape}")
    if not np.all(np.isfinite(r)) or np.any(r <= 0):
        raise ValueError("statistics: must be finite and > 0")
    top = int(np.argmax(r))
    null = np.delete(r, top)
    if np.ptp(null) == 0:
        return {"p_value": 1.0 if r[top] == null[0] else 0.0, "index": top,
                "shape": math.inf, "scale": 0.0}
    shape, _, scale = stats.gamma.fit(null, floc=0)
    log_cdf = float(stats.gamma.logcdf(r[top], shape, loc=0, scale=scale))
    p_value = float(-np.expm1(r.size * log_cdf))
    return {"p_value": max(0.0, p_value), "index": top, "shape": float(shape),
            "scale": float(scale)}
