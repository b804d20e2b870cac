"""DTInspector (Wang et al., "Confidence Matters"), white-box with the model's
own (possibly poisoned) training set, all labels in one batch.

1. Predict the training set; group it by predicted label z and sort each group
   by the softmax confidence of z (as its log-odds, which do not round to a
   tie near 1): the high set is the top K, the low set the bottom K (a group
   smaller than 2K is split in halves).
2. Per label, learn a mask/pattern patch on the high set that pushes the z-th
   probability to 0: minimise mean softmax(f(stamp(x)))_z^2 + lambda ||m||_1
   (or -log(1 - p_z) with loss="log"),
   lambda from 1e-4 under Neural Cleanse's schedule with 95% flips (prediction
   no longer z) as the success threshold; keep the smallest mask with >= 95%.
3. Transfer ratio r_z: the share of the low set that the patch moves off z.
4. Every r_z > 0.9: clean. Otherwise MAD over the ratios; labels below the
   median with index > 3.5 are infected. Our decision: the MAD is floored at
   1/K, one sample of the low set (ratios are counts out of K; without the
   floor, a majority of ratios at exactly 1.0 makes the MAD 0 and any label a
   single sample lower an infinite outlier).

A poisoned label's most confident samples carry the trigger, so the cheapest
patch breaks the trigger, which does nothing to clean low-confidence samples;
a clean label's patch is a universal perturbation that transfers.
"""
from __future__ import annotations

import dataclasses

import torch

from ..detect import mad_anomaly_index, mad_outliers
from ..result import Anomaly, ClassResult, ScanResult
from . import register
from .base import OptimizerConfig, RowImages, model_scores, slice_rows
from .nc import MaskPatternOptimizer


@dataclasses.dataclass
class DTInspectorConfig(OptimizerConfig):
    """Neural Cleanse's optimiser and schedule with DTInspector's constants."""

    k: int = 50  # |D_h| = |D_l|: images in the high and in the low set of each label
    init_cost: float = 1e-4  # lambda, from the start (not from 0)
    cost_start_at_zero: bool = False
    asr_threshold: float = 0.95  # flips on the high set the schedule keeps
    clean_ratio: float = 0.9  # every transfer ratio above this: clean
    anomaly_threshold: float = 3.5
    min_mad: float | None = None  # floor of the MAD of the ratios; None: 1/k (one sample)
    # "mse": the paper's p_z^2; "log": -log(1 - p_z), whose gradient does not vanish
    # when p_z rounds to 1 (a saturated high set leaves the MSE patch stuck)
    loss: str = "mse"

    def __post_init__(self):
        super().__post_init__()
        if self.min_mad is not None and not (isinstance(self.min_mad, (int, float)) and 0 <= self.min_mad <= 1):
            raise ValueError(f"min_mad: expected None or a value in [0, 1], got {self.min_mad!r}")
        if self.loss not in ("mse", "log"):
            raise ValueError(f"loss: expected 'mse' or 'log', got {self.loss!r}")
        if not isinstance(self.k, int) or isinstance(self.k, bool) or self.k < 1:
            raise ValueError(f"k: expected an int >= 1, got {self.k!r}")
        if not (isinstance(self.clean_ratio, (int, float)) and 0 <= self.clean_ratio <= 1):
            raise ValueError(f"clean_ratio: expected a value in [0, 1], got {self.clean_ratio!r}")


@dataclasses.dataclass
class ConfidenceSplit:
    """The high and low sets of every scannable label (indices into the images)."""

    labels: list[int]
    high: list[torch.Tensor]
    low: list[torch.Tensor]
    sizes: dict[int, int]  # images predicted as each candidate label
    halved: list[int]  # labels with fewer than 2K images, split in halves
    skipped: list[int]  # labels with fewer than 2 images: no patch, no ratio


def confidence_split(scores: torch.Tensor, k: int, classes: list[int]) -> ConfidenceSplit:
    """Group by predicted label, most confident first (ties in image order).

    scores: logits (or log-probabilities) [N, classes]; the ranking is by
    `confidence_log_odds`, which keeps the order of confidences that round to 1.
    """
    confidence, predicted = confidence_log_odds(scores)
    order = torch.sort(-confidence, stable=True).indices
    order = order[torch.sort(predicted[order], stable=True).indices]  # by label, then confidence
    counts = torch.bincount(predicted, minlength=scores.shape[1]).tolist()
    starts = [sum(counts[:z]) for z in range(len(counts))]
    split = ConfidenceSplit([], [], [], {}, [], [])
    for z in classes:
        group = order[starts[z]:starts[z] + counts[z]]
        split.sizes[z] = len(group)
        if len(group) < 2:
            split.skipped.append(z)
            continue
        size = k if len(group) >= 2 * k else len(group) // 2
        if size < k:
            split.halved.append(z)
        split.labels.append(z)
        split.high.append(group[:size])
        split.low.append(group[len(group) - size:])
    return split


def push_off_label(logits: torch.Tensor, labels: torch.Tensor, loss: str = "mse") -> torch.Tensor:
    """The patch's data term per image, [R, B] from logits [R, B, classes] and each row's label z.

    "mse": p_z^2 (the paper). "log": -log(1 - p_z) = -log sum_{j != z} p_j,
    taken from the log-softmax so that it stays finite, with a gradient, when
    p_z rounds to 1 in float32 (where p_z^2's gradient is 0).
    """
    index = labels.view(-1, 1, 1).expand(-1, logits.shape[1], 1)
    if loss == "mse":
        return logits.softmax(dim=2).gather(2, index).squeeze(2).square()
    return -logits.log_softmax(dim=2).scatter(2, index, -torch.inf).logsumexp(dim=2)


