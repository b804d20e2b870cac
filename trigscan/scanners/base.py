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
import torch.nn.functional as F

from ..allocator import keep_freed_memory
from ..checkpoint import (Checkpoint, load_fields, module_digest, restore_into, tensor_digest, tensor_fields,
                          to_device)
from ..models import as_white_box
from ..optim import Adam
from ..result import Anomaly, ClassResult, ScanResult
from .verdict import convergence_notes, mad_test


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
    papers' defaults), ``access`` ("white" or "black"), ``needs_labels``,
    ``uses_training_set``, ``uses_images`` (see ``scanners.scan_data``) and
    ``_scan``.
    """

    name = "base"
    access = "white"
    needs_labels = False
    uses_training_set = False
    uses_images = True
    resumable = False  # True once _scan loads and saves its checkpoint

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
             progress: bool | None = None, checkpoint=None) -> ScanResult:
        """Scan `model` for backdoors using `images` (float [N, C, H, W] in [0, 1]).

        labels: [N] class indices (needed by some methods); classes: candidate
        target classes (default all); progress: show a progress bar (default:
        when stderr is a terminal); checkpoint: a file path to save the scan's
        state to after every step and resume from when it exists, or a
        ``trigscan.checkpoint.Checkpoint(path, min_interval=...)`` for its
        save options (the scan sets its fingerprint). A resumed scan returns
        the result of the uninterrupted one, bitwise on the same device and
        thread count; the file stays, marked complete, after the scan (see
        ``trigscan.checkpoint``).
        """
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed: expected a non-negative int, got {seed!r}")
        keep_freed_memory()
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
        if checkpoint is not None:
            if not self.resumable:
                raise ValueError(f"checkpoint: method {self.name!r} cannot resume a scan yet")
            options = {"min_interval": checkpoint.min_interval} if isinstance(checkpoint, Checkpoint) else {}
            path = checkpoint.path if isinstance(checkpoint, Checkpoint) else checkpoint
            fingerprint = self.fingerprint(images, labels, seed, classes, model)
            checkpoint = Checkpoint(path, fingerprint, **options)
        started = time.perf_counter()
        note = None
        if self.access == "white":
            model, note = model.for_scanning(images[:64])
        result = self._scan(model, images, labels, classes, seed, show, checkpoint)
        result.elapsed_s = time.perf_counter() - started
        if note:
            result.notes.append(note)
        return result

    def fingerprint(self, images, labels, seed, classes, model=None) -> dict:
        """What identifies a scan for its checkpoint: method, options, seed,
        classes, data and (white-box) the model's weights. A query-only model
        has no weights to read: its identity is the caller's business (the
        CLI keeps one output folder per model)."""
        return {"method": self.name, "config": self.get_params(), "seed": seed,
                "classes": classes, "data": tensor_digest(images, labels),
                "model": module_digest(model)}

    def _scan(self, model, images, labels, classes, seed, progress, checkpoint) -> ScanResult:
        """checkpoint: None or a trigscan.checkpoint.Checkpoint to load() once and save() per step."""
        raise NotImplementedError


# ---------------------------------------------------------------------------
# Vectorised pieces of the optimisation loop
# ---------------------------------------------------------------------------
class CostSchedule:
    """Neural Cleanse's dynamic cost, one independent schedule per class,
    following the official code's order of operations step by step.

    After each step (a pass over the images) with success rate `asr`:
    1. with start_at_zero, while the cost is 0: count consecutive steps with
       asr >= threshold; at `patience` the cost becomes `init` and the up/down
       counters and the went_up/went_down flags are cleared;
    2. count consecutive successes (asr >= threshold) and failures; the step
       that set the cost counts as the first success;
    3. `patience` consecutive successes multiply the cost by `up`, else
       `patience` consecutive failures divide it by `down` (the counter that
       fired restarts at 0; went_up / went_down record that it happened).
    Without start_at_zero the cost starts at `init` (PixelBackdoor's rule).
    """

    # the losses' cost never exceeds this: there the cost term already outweighs
    # the data term by orders of magnitude, and more would only scale what Adam
    # normalises
    MAX_COST = 1e6

    def __init__(self, k: int, init: float, threshold: float, patience: int, up: float,
                 down: float, start_at_zero: bool, device=None):
        self.init, self.threshold, self.patience = init, threshold, patience
        self.up, self.down = up, down
        zeros = torch.zeros(k, dtype=torch.long, device=device)
        # the schedule runs in float64 (Python floats in the official code: a cost
        # divided for hundreds of steps must not underflow to 0, which would read
        # as "not set yet"); the losses read `cost`, derived from it
        self._cost = torch.full((k,), 0.0 if start_at_zero else init, dtype=torch.float64, device=device)
        self.set_counter, self.up_counter, self.down_counter = zeros.clone(), zeros.clone(), zeros.clone()
        self.went_up = torch.zeros(k, dtype=torch.bool, device=device)
        self.went_down = torch.zeros_like(self.went_up)

    def update(self, rows: torch.Tensor, asr: torch.Tensor) -> None:
        ok = asr >= self.threshold
        cost = self._cost[rows]
        set_counter = torch.where((cost == 0) & ok, self.set_counter[rows] + 1, 0)
        now_set = set_counter >= self.patience
        cost = torch.where(now_set, torch.full_like(cost, self.init), cost)
        set_counter = torch.where(now_set, 0, set_counter)
        up = torch.where(ok, torch.where(now_set, 0, self.up_counter[rows]) + 1, 0)
        down = torch.where(~ok, self.down_counter[rows] + 1, 0)
        raise_cost = up >= self.patience
        lower_cost = (down >= self.patience) & ~raise_cost
        cost = torch.where(raise_cost, cost * self.up, torch.where(lower_cost, cost / self.down, cost))
        self._cost[rows] = cost
        self.set_counter[rows] = set_counter
        self.up_counter[rows] = torch.where(raise_cost, 0, up)
        self.down_counter[rows] = torch.where(lower_cost, 0, down)
        self.went_up[rows] = (self.went_up[rows] & ~now_set) | raise_cost
        self.went_down[rows] = (self.went_down[rows] & ~now_set) | lower_cost

    @property
    def cost(self) -> torch.Tensor:
        """The cost the losses see: the schedule's, float32, capped at MAX_COST (a
        class that always succeeds is raised every `patience` steps, and past ~140
        raises from 1e-3 float32 reads inf; inf x 0 = NaN in a gradient). Derived,
        never stored: no checkpoint can bring back an uncapped or stale view."""
        return self._cost.clamp(max=self.MAX_COST).float()

    def state_dict(self) -> dict:
        return tensor_fields(self)

    def load_state_dict(self, state: dict, device=None) -> None:
        load_fields(self, state, device)  # a `cost` saved by older versions is ignored


class BestTracker:
    """The best trigger per class among steps whose success rate reached the
    threshold (`eligible`): a step's trigger replaces the kept one when it lowers
    `size` — or, with ``criteria`` > 1, when it lowers every one of the
    `criteria` columns of `size` [rows, criteria] (PixelBackdoor: L_pixel and
    the pixel count)."""

    def __init__(self, k: int, device=None, criteria: int = 1):
        shape = (k,) if criteria == 1 else (k, criteria)
        self.size = torch.full(shape, math.inf, device=device)
        self.asr = torch.zeros(k, device=device)
        self.step = torch.full((k,), -1, dtype=torch.long, device=device)
        self.trigger: dict[str, torch.Tensor] = {}

    def update(self, rows, step: int, size, asr, trigger: dict[str, torch.Tensor],
               eligible) -> torch.Tensor:
        """Returns `better` [rows]: which rows took this step's trigger."""
        lower = size < self.size[rows]
        better = eligible & (lower if lower.dim() == 1 else lower.all(dim=1))
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

    def state_dict(self) -> dict:
        return tensor_fields(self)

    def load_state_dict(self, state: dict, device=None) -> None:
        load_fields(self, state, device)


