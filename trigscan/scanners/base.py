"""Shared scanner machinery: input validation, the Scanner interface, and the
trigger-optimisation driver every white-box method runs on.

Candidate classes are a batch dimension: each method's trigger variables are
tensors [K, ...] (K classes), one forward pass stamps all active classes, the
dynamic cost schedule and best-trigger tracking are vectorised over classes,
and classes that finish drop out of the batch.
"""
from __future__ import annotations

import dataclasses
import math
import sys
import time
from typing import Any

import torch
from tqdm.auto import tqdm

from ..detect import mad_anomaly_index, mad_outliers
from ..models import as_white_box
from ..result import Anomaly, ClassResult, ScanResult


# ---------------------------------------------------------------------------
# Validation at the boundary
# ---------------------------------------------------------------------------
def check_images(images, name: str = "images") -> torch.Tensor:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name}: expected a float tensor [N, C, H, W], got {type(images).__name__}")
    if images.dim() != 4:
        raise ValueError(f"{name}: expected shape [N, C, H, W], got {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise ValueError(f"{name}: empty (no images)")
    if not images.is_floating_point():
        raise TypeError(f"{name}: expected floats in [0, 1], got dtype {images.dtype}")
    if not torch.isfinite(images).all():
        raise ValueError(f"{name}: contain NaN or infinity")
    lo, hi = float(images.min()), float(images.max())
    if lo < 0 or hi > 1:
        raise ValueError(f"{name}: pixel values must lie in [0, 1], got range [{lo:.4g}, {hi:.4g}]"
                         " (normalisation belongs in the model adapter: mean/std)")
    return images.float()


def check_labels(labels, n: int, num_classes: int, name: str = "labels") -> torch.Tensor:
    labels = torch.as_tensor(labels)
    if labels.dim() != 1 or labels.shape[0] != n:
        raise ValueError(f"{name}: expected shape [{n}] (one per image), got {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise TypeError(f"{name}: expected integer class indices, got dtype {labels.dtype}")
    if n and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"{name}: class indices must lie in [0, {num_classes}), "
                         f"got range [{int(labels.min())}, {int(labels.max())}]")
    return labels.long()


def check_classes(classes, num_classes: int) -> list[int]:
    if classes is None:
        return list(range(num_classes))
    classes = [int(c) for c in classes]
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"classes: {bad} out of range for a model with {num_classes} classes")
    if len(set(classes)) != len(classes):
        raise ValueError(f"classes: duplicates in {classes}")
    if len(classes) < 2:
        raise ValueError("classes: scanning needs at least 2 candidate classes to compare")
    return classes


# ---------------------------------------------------------------------------
# The interface
# ---------------------------------------------------------------------------
class Scanner:
    """Base of every method: configuration in the constructor, `scan` does the work.

    Subclasses define ``Config`` (a dataclass of the method's options with the
    papers' defaults), ``access`` ("white" or "black"), ``needs_labels``, and
    ``_scan``.
    """

    name = "base"
    access = "white"
    needs_labels = False

    @dataclasses.dataclass
    class Config:
        pass

    def __init__(self, **options):
        fields = {f.name for f in dataclasses.fields(self.Config)}
        unknown = sorted(set(options) - fields)
        if unknown:
            raise TypeError(f"{type(self).__name__}: unknown option(s) {unknown}; "
                            f"known: {sorted(fields)}")
        self.config = self.Config(**options)

    def get_params(self) -> dict[str, Any]:
        return dataclasses.asdict(self.config)

    def scan(self, model, images, labels=None, *, seed: int = 0, classes=None,
             progress: bool | None = None) -> ScanResult:
        """Scan `model` for backdoors using `images` (float [N, C, H, W] in [0, 1]).

        labels: [N] class indices (needed by some methods); classes: candidate
        target classes (default all); progress: show a progress bar (default:
        when stderr is a terminal).
        """
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed: expected a non-negative int, got {seed!r}")
        images = check_images(images)
        if self.access == "white":
            model = as_white_box(model)
            num_classes = model.probe(images)
            images = images.to(model.device)
        else:
            num_classes = model.num_classes
        if labels is None and self.needs_labels:
            raise ValueError(f"labels: method {self.name!r} needs the labels of the images")
        if labels is not None:
            labels = check_labels(labels, images.shape[0], num_classes).to(images.device)
        classes = check_classes(classes, num_classes)
        show = sys.stderr.isatty() if progress is None else progress
        started = time.perf_counter()
        result = self._scan(model, images, labels, classes, seed, show)
        result.elapsed_s = time.perf_counter() - started
        return result

    def _scan(self, model, images, labels, classes, seed, progress) -> ScanResult:
        raise NotImplementedError


