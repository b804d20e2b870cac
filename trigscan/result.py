"""The result every scanner returns: one format for all methods."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ClassResult:
    """The outcome of one inversion (one candidate target class, or one pair)."""

    target: int
    statistic: float  # the method's per-class statistic (e.g. mask L1 norm)
    asr: float  # attack success rate the best trigger reached on the scan images
    converged: bool  # reached the method's success threshold
    steps: int
    queries: int = 0  # model queries (images sent); black-box methods only
    stop_reason: str = ""
    source: int | None = None  # victim class in label-pair modes
    trigger: dict[str, Any] = field(default_factory=dict)  # name -> tensor (mask, pattern, ...)

    def to_dict(self) -> dict:
        return {
            "class": self.target,
            "source": self.source,
            "statistic": self.statistic,
            "asr": self.asr,
            "converged": self.converged,
            "steps": self.steps,
            "queries": self.queries,
            "stop_reason": self.stop_reason,
        }


@dataclass
class Anomaly:
    """The anomaly test over the per-class statistics."""

    kind: str  # "mad" or "gamma"
    values: list[float]  # anomaly index (MAD) or statistic per class
    threshold: float
    side: str = "low"  # which side of the median counts ("low", "high")
    p_value: float | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "values": list(self.values),
            "threshold": self.threshold,
            "side": self.side,
            "p_value": self.p_value,
            "details": dict(self.details),
        }


@dataclass
class ScanResult:
    method: str
    backdoored: bool
    targets: list[int]
    per_class: list[ClassResult]
    anomaly: Anomaly
    config: dict[str, Any]
    seed: int
    elapsed_s: float
    queries: int = 0
    partial: bool = False  # stopped early (budget exhausted, interrupted)
    notes: list[str] = field(default_factory=list)

    @property
    def statistics(self) -> list[float]:
        return [c.statistic for c in self.per_class]

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "backdoored": self.backdoored,
            "targets": list(self.targets),
            "per_class": [c.to_dict() for c in self.per_class],
            "anomaly": self.anomaly.to_dict(),
            "config": dict(self.config),
            "seed": self.seed,
            "elapsed_s": self.elapsed_s,
            "queries": self.queries,
            "partial": self.partial,
            "notes": list(self.notes),
        }
