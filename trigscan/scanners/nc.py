"""Neural Cleanse (Wang et al., S&P 2019), white-box, all classes in one batch.

Per target t: minimise mean CE(f((1 - m) x + m p), t) + lambda_t ||m||_1 over
m = g(theta_m) in [0,1]^{H x W}, p = g(theta_p) in [0,1]^{C x H x W}, with the
official code's dynamic lambda (starts at 0) and early stop. Statistic: ||m||_1
of the best mask; a class whose statistic is anomalously small (MAD index > 2,
low side) is flagged as infected.
"""
from __future__ import annotations

import torch

from .. import ops
from ..reference import squash
from . import register
from .base import TriggerOptimizer, stamped_logits, target_ce, target_hits


def atanh_init(shape, generator) -> torch.Tensor:
    """Unconstrained variable whose g() is uniform in (0, 1), as the official code."""
    u = torch.rand(shape, generator=generator)
    return torch.atanh((2 * u - 1) * (1 - 1e-6))


class MaskPatternOptimizer(TriggerOptimizer):
    """Mask/pattern triggers (NC, TABOR): m = g(theta_m) [K,1,H,W], p = g(theta_p) [K,C,H,W]."""

    def _init_params(self, k, image_shape, generator):
        c, h, w = image_shape
        return {"theta_m": atanh_init((k, 1, h, w), generator),
                "theta_p": atanh_init((k, c, h, w), generator)}

    def _trigger(self, params):
        return {"mask": squash(params["theta_m"]), "pattern": squash(params["theta_p"])}

    def _size(self, trigger):
        return trigger["mask"].sum(dim=(1, 2, 3))

    def _logits(self, model, trigger, x):
        return stamped_logits(model, ops.stamp, x, trigger["mask"], trigger["pattern"])

    def _success(self, model, trigger, batch, targets):
        return target_hits(self._logits(model, trigger, batch.x), targets, batch.weight)


@register("nc")
class NeuralCleanse(MaskPatternOptimizer):
    """Neural Cleanse. Options (defaults from the official code): lr 0.1,
    betas (0.5, 0.9), batch_size 32, init_cost 1e-3 (cost starts at 0),
    asr_threshold 0.99, patience 5, cost_up 2, cost_down 2^1.5,
    early_stop_patience 25, max_steps 1000 (a step is a pass over the images),
    anomaly_threshold 2 (MAD, low side)."""

    def _batch_loss(self, model, params, batch, targets, cost):
        trigger = self._trigger(params)
        logits = self._logits(model, trigger, batch.x)
        loss = target_ce(logits, targets) + cost * self._size(trigger)
        return loss, target_hits(logits, targets, batch.weight)