# ---------------------------------------------------------------------------
# Vectorised pieces of the optimisation loop
# ---------------------------------------------------------------------------
class CostSchedule:
    """Neural Cleanse's dynamic cost, one independent schedule per class.

    After each step (a pass over the images) with success rate `asr`: if
    asr >= threshold for `patience` consecutive steps the cost is multiplied by
    `up`; if below for `patience` steps it is divided by `down`. With
    start_at_zero the cost is 0 until asr >= threshold has held for `patience`
    steps, then it becomes `init`.
    """

    def __init__(self, k: int, init: float, threshold: float, patience: int, up: float,
                 down: float, start_at_zero: bool, device=None):
        self.init, self.threshold, self.patience = init, threshold, patience
        self.up, self.down = up, down
        zeros = torch.zeros(k, dtype=torch.long, device=device)
        self.cost = torch.full((k,), 0.0 if start_at_zero else init, device=device)
        self.set_counter, self.up_counter, self.down_counter = zeros.clone(), zeros.clone(), zeros.clone()
        self.went_up = torch.zeros(k, dtype=torch.bool, device=device)
        self.went_down = torch.zeros_like(self.went_up)

    def update(self, rows: torch.Tensor, asr: torch.Tensor) -> None:
        ok = asr >= self.threshold
        cost = self.cost[rows]
        unset = cost == 0
        set_counter = torch.where(unset & ok, self.set_counter[rows] + 1, 0)
        now_set = set_counter >= self.patience
        cost = torch.where(now_set, torch.full_like(cost, self.init), cost)
        set_counter = torch.where(now_set, 0, set_counter)
        up = torch.where(ok & ~now_set, self.up_counter[rows] + 1, 0)
        down = torch.where(~ok & ~now_set, self.down_counter[rows] + 1, 0)
        went_up = self.went_up[rows] & ~now_set
        went_down = self.went_down[rows] & ~now_set
        raise_cost, lower_cost = up >= self.patience, (down >= self.patience) & ~(up >= self.patience)
        cost = torch.where(raise_cost, cost * self.up, torch.where(lower_cost, cost / self.down, cost))
        self.cost[rows] = cost
        self.set_counter[rows] = set_counter
        self.up_counter[rows] = torch.where(raise_cost, 0, up)
        self.down_counter[rows] = torch.where(lower_cost, 0, down)
        self.went_up[rows] = went_up | raise_cost
        self.went_down[rows] = went_down | lower_cost


class BestTracker:
    """The best trigger per class: the smallest `size` among steps whose success
    rate reached the threshold (plus any method-specific condition)."""

    def __init__(self, k: int, device=None):
        self.size = torch.full((k,), math.inf, device=device)
        self.asr = torch.zeros(k, device=device)
        self.step = torch.full((k,), -1, dtype=torch.long, device=device)
        self.trigger: dict[str, torch.Tensor] = {}

    def update(self, rows, step: int, size, asr, trigger: dict[str, torch.Tensor],
               eligible) -> torch.Tensor:
        better = eligible & (size < self.size[rows])
        chosen = rows[better]
        for key, value in trigger.items():
            if key not in self.trigger:
                self.trigger[key] = torch.zeros((self.size.shape[0], *value.shape[1:]),
                                                dtype=value.dtype, device=value.device)
            self.trigger[key][chosen] = value[better]
        self.size[chosen] = size[better]
        self.asr[chosen] = asr[better]
        self.step[chosen] = step
        return better

    @property
    def found(self) -> torch.Tensor:
        return self.step >= 0


def image_batches(images: torch.Tensor, batch_size: int):
    for start in range(0, images.shape[0], batch_size):
        yield images[start:start + batch_size]


def progress_bar(total: int, desc: str, show: bool):
    return tqdm(total=total, desc=desc, disable=not show, file=sys.stderr, leave=False,
                dynamic_ncols=True)


# ---------------------------------------------------------------------------
# The driver of every white-box trigger optimisation
# ---------------------------------------------------------------------------
@dataclasses.dataclass
class OptimizerConfig:
    """Options every optimisation-based method shares (defaults: Neural Cleanse)."""

    lr: float = 0.1
    betas: tuple[float, float] = (0.5, 0.9)
    batch_size: int = 32
    max_steps: int = 1000
    init_cost: float = 1e-3
    cost_start_at_zero: bool = True
    asr_threshold: float = 0.99
    patience: int = 5
    cost_up: float = 2.0
    cost_down: float = 2.0 ** 1.5
    early_stop_patience: int | None = 25  # None: never stop early
    anomaly_threshold: float = 2.0


