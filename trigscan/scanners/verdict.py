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


def convergence_notes(per_class: list[ClassResult]) -> list[str]:
    """What a reader of the verdict must know about rows whose inversion never
    reached the success threshold: they cannot be flagged, so a "clean" verdict
    with none converged means nothing was found, not that nothing is there."""
    missed = [c for c in per_class if not c.converged]
    if not missed:
        return []
    label = (lambda c: f"{c.source}->{c.target}") if per_class[0].source is not None else (lambda c: str(c.target))
    if len(missed) == len(per_class):
        return ["no row reached the success threshold: none could be flagged, so the verdict is "
                "inconclusive (raise max_steps, or check the images and the model)"]
    return [f"{len(missed)} of {len(per_class)} rows never reached the success threshold and cannot be "
            f"flagged (they count for the median only): {', '.join(label(c) for c in missed)}"]


def mad_verdict(scanner, per_class: list[ClassResult], classes: list[int], side: str,
                seed: int) -> ScanResult:
    """A ScanResult whose verdict is ``mad_test`` over the classes' statistics
    (threshold from the scanner's config). The model is backdoored iff any
    class is flagged."""
    flagged, anomaly = mad_test([c.statistic for c in per_class], [c.converged for c in per_class],
                                scanner.config.anomaly_threshold, side)
    return ScanResult(method=scanner.name, backdoored=bool(flagged),
                      targets=[classes[i] for i in flagged], per_class=per_class, anomaly=anomaly,
                      config=scanner.get_params(), seed=seed, elapsed_s=0.0, notes=convergence_notes(per_class))
