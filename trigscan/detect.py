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


def check_calibration_draws(draws) -> int:
    """The number of calibration draws: an int >= 0 (0: the paper's plain p-value)."""
    if not isinstance(draws, int) or isinstance(draws, bool) or draws < 0:
        raise ValueError(f"calibration_draws: expected an int >= 0 (0: the paper's plain p-value), "
                         f"got {draws!r}")
    return draws


def gamma_fit(samples):
    """Maximum-likelihood Gamma(shape, scale) with location 0 along the last axis:
    what ``scipy.stats.gamma.fit(x, floc=0)`` computes, vectorised over leading
    axes (the calibration below fits thousands of samples at once).

    Solves log(a) - digamma(a) = log(mean x) - mean(log x) by Minka's Newton
    iteration (converged to double precision after a handful of steps).
    Returns (shape, scale) arrays; a sample of equal values has shape inf.
    """
    from scipy import special

    x = np.asarray(samples, dtype=np.float64)
    mean = x.mean(axis=-1)
    gap = np.log(mean) - np.log(x).mean(axis=-1)  # >= 0 (AM-GM), 0 iff all equal
    degenerate = gap <= 1e-15
    gap = np.where(degenerate, 1.0, gap)
    shape = (3 - gap + np.sqrt((gap - 3) ** 2 + 24 * gap)) / (12 * gap)  # Minka's start
    for _ in range(8):
        excess = np.log(shape) - special.digamma(shape) - gap
        slope = 1 / shape - special.polygamma(1, shape)
        shape = 1 / (1 / shape + excess / (shape * shape * slope))
    shape = np.where(degenerate, math.inf, shape)
    return shape, np.where(degenerate, 0.0, mean / shape)


def _order_pvalues(statistics: np.ndarray):
    """The L-RED p-value of every row of [..., K] statistics -> (p, shape, scale).
    log G(r_max) is taken as log1p(-upper tail), exact where G rounds to 1."""
    from scipy import special

    r = np.sort(statistics, axis=-1)
    shape, scale = gamma_fit(r[..., :-1])
    degenerate = ~np.isfinite(shape)  # equal null values: pv 1 if the largest equals them, else 0
    with np.errstate(divide="ignore", invalid="ignore"):
        upper_tail = special.gammaincc(shape, r[..., -1] / scale)
        p = -np.expm1(r.shape[-1] * np.log1p(-upper_tail))
    p = np.where(degenerate, np.where(r[..., -1] == r[..., -2], 1.0, 0.0), np.maximum(p, 0.0))
    return p, shape, scale


def gamma_order_pvalue(statistics, calibration_draws: int = 0, seed: int = 0,
                       phi: float = 0.05) -> dict:
    """L-RED's test: fit a Gamma null (location 0) to every statistic but the
    largest, and return the order-statistic p-value of the largest,
    pv = 1 - G(r_max)^K with K the number of statistics.

    Returns {"p_value", "index" (of r_max), "shape", "scale"}; a p-value below
    double precision is 0, never NaN. Degenerate nulls (all equal, or so nearly
    that the fit degenerates) give pv = 1 when r_max equals them and 0 when it
    exceeds them.

    calibration_draws > 0 adds {"calibrated_p_value", "raw_level"}: the chance
    that K statistics drawn from the fitted null give a pv as small or smaller
    (the same fit-all-but-the-largest procedure on each draw; a Monte Carlo
    p-value, (1 + hits) / (1 + draws), seeded). Why: the null is fitted to the
    K - 1 smallest values, which understates its tail, so the plain pv is far
    below uniform under the null; for K = 10 Gamma statistics pv < 0.05 happens
    about a quarter of the time (docs/lred.md). The fit is scale-equivariant,
    so draws from Gamma(shape, 1) suffice. raw_level: the pv the calibration
    puts at `phi` (the draws' phi-quantile).
    """
    r = np.asarray(statistics, dtype=np.float64)
    if r.ndim != 1 or r.size < 3:
        raise ValueError(f"statistics: need a 1-D array of at least 3 values, got shape {r.shape}")
    if not np.all(np.isfinite(r)) or np.any(r <= 0):
        raise ValueError("statistics: must be finite and > 0")
    check_calibration_draws(calibration_draws)
    p_value, shape, scale = (float(v) for v in _order_pvalues(r))
    out = {"p_value": p_value, "index": int(np.argmax(r)), "shape": shape, "scale": scale}
    if calibration_draws and not math.isfinite(shape):  # degenerate null: nothing to draw from
        out.update(calibrated_p_value=p_value, raw_level=None)
    elif calibration_draws:
        draws = np.random.default_rng(seed).gamma(shape, 1.0, (calibration_draws, r.size))
        simulated, _, _ = _order_pvalues(draws)
        out["calibrated_p_value"] = float((1 + np.count_nonzero(simulated <= p_value)) / (1 + calibration_draws))
        out["raw_level"] = float(np.quantile(simulated, phi))
    return out