class TriggerOptimizer(Scanner):
    """A white-box method that optimises one trigger per class with Adam under
    the dynamic cost schedule. Subclasses provide:

    - ``_init_params(k, image_shape, generator)`` -> dict of leaf tensors [k, ...]
    - ``_batch_loss(model, params, x, targets, cost)`` -> (loss [ka], hits [ka])
      for the active rows' params (mean loss over the batch, number of images
      classified as the target)
    - ``_trigger(params)`` -> dict of trigger tensors [ka, ...] (what is kept)
    - ``_size(trigger)`` -> [ka], the quantity the best trigger minimises
    - optionally ``_after_step(params, rows)`` (e.g. pruning) and
      ``_statistic(trigger)`` (default: the size) and ``_is_better``.
    """

    anomaly_side = "low"
    Config = OptimizerConfig

    def _after_step(self, params, rows) -> None:
        pass

    def _statistic(self, trigger) -> torch.Tensor:
        return self._size(trigger)

    def _success(self, model, trigger, images, targets) -> torch.Tensor:
        """Fraction of `images` the kept trigger sends to each target."""
        raise NotImplementedError

    def _scan(self, model, images, labels, classes, seed, show) -> ScanResult:
        cfg = self.config
        device = images.device
        k = len(classes)
        targets = torch.tensor(classes, device=device)
        generator = torch.Generator(device="cpu").manual_seed(seed)
        params = {name: p.to(device).requires_grad_(True)
                  for name, p in self._init_params(k, tuple(images.shape[1:]), generator).items()}
        optimizer = torch.optim.Adam(params.values(), lr=cfg.lr, betas=tuple(cfg.betas))
        schedule = CostSchedule(k, cfg.init_cost, cfg.asr_threshold, cfg.patience, cfg.cost_up,
                                cfg.cost_down, cfg.cost_start_at_zero, device)
        best = BestTracker(k, device)
        last_trigger: dict[str, torch.Tensor] = {}
        stale = torch.zeros(k, dtype=torch.long, device=device)
        early_best = torch.full((k,), math.inf, device=device)
        steps = torch.zeros(k, dtype=torch.long, device=device)
        stopped_early = torch.zeros(k, dtype=torch.bool, device=device)
        active = torch.ones(k, dtype=torch.bool, device=device)
        bar = progress_bar(cfg.max_steps, f"{self.name} ({k} classes)", show)
        for step in range(cfg.max_steps):
            rows = active.nonzero().flatten()
            if rows.numel() == 0:
                break
            hits = torch.zeros(rows.numel(), device=device)
            for x in image_batches(images, cfg.batch_size):
                optimizer.zero_grad(set_to_none=True)
                active_params = {name: p[rows] for name, p in params.items()}
                loss, batch_hits = self._batch_loss(model, active_params, x, targets[rows],
                                                    schedule.cost[rows])
                loss.sum().backward()
                optimizer.step()
                hits += batch_hits.detach()
            self._after_step(params, rows)
            asr = hits / images.shape[0]
            with torch.no_grad():
                trigger = self._trigger({name: p[rows] for name, p in params.items()})
                size = self._size(trigger)
            for key, value in trigger.items():
                last_trigger.setdefault(key, torch.zeros((k, *value.shape[1:]), device=device))
                last_trigger[key][rows] = value
            best.update(rows, step, size, asr, trigger, asr >= cfg.asr_threshold)
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
            bar.set_postfix(active=int(active.sum()), found=int(best.found.sum()))
        bar.close()
        return self._finish(model, images, classes, targets, best, last_trigger, steps,
                            stopped_early, seed)

    def _finish(self, model, images, classes, targets, best, last_trigger, steps, stopped_early,
                seed) -> ScanResult:
        found = best.found
        kept = {key: torch.where(found.view(-1, *[1] * (value.dim() - 1)), best.trigger[key], value)
                if key in best.trigger else value for key, value in last_trigger.items()}
        with torch.no_grad():
            statistic = self._statistic(kept)
            asr = self._success(model, kept, images, targets)
        per_class = []
        for i, cls in enumerate(classes):
            reason = "early_stop" if bool(stopped_early[i]) else "max_steps"
            if not bool(found[i]):
                reason += "; never reached the success threshold (last trigger reported)"
            per_class.append(ClassResult(
                target=cls, statistic=float(statistic[i]), asr=float(asr[i]),
                converged=bool(found[i]), steps=int(steps[i]), stop_reason=reason,
                trigger={key: value[i].detach().cpu() for key, value in kept.items()}))
        flagged = mad_outliers([c.statistic for c in per_class], self.config.anomaly_threshold,
                               self.anomaly_side, eligible=[c.converged for c in per_class])
        index = mad_anomaly_index([c.statistic for c in per_class]).tolist()
        anomaly = Anomaly(kind="mad", values=index, threshold=self.config.anomaly_threshold,
                          side=self.anomaly_side)
        return ScanResult(method=self.name, backdoored=bool(flagged),
                          targets=[classes[i] for i in flagged], per_class=per_class,
                          anomaly=anomaly, config=self.get_params(), seed=seed, elapsed_s=0.0)
