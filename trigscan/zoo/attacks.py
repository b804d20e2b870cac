"""Backdoor triggers and training-set poisoning.

A *trigger* turns clean images into triggered ones (``trigger.apply(x)``); it is
a small dataclass whose fields say exactly what it does, so ``to_dict`` /
:func:`trigger_from_dict` round-trip it through ``truth.json``.  A *rule* says
which images get a trigger and what label they then carry; :func:`poison`
applies a list of rules to a training set and records the indices it touched.

Triggers (x' is clipped to [0, 1] wherever a value could leave it):

* :class:`Patch` — BadNets: a ``size``×``size`` block replaces the pixels,
  at a fixed position or at a random one per image.
* :class:`Blend` — x' = (1 − alpha)·x + alpha·p with a full-image noise pattern p.
* :class:`SparseAdditive` — L-RED's global pattern: ``n_pixels`` random pixel
  locations raised by ``amount`` (all channels).
* :class:`SquareAdditive` — L-RED's local pattern: a ``size``×``size`` square
  raised by ``amount``.
* :class:`Sinusoid` — SIG: x' = x + amount·sin(2π·frequency·w / W), for clean-label poisoning.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def _check_images(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or not x.is_floating_point():
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"x: expected a float tensor [N, C, H, W], got {got}")


class Trigger:
    """Base: ``apply(x)`` returns triggered copies of images ``x`` [N, C, H, W]."""

    kind = ""

    def apply(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        raise NotImplementedError

    def to_dict(self) -> dict:
        d = {"kind": self.kind}
        for k, v in asdict(self).items():
            d[k] = list(v) if isinstance(v, tuple) else v
        return d

    def describe(self, shape) -> dict:
        """Measured properties of the trigger on images of ``shape`` (C, H, W)."""
        return {}


def _place(size: int, extent: int, pos: int) -> int:
    start = pos if pos >= 0 else extent + pos  # negative = counted from the far edge
    if not 0 <= start <= extent - size:
        raise ValueError(f"position: a {size}-pixel patch at {pos} does not fit in {extent} pixels")
    return start


def _square(size: int, position: tuple, h: int, w: int) -> tuple[slice, slice]:
    """(rows, cols) of a size×size square at ``position`` (row, col; negative from the far edge)."""
    r, q = _place(size, h, position[0]), _place(size, w, position[1])
    return slice(r, r + size), slice(q, q + size)


@dataclass
class Patch(Trigger):
    """BadNets: paste a ``size``×``size`` block.

    ``position`` is (row, col) of the block's top-left corner — negative values
    count from the bottom/right edge like Python indices — or "random" for a
    new position per image.  ``pattern``: "checker" (alternating 1/0),
    "random" (uniform values, per channel, from ``seed``) or "solid" (all 1).
    """

    size: int = 3
    position: tuple | str = (-4, -4)
    pattern: str = "checker"
    seed: int = 0
    kind = "patch"

    def __post_init__(self):
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"size: expected a positive integer, got {self.size!r}")
        if self.pattern not in ("checker", "random", "solid"):
            raise ValueError(f"pattern: expected 'checker', 'random' or 'solid', got {self.pattern!r}")
        if isinstance(self.position, list):
            self.position = tuple(self.position)
        if self.position != "random" and not (
            isinstance(self.position, tuple) and len(self.position) == 2 and all(isinstance(p, int) for p in self.position)
        ):
            raise ValueError(f"position: expected (row, col) integers or 'random', got {self.position!r}")

    def block(self, channels: int) -> torch.Tensor:
        s = self.size
        if self.pattern == "checker":
            ij = torch.arange(s)
            b = ((ij[:, None] + ij[None, :]) % 2 == 0).float().expand(channels, s, s)
        elif self.pattern == "solid":
            b = torch.ones(channels, s, s)
        else:
            b = torch.rand(channels, s, s, generator=_generator(self.seed))
        return b.contiguous()

    def region(self, h: int, w: int) -> tuple[slice, slice] | None:
        """(rows, cols) of the block in h×w images; None when the position is random."""
        return None if self.position == "random" else _square(self.size, self.position, h, w)

    def apply(self, x, generator=None):
        _check_images(x)
        n, c, h, w = x.shape
        s = self.size
        if s > h or s > w:
            raise ValueError(f"size: a {s}-pixel patch does not fit {h}x{w} images")
        out = x.clone()
        blk = self.block(c).to(x.dtype)
        if self.position == "random":
            g = generator if generator is not None else _generator(self.seed + 1)
            rows = torch.randint(0, h - s + 1, (n,), generator=g)
            cols = torch.randint(0, w - s + 1, (n,), generator=g)
            for i, (r, q) in enumerate(zip(rows.tolist(), cols.tolist())):
                out[i, :, r : r + s, q : q + s] = blk
        else:
            out[(slice(None), slice(None)) + self.region(h, w)] = blk
        return out

    def describe(self, shape):
        c, h, w = shape
        return {"area_fraction": self.size * self.size / (h * w)}


@dataclass
class Blend(Trigger):
    """Blended injection: x' = (1 − alpha)·x + alpha·p, p uniform noise from ``seed``."""

    alpha: float = 0.15
    seed: int = 0
    kind = "blend"

    def __post_init__(self):
        if not 0.0 < self.alpha <= 1.0:
            raise ValueError(f"alpha: expected a number in (0, 1], got {self.alpha!r}")

    def pattern(self, shape) -> torch.Tensor:
        return torch.rand(tuple(shape), generator=_generator(self.seed))

    def apply(self, x, generator=None):
        _check_images(x)
        p = self.pattern(x.shape[1:]).to(x.dtype)
        return (1 - self.alpha) * x + self.alpha * p


