"""The contenders of every benchmark case: the fused kernels and plain PyTorch.

Each case builds its inputs with ``make_*`` and exposes callables that run one
complete unit of work (e.g. forward + backward) and return its results, so the
same functions serve the timing benchmarks (bench_*.py), the peak-memory
subprocesses (memory.py) and the agreement checks (bench_*.py::test_agree_*).

Plain-PyTorch contenders, per case:
  naive   -- the formula as written in trigscan.reference, autograd for backward;
  best*   -- the fastest plain-PyTorch form found (torch.lerp / fused clamps,
             broadcasting instead of materialised expands, out= into
             preallocated buffers, backward derived by hand where that beats
             autograd). Several are kept when none wins everywhere.
Nothing in a baseline is made slow on purpose; improvements are welcome.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout
    sys.path.insert(0, str(ROOT))

from trigscan import ops, reference  # noqa: E402

THREADS = 2
SEED = 20260522


def _gen():
    return torch.Generator().manual_seed(SEED)


# ---------------------------------------------------------------------------
# stamp: (1 - m) x + m p, T=10, N=64, 3x32x32, mask [T,1,H,W]
# ---------------------------------------------------------------------------
@dataclass
class StampCase:
    T: int = 10
    N: int = 64
    C: int = 3
    H: int = 32
    W: int = 32
    x: torch.Tensor = None
    mask: torch.Tensor = None
    pattern: torch.Tensor = None
    grad: torch.Tensor = None
    buffers: dict = field(default_factory=dict)

    def __post_init__(self):
        g = _gen()
        T, N, C, H, W = self.T, self.N, self.C, self.H, self.W
        self.x = torch.rand(N, C, H, W, generator=g)
        self.mask = torch.rand(T, 1, H, W, generator=g).requires_grad_()
        self.pattern = torch.rand(T, C, H, W, generator=g).requires_grad_()
        self.grad = torch.randn(T, N, C, H, W, generator=g)

    @property
    def out_shape(self):
        return (self.T, self.N, self.C, self.H, self.W)

    def bytes_moved(self):
        """Minimum traffic of one forward: read x, mask, pattern once, write out."""
        T, N, C, HW = self.T, self.N, self.C, self.H * self.W
        return 4 * (N * C * HW + T * HW + T * C * HW + T * N * C * HW)

    def buffer(self, name, shape):
        buf = self.buffers.get(name)
        if buf is None or tuple(buf.shape) != tuple(shape):
            buf = self.buffers[name] = torch.empty(shape)
        return buf

    # ---- forward only ----
    def fwd_fused(self):
        with torch.no_grad():
            return ops.stamp(self.x, self.mask, self.pattern)

    def fwd_naive(self):
        with torch.no_grad():
            return reference.stamp(self.x, self.mask, self.pattern)

    def fwd_lerp(self):
        with torch.no_grad():
            return torch.lerp(self.x, self.pattern[:, None], self.mask[:, None])

    def fwd_lerp_out(self):
        with torch.no_grad():
            return torch.lerp(self.x, self.pattern[:, None], self.mask[:, None],
                              out=self.buffer("out", self.out_shape))

    # ---- forward + backward (grad for mask and pattern) ----
    def _autograd(self, forward):
        out = forward(self.x, self.mask, self.pattern)
        return torch.autograd.grad(out, (self.mask, self.pattern), self.grad)

    def fb_fused(self):
        return self._autograd(ops.stamp)

    def fb_fused_ops(self):
        """The two public ops called directly, no autograd: the kernels' counterpart
        of `manual` (a caller that derives its own backward, e.g. another scanner
        embedding them). The output is allocated per call and, as under autograd,
        alive until the backward is done."""
        m, p = self.mask.detach(), self.pattern.detach()
        out = ops._ops.stamp.default(self.x, m, p)
        _, grad_mask, grad_pattern = ops._ops.stamp_backward.default(self.grad, self.x, m, p,
                                                                     False)
        del out
        return grad_mask, grad_pattern

    def fb_naive(self):
        return self._autograd(reference.stamp)

    def fb_lerp_autograd(self):
        return self._autograd(lambda x, m, p: torch.lerp(x, p[:, None], m[:, None]))

    def fb_manual(self):
        """lerp forward into a preallocated buffer; backward by hand:
        grad_p = m * sum_n g,  grad_m = sum_c (p * sum_n g - sum_n g x)."""
        m, p, g = self.mask.detach(), self.pattern.detach(), self.grad
        T, N = self.T, self.N
        torch.lerp(self.x, p[:, None], m[:, None], out=self.buffer("out", self.out_shape))
        g_sum = g.sum(1)                                               # [T,C,H,W]
        gx = (g.view(T, N, -1) * self.x.view(1, N, -1)).sum(1).view_as(g_sum)
        grad_pattern = g_sum * m
        grad_mask = (g_sum * p - gx).sum(1, keepdim=True)
        return grad_mask, grad_pattern


# ---------------------------------------------------------------------------
# NES step: nes_sample_stamp + nes_grad, T=10, k=50 (S = 2k rows), N=32
# ---------------------------------------------------------------------------
NES_SHAPES = {"1x24x24": (1, 24, 24), "3x32x32": (3, 32, 32)}


@dataclass
class NesCase:
    C: int = 3
    H: int = 32
    W: int = 32
    T: int = 10
    k: int = 50
    N: int = 32
    sigma: float = 0.1
    seed: int = 1234
    offset: int = 0

    def __post_init__(self):
        g = _gen()
        T, N, C, H, W = self.T, self.N, self.C, self.H, self.W
        self.x = torch.rand(N, C, H, W, generator=g)
        self.theta_m = torch.randn(T, 1, H, W, generator=g)
        self.theta_p = torch.randn(T, C, H, W, generator=g)
        # the model's loss for every query row (in a scan: model(out) -> loss)
        self.losses = torch.randn(T, 2 * self.k, generator=g)
        self.prealloc = None
        self.fused_buffer = None

    @property
    def out_shape(self):
        return (self.T, 2 * self.k, self.N, self.C, self.H, self.W)

    def out_bytes(self):
        return 4 * self.T * 2 * self.k * self.N * self.C * self.H * self.W

    def samples_bytes(self):
        return 4 * self.T * self.k * (self.C + 1) * self.H * self.W

    def fused(self):
        """Samples drawn inside the kernel from Philox, regenerated by nes_grad."""
        a = (self.k, self.sigma, self.seed, self.offset, False)
        out = ops.nes_sample_stamp(self.x, self.theta_m, self.theta_p, *a)
        grad_m, grad_p = ops.nes_grad(self.losses, self.theta_m, self.theta_p, *a, False)
        return out, grad_m, grad_p

    def fused_prealloc(self):
        """fused, but the query batch is written into one buffer reused every
        step (nes_sample_stamp(..., out=)), as best_prealloc reuses its output."""
        if self.fused_buffer is None:
            self.fused_buffer = torch.empty(self.out_shape)
        a = (self.k, self.sigma, self.seed, self.offset, False)
        out = ops.nes_sample_stamp(self.x, self.theta_m, self.theta_p, *a, out=self.fused_buffer)
        grad_m, grad_p = ops.nes_grad(self.losses, self.theta_m, self.theta_p, *a, False)
        return out, grad_m, grad_p

    def naive(self):
        """torch.bernoulli / torch.randn samples, trigscan.reference formulas."""
        T, k = self.T, self.k
        prob = reference.squash(self.theta_m)[:, None].expand(T, k, *self.theta_m.shape[1:])
        masks = torch.bernoulli(prob)
        eps = torch.randn(T, k, *self.theta_p.shape[1:])
        out = reference.nes_sample_stamp(self.x, masks, eps, self.theta_m, self.theta_p,
                                         self.sigma, False)
        grad_m, grad_p = reference.nes_grad(self.losses, masks, eps, self.theta_m, self.sigma,
                                            False, False)
        return out, grad_m, grad_p

    def _best(self, out, masks=None, eps=None):
        T, k, sigma = self.T, self.k, self.sigma
        tm, tp = self.theta_m, self.theta_p
        prob = torch.sigmoid(2 * tm)                               # g(z) = sigmoid(2z)
        if masks is None:  # (the agreement test passes the kernel's samples instead)
            masks = (torch.rand(T, k, *tm.shape[1:]) < prob[:, None]).float()  # Bernoulli
            eps = torch.randn(T, k, *tp.shape[1:])
        pattern = torch.sigmoid(2 * tp)
        noisy = torch.sigmoid((2 * sigma) * eps + (2 * tp)[:, None])
        x = self.x
        # rows j < k: (m_j, g(theta_p)); rows k + j: (g(theta_m), g(theta_p + sigma eps_j))
        torch.lerp(x, pattern[:, None, None], masks[:, :, None], out=out[:, :k])
        torch.lerp(x, noisy[:, :, None], prob[:, None, None], out=out[:, k:])
        f_m = self.losses[:, None, :k]
        f_p = self.losses[:, None, k:]
        grad_m = torch.bmm(f_m, (masks - prob[:, None]).flatten(2)).view_as(tm) * (2.0 / k)
        grad_p = torch.bmm(f_p, eps.flatten(2)).view_as(tp) / (k * sigma)
        return out, grad_m, grad_p

    def best(self):
        """rand < p for the masks, randn, lerp with broadcasting into one fresh
        output, gradients as batched matmuls over the materialised samples."""
        return self._best(torch.empty(self.out_shape))

    def best_prealloc(self):
        """best, but the output buffer is allocated once and reused every step."""
        if self.prealloc is None:
            self.prealloc = torch.empty(self.out_shape)
        return self._best(self.prealloc)


# ---------------------------------------------------------------------------
# PixelBackdoor: pixel_stamp + pixel_size_loss, forward + backward
# ---------------------------------------------------------------------------
@dataclass
class PixelCase:
    T: int = 10
    N: int = 64
    C: int = 3
    H: int = 32
    W: int = 32
    maxp: float = 1.0
    gamma: float = 10.0
    use_tanh: bool = False

    def __post_init__(self):
        g = _gen()
        T, N, C, H, W = self.T, self.N, self.C, self.H, self.W
        self.x = torch.rand(N, C, H, W, generator=g)
        # b in [-0.25, 0.25]: about half the pixels are clipped on each side
        self.b_p = ((torch.rand(T, C, H, W, generator=g) - 0.5) * 0.5).requires_grad_()
        self.b_n = ((torch.rand(T, C, H, W, generator=g) - 0.5) * 0.5).requires_grad_()
        self.grad = torch.randn(T, N, C, H, W, generator=g)
        self.grad_size = torch.randn(T, generator=g)
        self.buffers = {}

    def _autograd(self, stamp, size):
        out = stamp(self.x, self.b_p, self.b_n, self.maxp, self.use_tanh)
        loss = size(self.b_p, self.b_n, self.gamma)
        return torch.autograd.grad((out, loss), (self.b_p, self.b_n),
                                   (self.grad, self.grad_size))

    def fused(self):
        return self._autograd(ops.pixel_stamp, ops.pixel_size_loss)

    def naive(self):
        return self._autograd(reference.pixel_stamp, reference.pixel_size_loss)

    def best_autograd(self):
        """Fewer temporaries than the reference: one clamp per perturbation,
        sigmoid for g, amax for the channel max; autograd for backward."""
        def stamp(x, b_p, b_n, maxp, use_tanh):
            if use_tanh:
                delta = (torch.sigmoid(2 * b_p) - torch.sigmoid(2 * b_n)) * maxp
            else:
                delta = torch.clamp(b_p * maxp, 0, maxp) - torch.clamp(b_n * maxp, 0, maxp)
            return torch.clamp(x + delta[:, None], 0, maxp)

        def size(b_p, b_n, gamma):
            return (torch.sigmoid(b_p.max(1).values * (2 / gamma)).sum((1, 2))
                    + torch.sigmoid(b_n.max(1).values * (2 / gamma)).sum((1, 2)))
        return self._autograd(stamp, size)

    def best_manual(self):
        """Forward into a preallocated buffer, backward by hand (clip=False):
        passed = g where 0 <= x + d <= maxp; grad_b = +-(sum_n passed) * P'(b);
        size gradient scattered to the first argmax channel."""
        assert not self.use_tanh
        maxp, gamma = self.maxp, self.gamma
        b_p, b_n, x, g = self.b_p.detach(), self.b_n.detach(), self.x, self.grad
        T, N, C, H, W = self.T, self.N, self.C, self.H, self.W
        out = self.buffers.get("out")
        if out is None:
            out = self.buffers["out"] = torch.empty(T, N, C, H, W)
        pp = torch.clamp(b_p * maxp, 0, maxp)
        pn = torch.clamp(b_n * maxp, 0, maxp)
        torch.add(x, (pp - pn)[:, None], out=out)                      # unclipped y
        inside = (out >= 0) & (out <= maxp)
        passed_sum = torch.where(inside, g, 0).sum(1)                  # [T,C,H,W]
        out.clamp_(0, maxp)                                            # the forward result
        dp = ((b_p * maxp >= 0) & (b_p * maxp <= maxp)) * maxp
        dn = ((b_n * maxp >= 0) & (b_n * maxp <= maxp)) * maxp
        grad_p = passed_sum * dp
        grad_n = -passed_sum * dn
        for b, grad_b in ((b_p, grad_p), (b_n, grad_n)):
            best, arg = b.max(1, keepdim=True)
            s = torch.sigmoid(best * (2 / gamma))
            grad_b.scatter_add_(1, arg, self.grad_size[:, None, None, None]
                                * (2 * s * (1 - s)) / gamma)
        return grad_p, grad_n


def copy_bandwidth_buffers(nbytes):
    """Source and destination of the memory-copy bandwidth probe."""
    src = torch.empty(nbytes // 4).uniform_()
    dst = torch.empty_like(src)
    dst.copy_(src)  # fault the pages in
    return src, dst