def flips(logits: torch.Tensor, labels: torch.Tensor, weight=None) -> torch.Tensor:
    """Images whose prediction is not the row's label, per row (padding excluded) -> float [R]."""
    moved = (logits.argmax(dim=2) != labels[:, None]).float()
    return moved.sum(dim=1) if weight is None else (moved * weight).sum(dim=1)


def confidence_log_odds(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log(p_z / (1 - p_z)) of each image's predicted label z, and z.

    Computed in float64 as z's logit minus the log-sum-exp of the others, it
    orders images exactly as p_z does; log p_z itself rounds to 0 once
    1 - p_z < 1e-16 (a logit margin of ~37, common on a trained model's
    poisoned samples), which would leave the most confident images in image
    order rather than by confidence.
    """
    scores = scores.double()
    top, predicted = scores.max(dim=1)
    others = scores.scatter(1, predicted[:, None], -torch.inf)
    return top - others.logsumexp(dim=1), predicted


@register("dtinspector")
class DTInspector(MaskPatternOptimizer):
    """DTInspector. `images` are the model's training set; `labels` (its
    training labels) are optional: the groups are by *predicted* label, and
    labels matter only to mitigation (``trigscan.mitigation``).
    Rows are the candidate labels; a row's "ASR" is its patch's flip ratio on
    the high set, its statistic the transfer ratio on the low set."""

    uses_training_set = True
    Config = DTInspectorConfig

    def _scan(self, model, images, labels, classes, seed, show, checkpoint=None):
        cfg = self.config
        split = confidence_split(model_scores(model, images), cfg.k, classes)
        if split.labels:
            self._split = split  # read by the hooks below during this scan
            try:
                result = super()._scan(model, images, labels, split.labels, seed, show, checkpoint)
            finally:
                del self._split
        else:
            result = ScanResult(method=self.name, backdoored=False, targets=[], per_class=[],
                                anomaly=self._verdict([])[1], config=self.get_params(), seed=seed,
                                elapsed_s=0.0)
        # every candidate label gets a row; those without a group are not inspected
        inspected = {c.target: (c, a) for c, a in zip(result.per_class, result.anomaly.values)}
        rows = [inspected.get(z, (ClassResult(
            target=z, statistic=1.0, asr=0.0, converged=False, steps=0,
            stop_reason=f"not inspected: {split.sizes[z]} training image(s) predicted as this label "
                        "(needs 2); ratio reported as 1, no evidence"), 0.0)) for z in classes]
        result.per_class = [c for c, _ in rows]
        result.anomaly.values = [a for _, a in rows]
        if labels is None:
            result.notes.append("no labels given: detection groups by predicted label as always; "
                                "mitigation treats each image's predicted label as its label")
        if split.halved:
            result.notes.append(f"labels {split.halved} have fewer than 2K = {2 * cfg.k} predicted "
                                "images: their group is split in halves (high = top half, low = bottom half)")
        if split.skipped:
            result.notes.append(f"labels {split.skipped} have fewer than 2 predicted images: not "
                                "inspected (no patch, ratio reported as 1), left out of the test")
        result.anomaly.details.update(
            images_per_label={str(z): n for z, n in split.sizes.items()},
            high_size={str(z): len(h) for z, h in zip(split.labels, split.high)},
            low_size={str(z): len(lo) for z, lo in zip(split.labels, split.low)},
            halved=split.halved, skipped=split.skipped)
        return result

    # -- driver hooks (rows are labels; "targets" are the labels z) ----------
    def _victims(self, images, labels, targets, sources) -> RowImages:
        return RowImages.per_row(images, self._split.high, "labels")

    def _batch_loss(self, model, params, batch, targets, cost):
        trigger = self._trigger(params)
        logits = self._logits(model, trigger, batch.x)
        loss = push_off_label(logits, targets, self.config.loss).mean(dim=1) + cost * self._size(trigger)
        return loss, flips(logits, targets, batch.weight)

    def _success(self, model, trigger, batch, targets):
        return flips(self._logits(model, trigger, batch.x), targets, batch.weight)

    def _statistic(self, model, data, trigger, targets, asr):
        """Transfer ratio: the kept patch on the low set."""
        low = RowImages.per_row(data.images, self._split.low, "labels")
        return self._evaluate(model, low, targets.shape[0], lambda sl, batch: self._success(
            model, slice_rows(trigger, sl), batch, targets[sl]))

    def _verdict(self, per_row: list[ClassResult]) -> tuple[list[int], Anomaly]:
        """All ratios > clean_ratio: clean. Otherwise MAD, low side; a patch that
        never reached the flip threshold counts for the median, is never flagged.
        Fewer than 2 inspected labels: nothing to compare, clean."""
        cfg = self.config
        ratios = [c.statistic for c in per_row]
        min_mad = 1 / cfg.k if cfg.min_mad is None else cfg.min_mad
        if len(ratios) < 2:
            rule, flagged, values = "fewer than 2 labels inspected: no comparison, clean", [], [0.0] * len(ratios)
        else:
            values = mad_anomaly_index(ratios, min_mad).tolist()
            if all(r > cfg.clean_ratio for r in ratios):
                rule, flagged = "all ratios > clean_ratio: clean", []
            else:
                rule = "MAD over transfer ratios"
                flagged = mad_outliers(ratios, cfg.anomaly_threshold, "low",
                                       eligible=[c.converged for c in per_row], min_mad=min_mad)
        anomaly = Anomaly(kind="mad", values=values, threshold=cfg.anomaly_threshold, side="low",
                          details={"rule": rule, "clean_ratio": cfg.clean_ratio, "min_mad": min_mad})
        return [per_row[i].target for i in flagged], anomaly
