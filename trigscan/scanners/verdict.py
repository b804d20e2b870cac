"""Turning per-class inversion results into a ScanResult with a MAD verdict."""
from __future__ import annotations

from ..detect import mad_anomaly_index, mad_outliers
from ..result import Anomaly, ClassResult, ScanResult


def mad_verdict(scanner, per_class: list[ClassResult], classes: list[int], side: str,
                seed: int) -> ScanResult:
    """Flag classes whose statistic is a MAD outlier on `side` (threshold from the
    scanner's config); inversions that never converged are never flagged. The
    model is backdoored iff any class is flagged."""
    threshold = scanner.config.anomaly_threshold
    statistics = [c.statistic for c in per_class]
    flagged = mad_outliers(statistics, threshold, side, eligible=[c.converged for c in per_class])
    anomaly = Anomaly(kind="mad", values=mad_anomaly_index(statistics).tolist(),
                      threshold=threshold, side=side)
    return ScanResult(method=scanner.name, backdoored=bool(flagged),
                      targets=[classes[i] for i in flagged], per_class=per_class, anomaly=anomaly,
                      config=scanner.get_params(), seed=seed, elapsed_s=0.0)
