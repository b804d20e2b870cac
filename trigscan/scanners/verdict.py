"""The MAD verdict every white-box method and B3D take over per-class statistics."""
from __future__ import annotations

from ..detect import mad_anomaly_index, mad_outliers
from ..result import Anomaly, ClassResult, ScanResult


def mad_test(statistics, converged, threshold: float, side: str, **details) -> tuple[list[int], Anomaly]:
    """The rule: entries whose MAD anomaly index exceeds `threshold` on `side`
    are flagged, except those whose inversion never converged (they count for
    the median but are no evidence). Returns the flagged indices and the Anomaly
    (kind "mad", the anomaly index of every entry; `details` go into it)."""
    flagged = mad_outliers(statistics, threshold, side, eligible=converged)
    anomaly = Anomaly(kind="mad", values=mad_anomaly_index(statistics).tolist(), threshold=threshold,
                      side=side, details=dict(details))
    return flagged, anomaly


def mad_verdict(scanner, per_class: list[ClassResult], classes: list[int], side: str,
                seed: int) -> ScanResult:
    """A ScanResult whose verdict is ``mad_test`` over the classes' statistics
    (threshold from the scanner's config). The model is backdoored iff any
    class is flagged."""
    flagged, anomaly = mad_test([c.statistic for c in per_class], [c.converged for c in per_class],
                                scanner.config.anomaly_threshold, side)
    return ScanResult(method=scanner.name, backdoored=bool(flagged),
                      targets=[classes[i] for i in flagged], per_class=per_class, anomaly=anomaly,
                      config=scanner.get_params(), seed=seed, elapsed_s=0.0)
