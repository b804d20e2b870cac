"""PixelBackdoor ("Better Trigger Inversion Optimization in Backdoor Scanning",
Tao et al., CVPR 2022), white-box, every inversion in one batch.

No mask: per inversion two variables b_p, b_n in R^{C x H x W} raise and lower
pixels, x' = clip(x + P(b_p) - P(b_n), 0, maxp) with P(b) = clip(b maxp, 0, maxp)
(clip form, the paper's eq. 6, default) or P(b) = g(b) maxp (tanh form, eq. 4).
Loss: CE(f(x'), t) + alpha L_pixel, L_pixel = sum_{h,w} max_c g(b_p / gamma) +
sum_{h,w} max_c g(b_n / gamma) (eq. 5), alpha adjusted by the success rate.

After every step the perturbations P(b) below `prune_threshold` (1/255) are
zeroed in the candidate trigger; it becomes the new best when the step's
success rate is >= asr_threshold and it lowers both L_pixel and the number of
perturbed pixel locations, and then the pruned trigger is written back into
b_p, b_n. Statistic: the number of perturbed locations (h, w) of the best
trigger; MAD, low side.

Modes: "universal" (one inversion per target class; victims are the scan
images, without the target class's own images when labels are given) and
"pair" (one inversion per ordered pair of candidate classes, victims are the
source class's images; needs labels).
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from .. import ops
from ..reference import pixel_perturbation
from . import register
from .base import OptimizerConfig, RowImages, TriggerOptimizer, stamped_logits, target_ce, target_hits
from .verdict import mad_test


@dataclasses.dataclass
class PixelConfig(OptimizerConfig):
    """PixelBackdoor's options; defaults from the official code (see docs/scanners.md).

    mode: "universal" or "pair". pair_verdict (pair mode): "pairs" flags
    anomalously small (source, target) pairs by MAD over all pairs; "targets"
    takes each target's median over its sources and flags targets by MAD over
    the K medians. statistic: "count" (perturbed pixel locations, the paper's
    measure) or "log_count" (ln(1 + count): MAD on a log scale, where a count
    of 2 among counts of 20-60 stands out). use_tanh: the paper's eq. 4 instead of the clip
    form. maxp: the largest pixel value (1 for [0, 1] images). gamma: the slope
    divisor in L_pixel. prune_threshold: perturbations below it are zeroed.
    """

    init_cost: float = 1e-3
    cost_start_at_zero: bool = False
    asr_threshold: float = 0.9
    patience: int = 10
    cost_up: float = 1.5
    cost_down: float = 1.5 ** 1.5
    early_stop_patience: int | None = None
    mode: str = "universal"
    pair_verdict: str = "pairs"
    statistic: str = "count"
    use_tanh: bool = False
    maxp: float = 1.0
    gamma: float = 10.0
    prune_threshold: float = 1 / 255

    def __post_init__(self):
        super().__post_init__()
        if self.mode not in ("universal", "pair"):
            raise ValueError(f"mode: expected 'universal' or 'pair', got {self.mode!r}")
        if self.statistic not in ("count", "log_count"):
            raise ValueError(f"statistic: expected 'count' or 'log_count', got {self.statistic!r}")
        if self.pair_verdict not in ("pairs", "targets"):
            raise ValueError(f"pair_verdict: expected 'pairs' or 'targets', got {self.pair_verdict!r}")
        for name in ("maxp", "gamma"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name}: expected a finite number > 0, got {value!r}")
        if not 0 <= self.prune_threshold < self.maxp:
            raise ValueError(f"prune_threshold: expected a value in [0, maxp), got {self.prune_threshold!r}")


def perturbed_locations(trigger) -> torch.Tensor:
    """Pixel locations (h, w) where the kept trigger changes any channel -> float [R]."""
    delta = trigger["positive"] - trigger["negative"]
    return (delta.abs().sum(dim=1) > 0).sum(dim=(1, 2)).float()


@register("pixel")
class PixelBackdoor(TriggerOptimizer):
    """PixelBackdoor. Options (defaults from the official code): lr 0.1, betas
    (0.5, 0.9), batch_size 32, max_steps 1000 with no early stop,
    asr_threshold 0.9, init_cost (alpha) 1e-3 from the start, patience 10,
    cost_up 1.5, cost_down 1.5^1.5, gamma 10, prune_threshold 1/255,
    use_tanh False, mode "universal" (or "pair": needs labels),
    anomaly_threshold 2 (MAD over the pixel counts, low side)."""

    Config = PixelConfig
    best_criteria = 2  # L_pixel and the pixel count must both drop

    # -- rows and their images -------------------------------------------------
    def _rows(self, classes, labels):
        if self.config.mode == "universal":
            return torch.tensor(classes), None
        if labels is None:
            raise ValueError("labels: mode='pair' needs the labels of the images "
                             "(the victims of pair s -> t are the images of class s)")
        pairs = [(s, t) for s in classes for t in classes if s != t]
        return torch.tensor([t for _, t in pairs]), torch.tensor([s for s, _ in pairs])

    def _victims(self, images, labels, targets, sources):
        if labels is None:
            return RowImages(images)
        if sources is None:
            lists = {t: (labels != t).nonzero().flatten() for t in targets.tolist()}
            return RowImages.per_row(images, [lists[t] for t in targets.tolist()],
                                     "a victim (an image of another class) of target class(es)")
        lists = {s: (labels == s).nonzero().flatten() for s in sources.unique().tolist()}
        empty = [s for s, ix in lists.items() if len(ix) == 0]
        if empty:
            raise ValueError(f"labels: mode='pair' needs images of every candidate class; "
                             f"none of class(es) {empty}")
        return RowImages.per_row(images, [lists[s] for s in sources.tolist()], "pair rows")

    # -- the trigger ---------------------------------------------------------------
    def _init_params(self, k, image_shape, generator):
        return {"b_p": torch.rand((k, *image_shape), generator=generator),
                "b_n": torch.rand((k, *image_shape), generator=generator)}

    def _stamp(self, x, b_p, b_n):
        return ops.pixel_stamp(x, b_p, b_n, self.config.maxp, self.config.use_tanh)

    def _trigger(self, params):
        """The pruned perturbations (pixel units) P(b_p), P(b_n)."""
        cfg = self.config
        trigger = {}
        for name, key in (("positive", "b_p"), ("negative", "b_n")):
            value = pixel_perturbation(params[key], cfg.maxp, cfg.use_tanh)
            trigger[name] = torch.where(value < cfg.prune_threshold, torch.zeros_like(value), value)
        return trigger

    def _size(self, trigger):
        return perturbed_locations(trigger)

    def _statistic(self, model, data, trigger, targets, asr):
        count = perturbed_locations(trigger)
        return torch.log1p(count) if self.config.statistic == "log_count" else count

    def _best_key(self, params, trigger):
        size_loss = ops.pixel_size_loss(params["b_p"], params["b_n"], self.config.gamma)
        return torch.stack([size_loss, perturbed_locations(trigger)], dim=1)

    def _adopt(self, params, rows, trigger):
        """Write the pruned best trigger back into the variables. Clip form:
        b = P(b) / maxp (pruned entries 0). Tanh form: g cannot reach 0, so a
        pruned entry is lowered to where its perturbation is half the threshold
        (it stays below the threshold but can still recover)."""
        cfg = self.config
        for name, key in (("positive", "b_p"), ("negative", "b_n")):
            kept = trigger[name]
            if cfg.use_tanh:
                floor = math.atanh(max(-1.0, cfg.prune_threshold / cfg.maxp - 1.0 + 1e-12))
                current = params[key][rows]
                params[key][rows] = torch.where(kept == 0, torch.clamp(current, max=floor), current)
            else:
                params[key][rows] = kept / cfg.maxp

    # -- losses and evaluation -----------------------------------------------------
    def _batch_loss(self, model, params, batch, targets, cost):
        logits = stamped_logits(model, self._stamp, batch.x, params["b_p"], params["b_n"])
        size_loss = ops.pixel_size_loss(params["b_p"], params["b_n"], self.config.gamma)
        return target_ce(logits, targets) + cost * size_loss, target_hits(logits, targets, batch.weight)

    def _success(self, model, trigger, batch, targets):
        """Success of the kept (pruned) perturbations, stamped exactly: clip form
        of P / maxp, i.e. x' = clip(x + positive - negative, 0, maxp)."""
        maxp = self.config.maxp
        stamp = lambda x, p, n: ops.pixel_stamp(x, p, n, maxp, False)  # noqa: E731
        logits = stamped_logits(model, stamp, batch.x, trigger["positive"] / maxp,
                                trigger["negative"] / maxp)
        return target_hits(logits, targets, batch.weight)

    def _verdict(self, per_row):
        """Universal mode and pair_verdict="pairs": MAD over the rows (base rule).
        pair_verdict="targets": per target, the median pixel count over its
        source classes (only sources whose inversion converged; none -> the
        median of all), then MAD over the targets, low side."""
        if self.config.mode != "pair" or self.config.pair_verdict == "pairs":
            return super()._verdict(per_row)
        targets = sorted({c.target for c in per_row})
        column, converged = [], []
        for t in targets:
            rows = [c for c in per_row if c.target == t]
            ok = [c.statistic for c in rows if c.converged]
            column.append(float(np.median(ok if ok else [c.statistic for c in rows])))
            converged.append(bool(ok))
        flagged, anomaly = mad_test(column, converged, self.config.anomaly_threshold, "low",
                                    verdict="targets", targets=targets, target_statistics=column)
        return [targets[i] for i in flagged], anomaly