class _Additive(Trigger):
    """x' = clip(x + delta) with a fixed perturbation ``delta`` [C, H, W]."""

    def delta(self, shape) -> torch.Tensor:
        raise NotImplementedError

    def apply(self, x, generator=None):
        _check_images(x)
        return (x + self.delta(x.shape[1:]).to(x.dtype)).clamp(0.0, 1.0)

    def describe(self, shape):
        d = self.delta(shape)
        return {"l2": float(d.norm()), "linf": float(d.abs().max())}


def _check_amount(amount) -> None:
    if not 0.0 < abs(amount) <= 1.0:
        raise ValueError(f"amount: expected a magnitude in (0, 1], got {amount!r}")


@dataclass
class SparseAdditive(_Additive):
    """L-RED global pattern: ``n_pixels`` random locations (from ``seed``) + ``amount``."""

    n_pixels: int = 20
    amount: float = 0.25
    seed: int = 0
    kind = "sparse_additive"

    def __post_init__(self):
        _check_amount(self.amount)
        if isinstance(self.n_pixels, bool) or not isinstance(self.n_pixels, int) or self.n_pixels < 1:
            raise ValueError(f"n_pixels: expected a positive integer, got {self.n_pixels!r}")

    def delta(self, shape):
        c, h, w = shape
        if self.n_pixels > h * w:
            raise ValueError(f"n_pixels: {self.n_pixels} exceeds the {h * w} pixels of the image")
        where = torch.randperm(h * w, generator=_generator(self.seed))[: self.n_pixels]
        d = torch.zeros(h * w)
        d[where] = self.amount
        return d.view(1, h, w).expand(c, h, w).contiguous()


@dataclass
class SquareAdditive(_Additive):
    """L-RED local pattern: a ``size``×``size`` square at ``position`` (row, col) + ``amount``."""

    size: int = 4
    amount: float = 0.2
    position: tuple = (2, 2)
    kind = "square_additive"

    def __post_init__(self):
        _check_amount(self.amount)
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"size: expected a positive integer, got {self.size!r}")
        self.position = tuple(self.position)
        if len(self.position) != 2 or not all(isinstance(p, int) for p in self.position):
            raise ValueError(f"position: expected (row, col) integers, got {self.position!r}")

    def delta(self, shape):
        c, h, w = shape
        d = torch.zeros(c, h, w)
        d[(slice(None),) + _square(self.size, self.position, h, w)] = self.amount
        return d


@dataclass
class Sinusoid(_Additive):
    """SIG's horizontal sinusoidal signal: delta[h, w] = amount·sin(2π·frequency·w / W)."""

    amount: float = 0.2
    frequency: float = 6.0
    kind = "sinusoid"

    def __post_init__(self):
        _check_amount(self.amount)

    def delta(self, shape):
        c, h, w = shape
        wave = self.amount * torch.sin(2 * math.pi * self.frequency * torch.arange(w, dtype=torch.float64) / w)
        return wave.float().view(1, 1, w).expand(c, h, w).contiguous()


TRIGGERS = {cls.kind: cls for cls in (Patch, Blend, SparseAdditive, SquareAdditive, Sinusoid)}


def trigger_from_dict(d: dict) -> Trigger:
    """Rebuild a trigger from :meth:`Trigger.to_dict` (e.g. read from ``truth.json``)."""
    d = dict(d)
    kind = d.pop("kind", None)
    if kind not in TRIGGERS:
        raise ValueError(f"kind: unknown trigger {kind!r} (known: {', '.join(TRIGGERS)})")
    names = {f.name for f in fields(TRIGGERS[kind])}
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"{kind}: unknown field(s) {sorted(unknown)}")
    return TRIGGERS[kind](**d)