def early_stop(rows, better, best: BestTracker, schedule: CostSchedule, patience: int,
               stale, stopped_early, active) -> None:
    """The official NC code's early stop, per row, checked before the step's cost
    update: a row stops once its best trigger has not improved for ``patience``
    steps (counted from its first success) after its cost moved both up and down.
    Updates the per-row counters ``stale``, ``stopped_early`` and ``active``."""
    stale[rows] = torch.where(better | ~best.found[rows], 0, stale[rows] + 1)
    done = schedule.went_up[rows] & schedule.went_down[rows] & (stale[rows] >= patience)
    stopped_early[rows[done]] = True
    active[rows[done]] = False


def image_batches(images: torch.Tensor, batch_size: int):
    for start in range(0, images.shape[0], batch_size):
        yield images[start:start + batch_size]


def model_scores(model, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """The model's class scores [N, classes] over the images, in no-grad batches
    (the one place scanners, mitigation and the zoo run a model over a set)."""
    with torch.no_grad():
        return torch.cat([model(x) for x in image_batches(images, batch_size)])


def progress_bar(total: int, desc: str, show: bool):
    from ..progress import Bar  # a tqdm bar when shown, plus events for logs (trigscan.progress)

    return Bar(total, desc, show)


# ---------------------------------------------------------------------------
# Which images each inversion is optimised on, in bounded chunks
# ---------------------------------------------------------------------------
@dataclasses.dataclass
class Batch:
    """One mini-batch for a run of rows (inversions).

    x: shared images [B, C, H, W] (every row sees the same images) or one batch
    per row [R, B, C, H, W]. weight: None (shared) or [R, B], 1 for a real image
    of the row, 0 for padding (see RowImages). clean: the model's predictions on
    the unstamped images ([B] or [R, B]) when the method asked for them.
    """

    x: torch.Tensor
    weight: torch.Tensor | None = None
    clean: torch.Tensor | None = None


class RowImages:
    """The scan images each row is optimised on.

    Shared (index None): every row uses all N images, in order. Per row: row r
    uses ``images[index[r, :counts[r]]]``; lists shorter than the longest are
    padded by cycling through the row's own images, so that all rows take the
    same number of mini-batches per step (padding enters the loss like any
    image, but never the success rate). Mini-batches are cut into chunks of
    rows so that at most `max_images` stamped images go through the model at
    once; gradients of the chunks accumulate, so chunking does not change the
    maths.
    """

    def __init__(self, images: torch.Tensor, index: torch.Tensor | None = None,
                 counts: torch.Tensor | None = None, clean: torch.Tensor | None = None):
        self.images, self.index, self.counts, self.clean = images, index, counts, clean

    @classmethod
    def per_row(cls, images: torch.Tensor, lists: list[torch.Tensor], what: str) -> "RowImages":
        """lists[r]: indices of row r's images. `what` names the rows in errors."""
        counts = torch.tensor([len(ix) for ix in lists], device=images.device)
        empty = [i for i, ix in enumerate(lists) if len(ix) == 0]
        if empty:
            raise ValueError(f"labels: no scan image for {what} {empty}")
        length = int(counts.max())
        index = torch.stack([ix.to(images.device)[torch.arange(length, device=images.device) % len(ix)]
                             for ix in lists])
        return cls(images, index, counts)

    @property
    def length(self) -> int:
        """Images per row per step (padded length for per-row lists)."""
        return self.images.shape[0] if self.index is None else self.index.shape[1]

    def count(self, rows: torch.Tensor) -> torch.Tensor:
        """Real images of each row (the success-rate denominator), float [R]."""
        if self.index is None:
            return torch.full((rows.numel(),), float(self.images.shape[0]), device=self.images.device)
        return self.counts[rows].float()

    def select(self, rows: torch.Tensor) -> "RowImages":
        if self.index is None:
            return self
        return RowImages(self.images, self.index[rows], self.counts[rows], self.clean)

    def predict(self, model, batch_size: int) -> None:
        """Store the model's predictions on the clean images (for methods that need them)."""
        self.clean = model_scores(model, self.images, batch_size).argmax(dim=1)

    def batches(self, rows: torch.Tensor, batch_size: int, max_images: int):
        """For each mini-batch: an iterator of (sl, Batch), `sl` a slice of `rows`."""
        for lo in range(0, self.length, batch_size):
            yield self._chunks(rows, lo, min(lo + batch_size, self.length), max_images)

    def _chunks(self, rows, lo, hi, max_images):
        per_chunk = max(1, max_images // (hi - lo))
        for start in range(0, rows.numel(), per_chunk):
            sl = slice(start, min(start + per_chunk, rows.numel()))
            if self.index is None:
                clean = None if self.clean is None else self.clean[lo:hi]
                yield sl, Batch(self.images[lo:hi], None, clean)
            else:
                index = self.index[rows[sl], lo:hi]
                position = torch.arange(lo, hi, device=index.device)
                weight = (position[None] < self.counts[rows[sl], None]).float()
                clean = None if self.clean is None else self.clean[index]
                yield sl, Batch(self.images[index], weight, clean)


# ---------------------------------------------------------------------------
# Model outputs of stamped rows
# ---------------------------------------------------------------------------
def stamped_logits(model, stamp, x: torch.Tensor, *trigger: torch.Tensor) -> torch.Tensor:
    """Logits [R, B, classes] of R triggers stamped on images.

    stamp(x [B, C, H, W], *trigger [R, ., H, W]) -> [R, B, C, H, W] is a kernel
    (ops.stamp, ops.pixel_stamp with its scalars bound). x is shared [B, C, H, W]
    or per row [R, B, C, H, W]; per-row images go through the same kernel with
    the rows folded into the channel axis (x -> [B, R*C, H, W], every trigger
    tensor -> [1, R*C, H, W]), which is exact because the stamps act on each
    channel independently.
    """
    if x.dim() == 4:
        stamped = stamp(x, *trigger)
        r, b = stamped.shape[:2]
        return model(stamped.reshape(r * b, *stamped.shape[2:])).view(r, b, -1)
    r, b, c, h, w = x.shape
    folded = x.transpose(0, 1).reshape(b, r * c, h, w)
    tensors = [t.expand(r, c, h, w).reshape(1, r * c, h, w) for t in trigger]
    stamped = stamp(folded, *tensors)  # [1, B, R*C, H, W]
    return model(stamped.reshape(b * r, c, h, w)).view(b, r, -1).transpose(0, 1)


def target_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy per row: logits [R, B, classes], targets [R] -> [R]."""
    k, b, n = logits.shape
    return F.cross_entropy(logits.reshape(k * b, n), targets.repeat_interleave(b),
                           reduction="none").view(k, b).mean(dim=1)


def target_hits(logits: torch.Tensor, targets: torch.Tensor, weight=None) -> torch.Tensor:
    """Images classified as the row's target, per row (padding excluded) -> float [R]."""
    hits = (logits.argmax(dim=2) == targets[:, None]).float()
    return hits.sum(dim=1) if weight is None else (hits * weight).sum(dim=1)


def slice_rows(tensors: dict[str, torch.Tensor], sl) -> dict[str, torch.Tensor]:
    return {key: value[sl] for key, value in tensors.items()}


# ---------------------------------------------------------------------------
# The driver of every white-box trigger optimisation
# ---------------------------------------------------------------------------
@dataclasses.dataclass
class OptimizerConfig:
    """Options every optimisation-based method shares (defaults: Neural Cleanse).

    batched: optimise all candidate classes as one batch (default) or, for
    comparison, one class after the other with the same per-class maths.
    max_batch_images: at most this many stamped images per model
    forward/backward; more rows are processed in chunks (same maths).
    """

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
    batched: bool = True
    max_batch_images: int = 4096

    def __post_init__(self):
        positive = {"lr": self.lr, "init_cost": self.init_cost, "cost_up": self.cost_up,
                    "cost_down": self.cost_down, "anomaly_threshold": self.anomaly_threshold}
        for name, value in positive.items():
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name}: expected a finite number > 0, got {value!r}")
        counts = {"batch_size": self.batch_size, "max_steps": self.max_steps,
                  "patience": self.patience, "max_batch_images": self.max_batch_images}
        if self.early_stop_patience is not None:
            counts["early_stop_patience"] = self.early_stop_patience
        for name, value in counts.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
        if not 0 < self.asr_threshold <= 1:
            raise ValueError(f"asr_threshold: expected a value in (0, 1], got {self.asr_threshold!r}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas: expected two values in [0, 1), got {self.betas!r}")


@dataclasses.dataclass
class Outcome:
    """What the optimisation of a set of rows leaves behind."""

    best: BestTracker
    last: dict[str, torch.Tensor]  # the trigger after the last step, per row
    steps: torch.Tensor
    stopped_early: torch.Tensor

    @staticmethod
    def cat(parts: list["Outcome"]) -> "Outcome":
        first = parts[0]
        best = BestTracker(0, first.steps.device, 1 if first.best.size.dim() == 1 else first.best.size.shape[1])
        best.size = torch.cat([p.best.size for p in parts])
        best.asr = torch.cat([p.best.asr for p in parts])
        best.step = torch.cat([p.best.step for p in parts])
        best.trigger = {key: torch.cat([p.best.trigger[key] for p in parts]) for key in first.best.trigger}
        return Outcome(best, {key: torch.cat([p.last[key] for p in parts]) for key in first.last},
                       torch.cat([p.steps for p in parts]), torch.cat([p.stopped_early for p in parts]))

    def state_dict(self) -> dict:
        return {"best": self.best.state_dict(), "last": self.last, "steps": self.steps,
                "stopped_early": self.stopped_early}

    @staticmethod
    def from_state(state: dict, device, criteria: int) -> "Outcome":
        best = BestTracker(0, device, criteria)
        best.load_state_dict(state["best"], device)
        return Outcome(best, to_device(state["last"], device), state["steps"].to(device),
                       state["stopped_early"].to(device))


class TriggerOptimizer(Scanner):
    """A white-box method that optimises one trigger per row with Adam under
    the dynamic cost schedule. A row is one inversion: a candidate target class
    (universal triggers) or a (source, target) pair. All rows are one batch
    dimension. Subclasses provide:

    - ``_init_params(k, image_shape, generator)`` -> dict of tensors [k, ...]
    - ``_batch_loss(model, params, batch, targets, cost)`` -> (loss [r], hits [r])
      for a chunk of rows (mean loss over the batch; images sent to the target,
      from ``target_hits(logits, targets, batch.weight)``)
    - ``_trigger(params)`` -> dict of trigger tensors [r, ...] (what is kept)
    - ``_size(trigger)`` -> [r], what the best trigger minimises
    - ``_success(model, trigger, batch, targets)`` -> hits [r] of a kept trigger
    and optionally:
    - ``_rows(classes, labels)`` -> (targets [R], sources [R] or None)
    - ``_victims(images, labels, targets, sources)`` -> RowImages (default: all
      images for every row)
    - ``_best_key(params, trigger)`` -> [r] or [r, S]: a new best must lower all
      of it (default: the size)
    - ``_adopt(params, rows, trigger)``: called with the rows that just took a
      new best (e.g. write the pruned trigger back into the variables)
    - ``_statistic(model, data, trigger, targets, asr)`` -> [R] (default: size)
    - ``needs_clean_predictions``: the batches carry the model's predictions
    """

    anomaly_side = "low"
    resumable = True  # state saved after every step (see _scan, _optimise)
    needs_clean_predictions = False
    best_criteria = 1
    Config = OptimizerConfig

    # -- hooks with defaults ------------------------------------------------
    def _rows(self, classes, labels):
        return torch.tensor(classes), None

    def _victims(self, images, labels, targets, sources) -> RowImages:
        return RowImages(images)

    def _best_key(self, params, trigger) -> torch.Tensor:
        return self._size(trigger)

    def _adopt(self, params, rows, trigger) -> None:
        pass

    def _statistic(self, model, data, trigger, targets, asr) -> torch.Tensor:
        return self._size(trigger)

    # -- the scan -----------------------------------------------------------
    def _scan(self, model, images, labels, classes, seed, show, checkpoint=None) -> ScanResult:
        """Optimise every row (in one batch, or row by row with ``batched=False``),
        then evaluate the kept triggers and take the verdict.

        With a checkpoint, the state after every step is saved: the rows already
        optimised (row by row mode) and the loop state of the run in progress
        (see ``_optimise``). A loaded state continues exactly there; a complete
        one skips the optimisation.
        """
        cfg = self.config
        device = images.device
        targets, sources = self._rows(classes, labels)
        targets = targets.to(device)
        sources = None if sources is None else sources.to(device)
        data = self._victims(images, labels, targets, sources)
        if self.needs_clean_predictions:
            data.predict(model, cfg.batch_size)
        k = targets.shape[0]
        generator = torch.Generator(device="cpu").manual_seed(seed)
        init = {name: p.to(device) for name, p in
                self._init_params(k, tuple(images.shape[1:]), generator).items()}
        what = "pairs" if sources is not None else "classes"
        # the runs: all rows at once, or one row after the other
        groups = [None] if cfg.batched else [torch.tensor([i], device=device) for i in range(k)]
        total = cfg.max_steps * len(groups)
        bar = progress_bar(total, f"{self.name} ({k} {what}{'' if cfg.batched else ', one by one'})", show)
        state = checkpoint.load() if checkpoint is not None else None
        done: list[Outcome] = []
        resume = None
        if state is not None:
            with checkpoint.restoring():
                done = [Outcome.from_state(part, device, self.best_criteria) for part in state["done"]]
                resume = state["run"]
                if len(done) > len(groups) or (resume is None) != (len(done) == len(groups)):
                    raise ValueError(f"{len(done)} finished run(s) of {len(groups)}")
                bar.update(int(state["bar"]))
        saved_done = [outcome.state_dict() for outcome in done]

        def save(run_state, force=False):
            checkpoint.save({"done": saved_done, "run": run_state, "bar": bar.n}, force=force)

        for rows in groups[len(done):]:
            part = data if rows is None else data.select(rows)
            part_init = init if rows is None else slice_rows(init, rows)
            part_targets = targets if rows is None else targets[rows]
            outcome = self._optimise(model, part, part_init, part_targets, bar, resume,
                                     save if checkpoint is not None else None, checkpoint)
            resume = None
            done.append(outcome)
            saved_done.append(outcome.state_dict())
        if checkpoint is not None and not (state is not None and state.get("complete")):
            checkpoint.save({"done": saved_done, "run": None, "bar": bar.n, "complete": True}, force=True)
        bar.close()
        outcome = done[0] if cfg.batched else Outcome.cat(done)
        return self._finish(model, data, targets, sources, outcome, seed)

    def _optimise(self, model, data: RowImages, init, targets, bar, resume=None, save=None,
                  checkpoint=None) -> Outcome:
        """Run the optimisation of all rows of `init` together (rows drop out
        when they stop early).

        resume: a state ``save`` received earlier: continue after its step.
        save(state): called after every completed step with everything the next
        step reads (variables, Adam state, cost schedule, best tracker, last
        trigger, early-stop and step counters, active rows, the step index).
        """
        cfg = self.config
        device = targets.device
        k = targets.shape[0]
        params = {name: p.clone().requires_grad_(True) for name, p in init.items()}
        optimizer = Adam(params.values(), lr=cfg.lr, betas=tuple(cfg.betas))
        schedule = CostSchedule(k, cfg.init_cost, cfg.asr_threshold, cfg.patience, cfg.cost_up,
                                cfg.cost_down, cfg.cost_start_at_zero, device)
        best = BestTracker(k, device, self.best_criteria)
        last: dict[str, torch.Tensor] = {}
        counters = {"stale": torch.zeros(k, dtype=torch.long, device=device),
                    "steps": torch.zeros(k, dtype=torch.long, device=device),
                    "stopped_early": torch.zeros(k, dtype=torch.bool, device=device),
                    "active": torch.ones(k, dtype=torch.bool, device=device)}
        stale, steps = counters["stale"], counters["steps"]
        stopped_early, active = counters["stopped_early"], counters["active"]
        first = 0
        if resume is not None:
            with checkpoint.restoring():
                restore_into(params, resume["params"])
                optimizer.load_state_dict(resume["optimizer"])
                schedule.load_state_dict(resume["schedule"], device)
                best.load_state_dict(resume["best"], device)
                last = to_device(resume["last"], device)
                restore_into(counters, resume)
                first = int(resume["step"])
        for step in range(first, cfg.max_steps):
            rows = active.nonzero().flatten()
            if rows.numel() == 0:
                break
            hits = torch.zeros(rows.numel(), device=device)
            cost = schedule.cost  # fixed during the step: the schedule moves after it
            for chunks in data.batches(rows, cfg.batch_size, cfg.max_batch_images):
                optimizer.zero_grad()
                for sl, batch in chunks:
                    chunk = rows[sl]
                    loss, batch_hits = self._batch_loss(model, slice_rows(params, chunk), batch,
                                                        targets[chunk], cost[chunk])
                    loss.sum().backward()
                    hits[sl] += batch_hits.detach()
                optimizer.step()
            asr = hits / data.count(rows)
            with torch.no_grad():
                current = slice_rows(params, rows)
                trigger = self._trigger(current)
                key = self._best_key(current, trigger)
            for name, value in trigger.items():
                last.setdefault(name, torch.zeros((k, *value.shape[1:]), dtype=value.dtype,
                                                  device=device))
                last[name][rows] = value
            better = best.update(rows, step, key, asr, trigger, asr >= cfg.asr_threshold)
            if bool(better.any()):
                with torch.no_grad():
                    self._adopt(params, rows[better], slice_rows(trigger, better))
            steps[rows] += 1
            if cfg.early_stop_patience is not None:
                early_stop(rows, better, best, schedule, cfg.early_stop_patience, stale,
                           stopped_early, active)
            schedule.update(rows, asr)
            bar.update(1)
            bar.set_postfix(active=int(active.sum()), found=int(best.found.sum()))
            if save is not None:
                save({"params": {name: p.detach() for name, p in params.items()},
                      "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                      "best": best.state_dict(), "last": last, **counters, "step": step + 1})
        return Outcome(best, last, steps, stopped_early)

    def _evaluate(self, model, data: RowImages, k: int, count) -> torch.Tensor:
        """Per-row fraction over the row's images: the sum over all mini-batches
        of count(sl, batch) -> [r], divided by the row's number of images."""
        rows = torch.arange(k, device=data.images.device)
        total = torch.zeros(k, device=data.images.device)
        with torch.no_grad():
            for chunks in data.batches(rows, self.config.batch_size, self.config.max_batch_images):
                for sl, batch in chunks:
                    total[sl] += count(sl, batch)
        return total / data.count(rows)

    def _finish(self, model, data, targets, sources, outcome: Outcome, seed) -> ScanResult:
        best = outcome.best
        found = best.found
        kept = {key: torch.where(found.view(-1, *[1] * (value.dim() - 1)), best.trigger[key], value)
                if key in best.trigger else value for key, value in outcome.last.items()}
        asr = self._evaluate(model, data, targets.shape[0], lambda sl, batch: self._success(
            model, slice_rows(kept, sl), batch, targets[sl]))
        with torch.no_grad():
            statistic = self._statistic(model, data, kept, targets, asr)
        per_row = []
        for i in range(targets.shape[0]):
            reason = "early_stop" if bool(outcome.stopped_early[i]) else "max_steps"
            if not bool(found[i]):
                reason += "; never reached the success threshold (last trigger reported)"
            per_row.append(ClassResult(
                target=int(targets[i]), statistic=float(statistic[i]), asr=float(asr[i]),
                converged=bool(found[i]), steps=int(outcome.steps[i]), stop_reason=reason,
                source=None if sources is None else int(sources[i]),
                trigger={key: value[i].detach().cpu() for key, value in kept.items()}))
        flagged_targets, anomaly = self._verdict(per_row)
        return ScanResult(method=self.name, backdoored=bool(flagged_targets), targets=flagged_targets,
                          per_class=per_row, anomaly=anomaly, config=self.get_params(), seed=seed,
                          elapsed_s=0.0, notes=convergence_notes(per_row))

    def _verdict(self, per_row: list[ClassResult]) -> tuple[list[int], Anomaly]:
        """``mad_test`` over the rows' statistics on `anomaly_side`. The flagged
        targets are those of the flagged rows (pairs list them in
        ``anomaly.details["flagged_pairs"]``)."""
        flagged, anomaly = mad_test([c.statistic for c in per_row], [c.converged for c in per_row],
                                    self.config.anomaly_threshold, self.anomaly_side)
        if per_row[0].source is not None:
            anomaly.details["flagged_pairs"] = [[per_row[i].source, per_row[i].target] for i in flagged]
        return list(dict.fromkeys(per_row[i].target for i in flagged)), anomaly
