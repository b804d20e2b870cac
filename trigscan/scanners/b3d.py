"""B3D and B3D-SS (Dong et al., ICCV 2021): black-box trigger reverse-engineering.

Only queries to the model (class probabilities per image) are used. For each
candidate class t the search distribution is m ~ Bernoulli(g(theta_m)) over
[1, H, W] and p = g(theta_p + sigma eps), eps ~ N(0, I) over [C, H, W];
F(m, p) = mean_x CE(f((1 - m) x + m p), t) + lambda ||m||_1 is minimised by
Adam on NES gradient estimates with k samples each (2k N queries per iteration
per class). All classes are one batch: the query images come from the fused
``nes_sample_stamp`` kernel and the estimates from ``nes_grad``, which
regenerates the samples from the counter-based RNG instead of storing them.

Decisions (see docs): the lambda ||m||_1 term's gradient is added in closed
form, lambda 2 g(theta_m)(1 - g(theta_m)) -- exactly the expectation of its
NES estimate, without that estimate's variance; NES estimates the model term.
ASR (for the dynamic lambda and the best trigger) is measured with the mean
trigger (g(theta_m), g(theta_p)) on the iteration's images.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from .. import ops
from ..data import noise as uniform_noise
from ..models import BudgetExhausted, as_query_model
from ..reference import squash
from ..result import ClassResult, ScanResult
from . import register
from .base import BestTracker, CostSchedule, Scanner, progress_bar
from .verdict import mad_verdict


@dataclasses.dataclass
class B3DConfig:
    k: int = 50  # NES samples per estimate (the paper: 50; 20..100 behave alike)
    sigma: float = 0.1  # pattern search std
    lr: float = 0.05
    betas: tuple[float, float] = (0.5, 0.9)  # NC's optimiser, which B3D follows
    batch_size: int = 32  # images per iteration (N)
    max_steps: int = 400  # iterations
    init_mask: float = 0.1  # g(theta_m) at the start
    init_cost: float = 1e-3
    cost_start_at_zero: bool = True
    asr_threshold: float = 0.99
    patience: int = 5
    cost_up: float = 2.0
    cost_down: float = 2.0 ** 1.5
    early_stop_patience: int | None = None  # beyond the paper: stop a class whose best stalls
    baseline: bool = False  # beyond the paper: F_j - mean F (lower variance, same mean)
    joint: bool = False  # beyond the paper: one sample set drives both estimates (k queries)
    query_chunk_mb: float = 64.0  # bound on the query images materialised at once
    anomaly_threshold: float = 2.0


@register("b3d")
class B3D(Scanner):
    """B3D: black-box NC with NES gradient estimates (see module docstring)."""

    access = "black"
    Config = B3DConfig

    def scan(self, model, images, labels=None, *, seed=0, classes=None, progress=None,
             checkpoint=None):
        if not isinstance(model, torch.nn.Module):
            model = as_query_model(model)
        else:
            model = as_query_model(model, input_shape=tuple(images.shape[1:]))
        return super().scan(model, images, labels, seed=seed, classes=classes, progress=progress,
                             checkpoint=checkpoint)

    def _scan(self, model, images, labels, classes, seed, show, checkpoint=None) -> ScanResult:
        cfg = self.config
        if cfg.k < 1 or not cfg.sigma > 0:
            raise ValueError(f"k, sigma: need k >= 1 and sigma > 0, got {cfg.k}, {cfg.sigma}")
        k_classes = len(classes)
        c, h, w = images.shape[1:]
        targets = torch.tensor(classes)
        generator = torch.Generator().manual_seed(seed)
        theta_m = torch.full((k_classes, 1, h, w), math.atanh(2 * cfg.init_mask - 1))
        theta_p = torch.zeros(k_classes, c, h, w)
        params = [theta_m.requires_grad_(True), theta_p.requires_grad_(True)]
        optimizer = torch.optim.Adam(params, lr=cfg.lr, betas=tuple(cfg.betas))
        schedule = CostSchedule(k_classes, cfg.init_cost, cfg.asr_threshold, cfg.patience,
                                cfg.cost_up, cfg.cost_down, cfg.cost_start_at_zero)
        best = BestTracker(k_classes)
        steps = torch.zeros(k_classes, dtype=torch.long)
        queries = torch.zeros(k_classes, dtype=torch.long)
        stale = torch.zeros(k_classes, dtype=torch.long)
        early_best = torch.full((k_classes,), math.inf)
        stopped_early = torch.zeros(k_classes, dtype=torch.bool)
        active = torch.ones(k_classes, dtype=torch.bool)
        rows_per_class = cfg.k if cfg.joint else 2 * cfg.k
        queries_at_start, partial = model.queries, False
        order = torch.randperm(images.shape[0], generator=generator)
        bar = progress_bar(cfg.max_steps, f"{self.name} ({k_classes} classes)", show)
        for step in range(cfg.max_steps):
            rows = active.nonzero().flatten()
            if rows.numel() == 0:
                break
            start = (step * cfg.batch_size) % images.shape[0]
            x = images[order.roll(-start)[:cfg.batch_size]]
            tm, tp = theta_m.detach()[rows], theta_p.detach()[rows]
            try:
                losses = self._query_losses(model, x, tm, tp, targets[rows], seed, step)
                mask, pattern = squash(tm), squash(tp)
                asr = self._mean_trigger_asr(model, x, mask, pattern, targets[rows])
            except BudgetExhausted:
                partial = True
                break
            grad_m, grad_p = ops.nes_grad(losses, tm, tp, cfg.k, cfg.sigma, seed, step,
                                          cfg.joint, cfg.baseline)
            grad_m += schedule.cost[rows].view(-1, 1, 1, 1) * 2 * mask * (1 - mask)
            theta_m.grad = torch.zeros_like(theta_m).index_copy_(0, rows, grad_m)
            theta_p.grad = torch.zeros_like(theta_p).index_copy_(0, rows, grad_p)
            optimizer.step()
            queries[rows] += (rows_per_class + 1) * x.shape[0]
            best.update(rows, step, mask.sum(dim=(1, 2, 3)), asr,
                        {"mask": mask, "pattern": pattern}, asr >= cfg.asr_threshold)
            schedule.update(rows, asr)
            steps[rows] += 1
            if cfg.early_stop_patience is not None:
                improved = best.size[rows] < early_best[rows]
                stale[rows] = torch.where(improved | ~best.found[rows], 0, stale[rows] + 1)
                early_best[rows] = torch.minimum(early_best[rows], best.size[rows])
                done = schedule.went_up[rows] & schedule.went_down[rows] & (
                    stale[rows] >= cfg.early_stop_patience)
                stopped_early[rows[done]] = True
                active[rows[done]] = False
            bar.update(1)
            bar.set_postfix(queries=model.queries - queries_at_start, found=int(best.found.sum()))
        bar.close()

        last = {"mask": squash(theta_m.detach()), "pattern": squash(theta_p.detach())}
        per_class = []
        for i, cls in enumerate(classes):
            found = bool(best.found[i])
            trigger = {key: (best.trigger[key][i] if found else last[key][i]).clone()
                       for key in last}
            reason = ("budget" if partial else "early_stop" if bool(stopped_early[i])
                      else "max_steps")
            if not found:
                reason += "; never reached the success threshold (last trigger reported)"
            per_class.append(ClassResult(
                target=cls, statistic=float(trigger["mask"].sum()),
                asr=float(best.asr[i]) if found else 0.0, converged=found, steps=int(steps[i]),
                queries=int(queries[i]), stop_reason=reason, trigger=trigger))
        result = mad_verdict(self, per_class, classes, "low", seed)
        result.queries = model.queries - queries_at_start
        result.partial = partial
        if partial:
            result.notes.append(f"query budget exhausted after {result.queries} queries: "
                                "results are partial")
        return result

    def _query_losses(self, model, x, theta_m, theta_p, targets, seed, step) -> torch.Tensor:
        """F [T, S]: mean CE of every query row over the images, with the query
        images streamed through the model in chunks of bounded size."""
        cfg = self.config
        t, n = theta_m.shape[0], x.shape[0]
        rows = cfg.k if cfg.joint else 2 * cfg.k
        image_bytes = 4 * x[0].numel() * t * rows
        chunk = max(1, min(n, int(cfg.query_chunk_mb * 2 ** 20 // image_bytes)))
        total = torch.zeros(t, rows)
        for i in range(0, n, chunk):
            xc = x[i:i + chunk]
            queries = ops.nes_sample_stamp(xc, theta_m, theta_p, cfg.k, cfg.sigma, seed, step,
                                           cfg.joint)
            probs = model(queries.reshape(-1, *x.shape[1:])).view(t, rows, xc.shape[0], -1)
            p_target = probs.gather(3, targets.view(t, 1, 1, 1).expand(t, rows, xc.shape[0], 1))
            total += -torch.log(p_target.squeeze(3).clamp_min(1e-12)).sum(dim=2)
        return total / n

    @staticmethod
    def _mean_trigger_asr(model, x, mask, pattern, targets) -> torch.Tensor:
        stamped = ops.stamp(x, mask, pattern)
        t, n = stamped.shape[:2]
        probs = model(stamped.reshape(t * n, *x.shape[1:])).view(t, n, -1)
        return (probs.argmax(dim=2) == targets[:, None]).float().mean(dim=1)


@dataclasses.dataclass
class B3DSSConfig(B3DConfig):
    synthetic_samples: int = 2000  # uniform-noise images (appendix B: thousands)


@register("b3d-ss")
class B3DSS(B3D):
    """B3D-SS: B3D on synthetic uniform-noise images; no data needed."""

    Config = B3DSSConfig

    def scan(self, model, images=None, labels=None, *, seed=0, classes=None, progress=None,
             checkpoint=None):
        if images is not None:
            raise ValueError("images: B3D-SS scans with synthetic noise; pass None "
                             "(or use method='b3d' to scan with real images)")
        model = as_query_model(model)
        images = uniform_noise(self.config.synthetic_samples, model.input_shape, seed=seed)
        return super().scan(model, images, labels, seed=seed, classes=classes, progress=progress,
                             checkpoint=checkpoint)