@dataclass
class Rule:
    """One backdoor: images stamped with ``trigger`` should be classified as ``target``.

    ``rate`` is the fraction of the *whole* training set this rule poisons.
    ``sources``: only images of these classes are poisoned (source-specific);
    ``cover_rate`` then adds stamped images of other classes that keep their
    label, so the trigger does not work outside the sources.
    ``clean_label``: poison only images of the target class and keep labels (SIG).
    ``test_trigger``: what the attacker stamps at inference, when it differs
    from the training trigger (SIG strengthens its signal at test time).
    """

    trigger: Trigger
    target: int
    rate: float = 0.1
    sources: tuple | None = None
    cover_rate: float = 0.0
    clean_label: bool = False
    test_trigger: Trigger | None = None

    @property
    def attack_trigger(self) -> Trigger:
        return self.test_trigger if self.test_trigger is not None else self.trigger

    def __post_init__(self):
        if not 0.0 < self.rate < 1.0:
            raise ValueError(f"rate: expected a fraction in (0, 1), got {self.rate!r}")
        if not 0.0 <= self.cover_rate < 1.0:
            raise ValueError(f"cover_rate: expected a fraction in [0, 1), got {self.cover_rate!r}")
        if self.sources is not None:
            self.sources = tuple(int(s) for s in self.sources)
            if self.target in self.sources:
                raise ValueError(f"sources: must not contain the target class {self.target}")
        if self.cover_rate and self.sources is None:
            raise ValueError("cover_rate: only meaningful with sources (source-specific attacks)")

    def victims(self, y: torch.Tensor) -> torch.Tensor:
        """Boolean mask of images the backdoor should flip (true label not the target, in sources)."""
        ok = y != self.target
        if self.sources is not None:
            ok &= torch.isin(y, torch.tensor(self.sources))
        return ok

    def to_dict(self) -> dict:
        return {
            "trigger": self.trigger.to_dict(),
            "target": self.target,
            "rate": self.rate,
            "sources": None if self.sources is None else list(self.sources),
            "cover_rate": self.cover_rate,
            "clean_label": self.clean_label,
            "test_trigger": None if self.test_trigger is None else self.test_trigger.to_dict(),
        }


@dataclass
class Poisoned:
    """A poisoned training set and exactly what was done to it."""

    x: torch.Tensor
    y: torch.Tensor  # labels as trained on (relabelled to the target where poisoned)
    poisoned: np.ndarray  # indices of stamped images that carry the target label
    rule_of: np.ndarray  # rule index for each entry of ``poisoned``
    cover: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # stamped, label kept


def poison(x: torch.Tensor, y: torch.Tensor, rules: list[Rule], seed: int = 0) -> Poisoned:
    """Apply ``rules`` in order to a copy of (x, y); each image is touched at most once.

    Rule i stamps ``round(rate · N)`` images drawn at random (numpy generator
    from ``seed``) among those it may use and not yet taken by an earlier rule.
    """
    _check_images(x)
    if len(x) != len(y):
        raise ValueError(f"y: expected {len(x)} labels, got {len(y)}")
    rng = np.random.default_rng(seed)
    y0 = y.clone()  # eligibility always by the true labels, not by earlier relabelling
    x, y = x.clone(), y.clone()
    n = len(y)
    taken = np.zeros(n, dtype=bool)
    poisoned, rule_of, cover = [], [], []
    yn = y0.numpy()

    def draw(eligible: np.ndarray, count: int, what: str) -> np.ndarray:
        pool = np.flatnonzero(eligible & ~taken)
        if count > len(pool):
            raise ValueError(f"{what}: needs {count} images but only {len(pool)} are eligible")
        chosen = np.sort(rng.choice(pool, size=count, replace=False))
        taken[chosen] = True
        return chosen

    for i, rule in enumerate(rules):
        g = _generator(seed * 1000 + i)  # random-position triggers: own stream per rule
        eligible = (yn == rule.target) if rule.clean_label else rule.victims(y0).numpy()
        idx = draw(eligible, int(round(rule.rate * n)), f"rules[{i}].rate")
        sel = torch.from_numpy(idx)
        x[sel] = rule.trigger.apply(x[sel], generator=g)
        y[sel] = rule.target
        poisoned.append(idx)
        rule_of.append(np.full(len(idx), i, dtype=np.int64))
        if rule.cover_rate:
            others = ~rule.victims(y0).numpy() & (yn != rule.target)
            cidx = draw(others, int(round(rule.cover_rate * n)), f"rules[{i}].cover_rate")
            csel = torch.from_numpy(cidx)
            x[csel] = rule.trigger.apply(x[csel], generator=g)
            cover.append(cidx)

    cat = lambda parts: np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)  # noqa: E731
    return Poisoned(x=x, y=y, poisoned=cat(poisoned), rule_of=cat(rule_of), cover=cat(cover))
