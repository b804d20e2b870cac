"""TABOR (Guo et al., 2019), white-box: Neural Cleanse plus regularisers that
favour plausible triggers, all classes in one batch.

Per target t, with mask M = g(theta_m) [1,H,W], pattern Delta = g(theta_p)
[C,H,W] and Delta' = (1 - M) * Delta (the pattern outside the mask):

  mean CE(f((1-M) x + M Delta), t) + lambda_t ||M||_1          (NC, dynamic lambda_t)
  + lambda1 (||M||_1 + ||M||_2^2)                               R1, mask size
  + lambda2_l1 ||Delta'||_1 + lambda2_l2 ||Delta'||_2^2         R1, pattern outside the mask
  + lambda3 TV(M) + lambda4 TV(Delta')                          R2, scatter
  + lambda5 CE(f((1-M) x), y)                                   R3, blocking (y: f's own label of x)
  + lambda6 CE(f(M Delta), t)                                   R4, overlay

TV(z) = sum of squared differences of vertical and horizontal neighbours.
Weights are for [0, 1] pixels: the public port's [1e-6, 1e-5, 1e-7, 1e-8, 0,
1e-2] are in 0-255 pixel units, so the terms of the pixel-valued Delta' are
rescaled (L1 x255, squared x255^2); the mask is in [0, 1] in both conventions
and its terms keep the port's weights (docs/scanners.md has the arithmetic).

Statistic (default "quality", low = suspicious):
  q = ln(||M||_1 / (H W)) + ln(TV(M) / (4 sqrt(||M||_1))) - ln(ASR) - ln(acc_crop)
i.e. the log of the mask's area fraction, of its roughness relative to a solid
square of the same area (1 for a binary square), minus the log success rate
and the log of the fraction of scan images whose label survives cutting the
trigger out. statistic="mask_l1" uses NC's ||M||_1 instead.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from .. import ops
from . import register
from .base import OptimizerConfig, stamped_logits, target_ce, target_hits
from .nc import MaskPatternOptimizer

_EPS = 1e-6


@dataclasses.dataclass
class TaborConfig(OptimizerConfig):
    """NC's options (same defaults) plus TABOR's regulariser weights for [0, 1]
    pixels and the statistic ("quality" or "mask_l1")."""

    lambda1: float = 1e-6
    lambda2_l1: float = 1e-5 * 255
    lambda2_l2: float = 1e-5 * 255 ** 2
    lambda3: float = 1e-7
    lambda4: float = 1e-8 * 255 ** 2
    lambda5: float = 0.0
    lambda6: float = 1e-2
    statistic: str = "quality"

    def __post_init__(self):
        super().__post_init__()
        for name in ("lambda1", "lambda2_l1", "lambda2_l2", "lambda3", "lambda4", "lambda5", "lambda6"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name}: expected a finite number >= 0, got {value!r}")
        if self.statistic not in ("quality", "mask_l1"):
            raise ValueError(f"statistic: expected 'quality' or 'mask_l1', got {self.statistic!r}")


def total_variation(z: torch.Tensor) -> torch.Tensor:
    """Sum of squared vertical and horizontal neighbour differences per row: [R, C, H, W] -> [R]."""
    vertical = (z[:, :, 1:, :] - z[:, :, :-1, :]).square().sum(dim=(1, 2, 3))
    horizontal = (z[:, :, :, 1:] - z[:, :, :, :-1]).square().sum(dim=(1, 2, 3))
    return vertical + horizontal


def label_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean CE per row against per-image labels ([B] shared or [R, B]) -> [R]."""
    r, b, n = logits.shape
    labels = labels.expand(r, b) if labels.dim() == 1 else labels
    return F.cross_entropy(logits.reshape(r * b, n), labels.reshape(r * b),
                           reduction="none").view(r, b).mean(dim=1)


@register("tabor")
class Tabor(MaskPatternOptimizer):
    """TABOR. Options: NC's (lr 0.1, betas (0.5, 0.9), batch_size 32, init_cost
    1e-3 from 0, asr_threshold 0.99, patience 5, cost_up 2, cost_down 2^1.5,
    early_stop_patience 25, max_steps 1000) plus lambda1 1e-6, lambda2_l1
    2.55e-3, lambda2_l2 0.65025, lambda3 1e-7, lambda4 6.5025e-4, lambda5 0,
    lambda6 1e-2, statistic "quality"; anomaly_threshold 2 (MAD, low side)."""

    Config = TaborConfig
    needs_clean_predictions = True

    @staticmethod
    def _cropped(model, mask, x):
        """Logits of the images with the trigger region cut out: (1 - M) x."""
        zeros = torch.zeros((mask.shape[0], x.shape[-3], *mask.shape[2:]), device=mask.device)
        return stamped_logits(model, ops.stamp, x, mask, zeros)

    def _batch_loss(self, model, params, batch, targets, cost):
        cfg = self.config
        trigger = self._trigger(params)
        mask, pattern = trigger["mask"], trigger["pattern"]
        logits = self._logits(model, trigger, batch.x)
        mask_l1 = mask.sum(dim=(1, 2, 3))
        outside = (1 - mask) * pattern
        loss = (target_ce(logits, targets) + cost * mask_l1
                + cfg.lambda1 * (mask_l1 + mask.square().sum(dim=(1, 2, 3)))
                + cfg.lambda2_l1 * outside.sum(dim=(1, 2, 3))
                + cfg.lambda2_l2 * outside.square().sum(dim=(1, 2, 3))
                + cfg.lambda3 * total_variation(mask) + cfg.lambda4 * total_variation(outside))
        if cfg.lambda5:
            loss = loss + cfg.lambda5 * label_ce(self._cropped(model, mask, batch.x), batch.clean)
        if cfg.lambda6:
            overlay = model(mask * pattern)
            loss = loss + cfg.lambda6 * F.cross_entropy(overlay, targets, reduction="none")
        return loss, target_hits(logits, targets, batch.weight)

    def _crop_accuracy(self, model, data, mask) -> torch.Tensor:
        """Fraction of each row's images whose prediction survives (1 - M) x."""
        def kept_label(sl, batch):
            labels = self._cropped(model, mask[sl], batch.x).argmax(dim=2)
            clean = batch.clean.expand_as(labels) if batch.clean.dim() == 1 else batch.clean
            same = (labels == clean).float()
            return same.sum(dim=1) if batch.weight is None else (same * batch.weight).sum(dim=1)
        return self._evaluate(model, data, mask.shape[0], kept_label)

    def _statistic(self, model, data, trigger, targets, asr):
        mask = trigger["mask"]
        size = mask.sum(dim=(1, 2, 3))
        if self.config.statistic == "mask_l1":
            return size
        h, w = mask.shape[-2:]
        roughness = total_variation(mask) / (4 * size.clamp_min(_EPS).sqrt())
        crop = self._crop_accuracy(model, data, mask)
        return (torch.log((size / (h * w)).clamp_min(_EPS)) + torch.log(roughness.clamp_min(_EPS))
                - torch.log(asr.clamp_min(_EPS)) - torch.log(crop.clamp_min(_EPS)))
