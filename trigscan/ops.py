"""The Python face of the kernels: ``torch.ops.trigscan.*`` with fake kernels
(for torch.compile / meta tensors) and autograd formulas registered here.

Shapes: x [N,C,H,W]; T triggers; mask [T,1|C,H,W]; pattern [T,C,H,W];
outputs [T,N,C,H,W] (stamps) or [T,S,N,C,H,W] (NES query batches).
The formulas are documented on each wrapper and in the README; plain-PyTorch
equivalents live in :mod:`trigscan.reference`.
"""
from __future__ import annotations

import torch

from ._extension import assert_has_ops

assert_has_ops()
_ops = torch.ops.trigscan


# ---------------------------------------------------------------------------
# Typed wrappers (the documented API; torch.ops.trigscan.<name> is the same op)
# ---------------------------------------------------------------------------
def stamp(x: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """(1 - m) * x + m * p for every (trigger, image) -> [T, N, C, H, W].

    Differentiable in x, mask and pattern.
    """
    return _ops.stamp.default(x, mask, pattern)


def nes_sample_stamp(x, theta_m, theta_p, k: int, sigma: float, seed: int, offset: int,
                     joint: bool = False, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """The B3D query batch [T, S, N, C, H, W], samples drawn in-kernel (Philox).

    joint=False (the paper), S = 2k: rows j < k stamp Bernoulli masks
    m_j ~ B(g(theta_m)) with pattern g(theta_p); rows k + j stamp mask
    g(theta_m) with pattern g(theta_p + sigma * eps_j). joint=True, S = k: row j
    stamps (m_j, g(theta_p + sigma * eps_j)). g(z) = (tanh z + 1) / 2.

    out: an optional contiguous float32 buffer of that shape, written in place
    and returned (``nes_sample_stamp_out``); a scan loop that reuses one buffer
    for every step avoids mapping a fresh output (tens to hundreds of MiB) each time.
    """
    if out is not None:
        _ops.nes_sample_stamp_out.default(x, theta_m, theta_p, k, sigma, seed, offset, joint, out)
        return out
    return _ops.nes_sample_stamp.default(x, theta_m, theta_p, k, sigma, seed, offset, joint)


def nes_grad(losses, theta_m, theta_p, k: int, sigma: float, seed: int, offset: int,
             joint: bool = False, baseline: bool = False):
    """NES estimates (grad_theta_m, grad_theta_p) from losses [T, S] of the batch
    that nes_sample_stamp made with the same (k, seed, offset, joint).

    grad_theta_m = 1/k sum_j F_j 2 (m_j - g(theta_m)),
    grad_theta_p = 1/(k sigma) sum_j F_j eps_j,
    with F_j replaced by F_j - mean_j F_j when baseline=True. The samples are
    regenerated from the counter, never stored.
    """
    return _ops.nes_grad.default(losses, theta_m, theta_p, k, sigma, seed, offset, joint, baseline)


def nes_samples(theta_m, theta_p, k: int, seed: int, offset: int):
    """The raw samples behind nes_sample_stamp / nes_grad, materialised:
    masks [T, k, Cm, H, W] (0/1) and eps [T, k, C, H, W]. For tests and for
    embedding scanners that want the samples themselves."""
    return _ops.nes_samples.default(theta_m, theta_p, k, seed, offset)


def pixel_stamp(x, b_p, b_n, maxp: float = 1.0, use_tanh: bool = False) -> torch.Tensor:
    """PixelBackdoor's trigger: clip(x + P(b_p) - P(b_n), 0, maxp) -> [T, N, C, H, W],
    P(b) = clip(b * maxp, 0, maxp) (use_tanh=False) or g(b) * maxp.
    Differentiable in x, b_p, b_n (clip passes the gradient at its bounds, as torch.clamp)."""
    return _ops.pixel_stamp.default(x, b_p, b_n, maxp, use_tanh)


def pixel_size_loss(b_p, b_n, gamma: float = 10.0) -> torch.Tensor:
    """[T]: sum over pixels of max over channels of g(b_p / gamma), plus the same for b_n.
    The gradient of the channel max goes to the first channel that holds it."""
    return _ops.pixel_size_loss.default(b_p, b_n, gamma)


# ---------------------------------------------------------------------------
# Fake kernels: shapes only, no data
# ---------------------------------------------------------------------------
def _check_fake(op, **tensors):
    """What the C++ checks verify, for meta/fake tensors: ranks and one device.

    (With a meta tensor among the inputs the dispatcher runs these fake kernels
    instead of the C++ ones, so they must reject what the kernels reject.)
    """
    devices = {name: t.device for name, t in tensors.items()}
    first_name, first_device = next(iter(devices.items()))
    for name, device in devices.items():
        if device != first_device:
            raise ValueError(f"trigscan.{op}: {name} is on {device} but {first_name} is on "
                             f"{first_device}; move both to one device")
    for name, t in tensors.items():
        if name not in ("grad", "losses", "out") and t.dim() != 4:
            raise ValueError(f"trigscan.{op}: {name} must be 4-D, got shape {tuple(t.shape)}")


@torch.library.register_fake("trigscan::stamp")
def _(x, mask, pattern):
    _check_fake("stamp", x=x, mask=mask, pattern=pattern)
    return x.new_empty((pattern.shape[0], *x.shape))


def _grad_x_like(x, need_grad_x):
    """grad_x of the backward ops: like x, or an empty [0] when not requested."""
    return torch.empty_like(x) if need_grad_x else x.new_empty((0,))


@torch.library.register_fake("trigscan::stamp_backward")
def _(grad, x, mask, pattern, need_grad_x=True):
    _check_fake("stamp_backward", grad=grad, x=x, mask=mask, pattern=pattern)
    return _grad_x_like(x, need_grad_x), torch.empty_like(mask), torch.empty_like(pattern)


@torch.library.register_fake("trigscan::nes_sample_stamp")
def _(x, theta_m, theta_p, k, sigma, seed, offset, joint):
    _check_fake("nes_sample_stamp", x=x, theta_m=theta_m, theta_p=theta_p)
    rows = k if joint else 2 * k
    return x.new_empty((theta_p.shape[0], rows, *x.shape))


@torch.library.register_fake("trigscan::nes_sample_stamp_out")
def _(x, theta_m, theta_p, k, sigma, seed, offset, joint, out):
    _check_fake("nes_sample_stamp_out", x=x, theta_m=theta_m, theta_p=theta_p, out=out)
    rows = k if joint else 2 * k
    expected = (theta_p.shape[0], rows, *x.shape)
    if tuple(out.shape) != expected:
        raise ValueError(f"trigscan.nes_sample_stamp_out: out must have shape "
                         f"{list(expected)}, got {list(out.shape)}")
    return None


@torch.library.register_fake("trigscan::nes_grad")
def _(losses, theta_m, theta_p, k, sigma, seed, offset, joint, baseline):
    _check_fake("nes_grad", losses=losses, theta_m=theta_m, theta_p=theta_p)
    return torch.empty_like(theta_m), torch.empty_like(theta_p)


@torch.library.register_fake("trigscan::nes_samples")
def _(theta_m, theta_p, k, seed, offset):
    _check_fake("nes_samples", theta_m=theta_m, theta_p=theta_p)
    return (theta_m.new_empty((theta_m.shape[0], k, *theta_m.shape[1:])),
            theta_p.new_empty((theta_p.shape[0], k, *theta_p.shape[1:])))


@torch.library.register_fake("trigscan::pixel_stamp")
def _(x, b_p, b_n, maxp, use_tanh):
    _check_fake("pixel_stamp", x=x, b_p=b_p, b_n=b_n)
    return x.new_empty((b_p.shape[0], *x.shape))


@torch.library.register_fake("trigscan::pixel_stamp_backward")
def _(grad, x, b_p, b_n, maxp, use_tanh, need_grad_x=True):
    _check_fake("pixel_stamp_backward", grad=grad, x=x, b_p=b_p, b_n=b_n)
    return _grad_x_like(x, need_grad_x), torch.empty_like(b_p), torch.empty_like(b_n)


@torch.library.register_fake("trigscan::pixel_size_loss")
def _(b_p, b_n, gamma):
    _check_fake("pixel_size_loss", b_p=b_p, b_n=b_n)
    return b_p.new_empty((b_p.shape[0],))


@torch.library.register_fake("trigscan::pixel_size_loss_backward")
def _(grad, b_p, b_n, gamma):
    _check_fake("pixel_size_loss_backward", grad=grad, b_p=b_p, b_n=b_n)
    return torch.empty_like(b_p), torch.empty_like(b_n)


# ---------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------
def _save_inputs(ctx, inputs, output):
    ctx.save_for_backward(*[t for t in inputs if isinstance(t, torch.Tensor)])
    ctx.scalars = [a for a in inputs if not isinstance(a, torch.Tensor)]


def _stamp_backward(ctx, grad):
    x, mask, pattern = ctx.saved_tensors
    needs = ctx.needs_input_grad
    grad_x, grad_mask, grad_pattern = _ops.stamp_backward.default(grad, x, mask, pattern,
                                                                  needs[0])
    return (grad_x if needs[0] else None, grad_mask if needs[1] else None,
            grad_pattern if needs[2] else None)


def _pixel_stamp_backward(ctx, grad):
    x, b_p, b_n = ctx.saved_tensors
    maxp, use_tanh = ctx.scalars
    needs = ctx.needs_input_grad
    grad_x, grad_p, grad_n = _ops.pixel_stamp_backward.default(grad, x, b_p, b_n, maxp, use_tanh,
                                                               needs[0])
    return (grad_x if needs[0] else None, grad_p if needs[1] else None,
            grad_n if needs[2] else None, None, None)


def _pixel_size_loss_backward(ctx, grad):
    b_p, b_n = ctx.saved_tensors
    (gamma,) = ctx.scalars
    grad_p, grad_n = _ops.pixel_size_loss_backward.default(grad, b_p, b_n, gamma)
    needs = ctx.needs_input_grad
    return grad_p if needs[0] else None, grad_n if needs[1] else None, None


torch.library.register_autograd("trigscan::stamp", _stamp_backward, setup_context=_save_inputs)
torch.library.register_autograd("trigscan::pixel_stamp", _pixel_stamp_backward,
                                setup_context=_save_inputs)
torch.library.register_autograd("trigscan::pixel_size_loss", _pixel_size_loss_backward,
                                setup_context=_save_inputs)


def _not_differentiable(name):
    def backward(ctx, *grads):
        raise RuntimeError(f"trigscan.{name} is not differentiable: B3D never backpropagates "
                           "through the model; estimate gradients with trigscan.ops.nes_grad")
    return backward


# The NES ops are query-side: say so instead of silently returning no gradient.
# (nes_sample_stamp_out mutates its out argument; torch.library accepts no
# autograd formula for such ops, and out= ops are not differentiable anyway.)
for _name in ("nes_sample_stamp", "nes_grad", "nes_samples"):
    torch.library.register_autograd(f"trigscan::{_name}", _not_differentiable(_name),
                                    setup_context=_save_inputs)
