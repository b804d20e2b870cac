"""Every torch.ops.trigscan op against trigscan.reference (issue #2, "Must show").

* values and gradients equal the plain-PyTorch reference on random shapes
  (hypothesis; both mask layouts [T,1,H,W] and [T,C,H,W]); the NES ops are fed
  the samples that ops.nes_samples materialises (their bit-exactness against the
  Python RNG contract is tests/test_rng.py's job);
* torch.autograd.gradcheck in float64 for the differentiable ops;
* torch.library.opcheck on every op, with and without requires_grad where the
  op is differentiable;
* meta tensors give the right shapes, torch.compile(fullgraph=True) works;
* non-contiguous inputs give the same results as contiguous ones;
* bad input raises ValueError / TypeError naming the argument.
"""
from __future__ import annotations

import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import trigscan  # noqa: F401  (loads the extension)
from trigscan import ops, reference

OPS = torch.ops.trigscan
HYP = settings(max_examples=50, deadline=None, derandomize=True, database=None)


# ---------------------------------------------------------------------------
# shapes and data
# ---------------------------------------------------------------------------
@st.composite
def shapes(draw):
    """(T, N, C, Cm, H, W) with both mask layouts."""
    T = draw(st.integers(1, 3))
    N = draw(st.integers(1, 3))
    C = draw(st.sampled_from([1, 3]))
    H = draw(st.integers(1, 5))
    W = draw(st.integers(1, 5))
    Cm = draw(st.sampled_from(sorted({1, C})))
    return T, N, C, Cm, H, W


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _rand(gen, *shape, dtype=torch.float32, lo=0.0, hi=1.0):
    return (torch.rand(*shape, generator=gen, dtype=torch.float64) * (hi - lo) + lo).to(dtype)


def _randn(gen, *shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


def _tol(dtype):
    return dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-12, rtol=1e-12)


def _grads(fn, inputs, grad_out):
    """Gradients of <fn(*inputs), grad_out> w.r.t. every input, via autograd."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    return out, torch.autograd.grad(out, leaves, grad_out)


# ---------------------------------------------------------------------------
# stamp
# ---------------------------------------------------------------------------
@HYP
@given(shape=shapes(), dtype=st.sampled_from([torch.float32, torch.float64]),
       seed=st.integers(0, 2**31 - 1))
def test_stamp_matches_reference(shape, dtype, seed):
    T, N, C, Cm, H, W = shape
    gen = _gen(seed)
    x = _rand(gen, N, C, H, W, dtype=dtype)
    mask = _rand(gen, T, Cm, H, W, dtype=dtype)
    pattern = _rand(gen, T, C, H, W, dtype=dtype)
    grad_out = _randn(gen, T, N, C, H, W, dtype=dtype)
    out, grads = _grads(ops.stamp, (x, mask, pattern), grad_out)
    ref_out, ref_grads = _grads(reference.stamp, (x, mask, pattern), grad_out)
    assert out.shape == (T, N, C, H, W) and out.dtype == dtype
    torch.testing.assert_close(out, ref_out, **_tol(dtype))
    for name, got, want in zip(("x", "mask", "pattern"), grads, ref_grads):
        assert got.shape == want.shape, name
        torch.testing.assert_close(got, want, **_tol(dtype), msg=lambda m, n=name: f"{n}: {m}")


def test_stamp_backward_op_matches_formula():
    gen = _gen(1)
    T, N, C, H, W = 2, 3, 3, 4, 5
    x, pattern = _rand(gen, N, C, H, W), _rand(gen, T, C, H, W)
    grad = _randn(gen, T, N, C, H, W)
    for mask in (_rand(gen, T, 1, H, W), _rand(gen, T, C, H, W)):
        gx, gm, gp = OPS.stamp_backward(grad, x, mask, pattern)
        m, p = mask[:, None], pattern[:, None]
        torch.testing.assert_close(gx, (grad * (1 - m)).sum(0), atol=1e-5, rtol=1e-5)
        want_m = (grad * (p - x[None])).sum(1)
        if mask.shape[1] == 1:
            want_m = want_m.sum(1, keepdim=True)
        torch.testing.assert_close(gm, want_m, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gp, (grad * m).sum(1), atol=1e-5, rtol=1e-5)
        # without grad_x: an empty grad_x, the other two bit for bit the same
        gx0, gm0, gp0 = OPS.stamp_backward(grad, x, mask, pattern, False)
        assert gx0.shape == (0,) and torch.equal(gm0, gm) and torch.equal(gp0, gp)


@pytest.mark.parametrize("op", ["stamp", "pixel_stamp"])
@pytest.mark.parametrize("T, HW", [(1, (3, 5)), (3, (40, 40)), (17, (8, 8))])
def test_backward_without_grad_x_gives_the_same_other_gradients(op, T, HW):
    """need_grad_x=False runs another task layout (trigger, pixel chunk); the
    parameter gradients must not change by a bit, and autograd must use it when
    x needs no gradient."""
    gen = _gen(11)
    N, C = 5, 3
    H, W = HW
    x, grad = _rand(gen, N, C, H, W), _randn(gen, T, N, C, H, W)
    if op == "stamp":
        params = (_rand(gen, T, 1, H, W), _rand(gen, T, C, H, W))
        full = OPS.stamp_backward(grad, x, *params)
        part = OPS.stamp_backward(grad, x, *params, False)
        fwd = ops.stamp
    else:
        params = (_rand(gen, T, C, H, W, lo=-0.5, hi=1.5), _rand(gen, T, C, H, W, lo=-0.5, hi=1.5))
        full = OPS.pixel_stamp_backward(grad, x, *params, 1.0, False)
        part = OPS.pixel_stamp_backward(grad, x, *params, 1.0, False, False)
        fwd = ops.pixel_stamp
    assert part[0].shape == (0,)
    for a, b in zip(part[1:], full[1:]):
        assert torch.equal(a, b)
    leaves = [p.clone().requires_grad_() for p in params]
    got = torch.autograd.grad(fwd(x, *leaves), leaves, grad)
    for a, b in zip(got, full[1:]):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------
# pixel_stamp / pixel_size_loss
# ---------------------------------------------------------------------------
@HYP
@given(shape=shapes(), dtype=st.sampled_from([torch.float32, torch.float64]),
       use_tanh=st.booleans(), maxp=st.sampled_from([1.0, 0.5, 255.0]),
       seed=st.integers(0, 2**31 - 1))
def test_pixel_stamp_matches_reference(shape, dtype, use_tanh, maxp, seed):
    T, N, C, _, H, W = shape
    gen = _gen(seed)
    x = _rand(gen, N, C, H, W, dtype=dtype, hi=maxp)
    # b in [-0.5, 1.5]: both clipped ends of P(b) and the linear part.
    b_p = _rand(gen, T, C, H, W, dtype=dtype, lo=-0.5, hi=1.5)
    b_n = _rand(gen, T, C, H, W, dtype=dtype, lo=-0.5, hi=1.5)
    grad_out = _randn(gen, T, N, C, H, W, dtype=dtype)

    def kernel(x, b_p, b_n):
        return ops.pixel_stamp(x, b_p, b_n, maxp, use_tanh)

    def ref(x, b_p, b_n):
        return reference.pixel_stamp(x, b_p, b_n, maxp, use_tanh)

    out, grads = _grads(kernel, (x, b_p, b_n), grad_out)
    ref_out, ref_grads = _grads(ref, (x, b_p, b_n), grad_out)
    tol = dict(atol=maxp * _tol(dtype)["atol"], rtol=_tol(dtype)["rtol"])
    torch.testing.assert_close(out, ref_out, **tol)
    for name, got, want in zip(("x", "b_p", "b_n"), grads, ref_grads):
        torch.testing.assert_close(got, want, **tol, msg=lambda m, n=name: f"{n}: {m}")


@HYP
@given(shape=shapes(), dtype=st.sampled_from([torch.float32, torch.float64]),
       gamma=st.sampled_from([10.0, 1.0, 0.3]), seed=st.integers(0, 2**31 - 1))
def test_pixel_size_loss_matches_reference(shape, dtype, gamma, seed):
    T, _, C, _, H, W = shape
    gen = _gen(seed)
    b_p = _randn(gen, T, C, H, W, dtype=dtype, scale=3.0)
    b_n = _randn(gen, T, C, H, W, dtype=dtype, scale=3.0)
    grad_out = _randn(gen, T, dtype=dtype)

    def kernel(b_p, b_n):
        return ops.pixel_size_loss(b_p, b_n, gamma)

    def ref(b_p, b_n):
        return reference.pixel_size_loss(b_p, b_n, gamma)

    out, grads = _grads(kernel, (b_p, b_n), grad_out)
    ref_out, ref_grads = _grads(ref, (b_p, b_n), grad_out)
    assert out.shape == (T,)
    torch.testing.assert_close(out, ref_out, **_tol(dtype))
    for name, got, want in zip(("b_p", "b_n"), grads, ref_grads):
        torch.testing.assert_close(got, want, **_tol(dtype), msg=lambda m, n=name: f"{n}: {m}")


def test_pixel_size_loss_gradient_goes_to_first_maximal_channel():
    b = torch.tensor([[[[1.0]], [[2.0]], [[2.0]]]])  # [1, 3, 1, 1], tie in channels 1, 2
    b_p, b_n = b.clone().requires_grad_(), torch.zeros_like(b).requires_grad_()
    ops.pixel_size_loss(b_p, b_n, 1.0).sum().backward()
    g = torch.sigmoid(torch.tensor(4.0))  # g(2) = sigmoid(4)
    expected = torch.tensor([0.0, (2 * g * (1 - g)).item(), 0.0])
    torch.testing.assert_close(b_p.grad.flatten(), expected)
    torch.testing.assert_close(b_n.grad.flatten(), torch.tensor([2 * 0.5 * 0.5, 0.0, 0.0]))


# ---------------------------------------------------------------------------
# NES ops against the reference fed with the materialised samples
# ---------------------------------------------------------------------------
@st.composite
def nes_cases(draw):
    T, N, C, Cm, H, W = draw(shapes())
    return dict(T=T, N=N, C=C, Cm=Cm, H=H, W=W, k=draw(st.integers(1, 5)),
                sigma=draw(st.sampled_from([0.01, 0.1, 1.0, 3.0])),
                seed=draw(st.integers(0, 2**63 - 1)),
                offset=draw(st.integers(0, 2**32 - 1)),
                joint=draw(st.booleans()), data=draw(st.integers(0, 2**31 - 1)))


def _nes_inputs(c):
    gen = _gen(c["data"])
    x = _rand(gen, c["N"], c["C"], c["H"], c["W"])
    theta_m = _randn(gen, c["T"], c["Cm"], c["H"], c["W"], scale=2.0)
    theta_p = _randn(gen, c["T"], c["C"], c["H"], c["W"], scale=2.0)
    return gen, x, theta_m, theta_p


@HYP
@given(c=nes_cases())
def test_nes_sample_stamp_matches_reference(c):
    _, x, theta_m, theta_p = _nes_inputs(c)
    k, sigma, seed, offset, joint = c["k"], c["sigma"], c["seed"], c["offset"], c["joint"]
    out = ops.nes_sample_stamp(x, theta_m, theta_p, k, sigma, seed, offset, joint)
    masks, eps = ops.nes_samples(theta_m, theta_p, k, seed, offset)
    assert masks.shape == (c["T"], k, c["Cm"], c["H"], c["W"])
    assert eps.shape == (c["T"], k, c["C"], c["H"], c["W"])
    ref = reference.nes_sample_stamp(x.double(), masks.double(), eps.double(), theta_m.double(),
                                     theta_p.double(), sigma, joint)
    S = k if joint else 2 * k
    assert out.shape == (c["T"], S, c["N"], c["C"], c["H"], c["W"])
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


@HYP
@given(c=nes_cases())
def test_nes_sample_stamp_out_equals_fresh_output(c):
    """out= writes exactly the fresh op's values into a reused (dirty) buffer."""
    _, x, theta_m, theta_p = _nes_inputs(c)
    args = (x, theta_m, theta_p, c["k"], c["sigma"], c["seed"], c["offset"], c["joint"])
    want = ops.nes_sample_stamp(*args)
    buf = torch.full_like(want, math.nan)
    got = ops.nes_sample_stamp(*args, out=buf)
    assert got is buf and torch.equal(buf, want)
    OPS.nes_sample_stamp_out(*args[:-2], c["offset"] + 1, c["joint"], buf)  # reuse: next step
    assert torch.equal(buf, ops.nes_sample_stamp(*args[:-2], c["offset"] + 1, c["joint"]))


@HYP
@given(c=nes_cases(), baseline=st.booleans())
def test_nes_grad_matches_reference(c, baseline):
    gen, _, theta_m, theta_p = _nes_inputs(c)
    k, sigma, seed, offset, joint = c["k"], c["sigma"], c["seed"], c["offset"], c["joint"]
    S = k if joint else 2 * k
    losses = _randn(gen, c["T"], S, scale=3.0)
    grad_m, grad_p = ops.nes_grad(losses, theta_m, theta_p, k, sigma, seed, offset, joint,
                                  baseline)
    masks, eps = ops.nes_samples(theta_m, theta_p, k, seed, offset)
    ref_m, ref_p = reference.nes_grad(losses.double(), masks.double(), eps.double(),
                                      theta_m.double(), sigma, joint, baseline)
    assert grad_m.shape == theta_m.shape and grad_p.shape == theta_p.shape
    assert grad_m.dtype == grad_p.dtype == torch.float32
    scale = losses.abs().max().item() + 1e-3
    torch.testing.assert_close(grad_m.double(), ref_m, atol=1e-5 * scale, rtol=1e-4)
    torch.testing.assert_close(grad_p.double(), ref_p, atol=1e-5 * scale / sigma, rtol=1e-4)


def test_nes_grad_does_not_depend_on_theta_p_values():
    """theta_p only fixes the shape of the pattern estimate: the estimate is
    F_j eps_j / sigma, regenerated from the counter."""
    gen = _gen(2)
    theta_m, theta_p = _randn(gen, 2, 1, 3, 3), _randn(gen, 2, 3, 3, 3)
    losses = _randn(gen, 2, 8)
    a = ops.nes_grad(losses, theta_m, theta_p, 4, 0.5, 1, 2, False, False)
    b = ops.nes_grad(losses, theta_m, theta_p + 5, 4, 0.5, 1, 2, False, False)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_nes_loss_columns_separate_mode():
    """separate mode: the mask estimate reads columns [0, k), the pattern
    estimate columns [k, 2k)."""
    gen = _gen(3)
    theta_m, theta_p = _randn(gen, 1, 1, 2, 2), _randn(gen, 1, 1, 2, 2)
    k = 3
    only_mask = torch.cat([_randn(gen, 1, k), torch.zeros(1, k)], dim=1)
    only_pattern = torch.cat([torch.zeros(1, k), _randn(gen, 1, k)], dim=1)
    gm, gp = ops.nes_grad(only_mask, theta_m, theta_p, k, 0.5, 4, 5, False, False)
    assert gm.abs().sum() > 0 and torch.all(gp == 0)
    gm, gp = ops.nes_grad(only_pattern, theta_m, theta_p, k, 0.5, 4, 5, False, False)
    assert torch.all(gm == 0) and gp.abs().sum() > 0


# ---------------------------------------------------------------------------
# gradcheck (float64)
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("Cm", [1, 3])
def test_gradcheck_stamp(Cm):
    gen = _gen(4)
    x = _rand(gen, 2, 3, 3, 4, dtype=torch.float64).requires_grad_()
    mask = _rand(gen, 2, Cm, 3, 4, dtype=torch.float64).requires_grad_()
    pattern = _rand(gen, 2, 3, 3, 4, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(ops.stamp, (x, mask, pattern))


def _pixel_inputs_away_from_kinks(use_tanh, maxp, margin=1e-3):
    """x, b_p, b_n (float64) with every clip argument at least `margin` away from
    its bounds: b * maxp vs 0 and maxp, and x + P(b_p) - P(b_n) vs 0 and maxp.
    b covers both clipped ends and the linear part."""
    for seed in range(100):
        gen = _gen(100 + seed)
        x = _rand(gen, 2, 3, 3, 3, dtype=torch.float64, hi=maxp)
        b_p = _rand(gen, 2, 3, 3, 3, dtype=torch.float64, lo=-0.5, hi=1.5)
        b_n = _rand(gen, 2, 3, 3, 3, dtype=torch.float64, lo=-0.5, hi=1.5)
        if not use_tanh:
            scaled = torch.cat([b_p, b_n]) * maxp
            if torch.minimum(scaled.abs(), (scaled - maxp).abs()).min() < margin:
                continue
        y = x[None] + (reference.pixel_perturbation(b_p, maxp, use_tanh)
                       - reference.pixel_perturbation(b_n, maxp, use_tanh))[:, None]
        if torch.minimum(y.abs(), (y - maxp).abs()).min() < margin:
            continue
        inside = ((y > 0) & (y < maxp)).double().mean()
        if 0.2 < inside < 0.95:  # both the clipped and the unclipped branch occur
            return x, b_p, b_n
    raise AssertionError("no test input away from the clip boundaries found")


@pytest.mark.parametrize("use_tanh", [False, True])
@pytest.mark.parametrize("maxp", [1.0, 2.5])
def test_gradcheck_pixel_stamp(use_tanh, maxp):
    x, b_p, b_n = (t.requires_grad_() for t in _pixel_inputs_away_from_kinks(use_tanh, maxp))
    assert torch.autograd.gradcheck(
        lambda x, b_p, b_n: ops.pixel_stamp(x, b_p, b_n, maxp, use_tanh), (x, b_p, b_n))


@pytest.mark.parametrize("C", [1, 3])
def test_gradcheck_pixel_size_loss(C):
    gen = _gen(5)
    # Channel values at least 0.05 apart: finite differences never change the argmax.
    base = torch.arange(C, dtype=torch.float64) * 0.1
    perm = torch.stack([torch.randperm(C, generator=gen) for _ in range(2 * 2 * 3 * 3)])
    b = base[perm].reshape(2, 2, 3, 3, C).permute(0, 1, 4, 2, 3)
    b = b + _randn(gen, 2, 1, 1, 3, 3, dtype=torch.float64, scale=2.0)
    b_p, b_n = b[0].contiguous().requires_grad_(), b[1].contiguous().requires_grad_()
    assert torch.autograd.gradcheck(lambda p, n: ops.pixel_size_loss(p, n, 0.7), (b_p, b_n))


# ---------------------------------------------------------------------------
# opcheck
# ---------------------------------------------------------------------------
def _opcheck_samples():
    """(op name, args, differentiable) for every op."""
    gen = _gen(6)
    T, N, C, H, W, k = 2, 2, 3, 3, 4, 3
    x = _rand(gen, N, C, H, W)
    mask1, maskC = _rand(gen, T, 1, H, W), _rand(gen, T, C, H, W)
    pattern = _rand(gen, T, C, H, W)
    grad = _randn(gen, T, N, C, H, W)
    b_p = _rand(gen, T, C, H, W, lo=-0.5, hi=1.5)
    b_n = _rand(gen, T, C, H, W, lo=-0.5, hi=1.5)
    theta_m1, theta_mC = _randn(gen, T, 1, H, W), _randn(gen, T, C, H, W)
    theta_p = _randn(gen, T, C, H, W)
    samples = [
        ("stamp", (x, mask1, pattern), True),
        ("stamp", (x, maskC, pattern), True),
        ("stamp", (x.double(), maskC.double(), pattern.double()), True),
        ("stamp_backward", (grad, x, mask1, pattern), False),
        ("stamp_backward", (grad, x, maskC, pattern), False),
        ("stamp_backward", (grad, x, mask1, pattern, False), False),
        ("pixel_stamp", (x, b_p, b_n, 1.0, False), True),
        ("pixel_stamp", (x, b_p, b_n, 2.0, True), True),
        ("pixel_stamp_backward", (grad, x, b_p, b_n, 1.0, False), False),
        ("pixel_stamp_backward", (grad, x, b_p, b_n, 2.0, True), False),
        ("pixel_stamp_backward", (grad, x, b_p, b_n, 2.0, True, False), False),
        ("pixel_size_loss", (b_p, b_n, 10.0), True),
        ("pixel_size_loss_backward", (_randn(gen, T), b_p, b_n, 10.0), False),
        ("nes_samples", (theta_m1, theta_p, k, 7, 8), False),
        ("nes_samples", (theta_mC, theta_p, k, 7, 8), False),
    ]
    for joint in (False, True):
        S = k if joint else 2 * k
        samples.append(("nes_sample_stamp", (x, theta_m1, theta_p, k, 0.3, 7, 8, joint), False))
        samples.append(("nes_sample_stamp", (x, theta_mC, theta_p, k, 0.3, 7, 8, joint), False))
        out = torch.empty(T, S, N, C, H, W)
        samples.append(("nes_sample_stamp_out", (x, theta_m1, theta_p, k, 0.3, 7, 8, joint, out),
                        False))
        for baseline in (False, True):
            samples.append(("nes_grad", (_randn(gen, T, S), theta_m1, theta_p, k, 0.3, 7, 8,
                                         joint, baseline), False))
    samples.append(("nes_grad", (_randn(gen, T, 2 * k), theta_mC, theta_p, k, 0.3, 7, 8,
                                 False, True), False))
    return samples


def _opcheck_params():
    params = []
    for i, (name, args, differentiable) in enumerate(_opcheck_samples()):
        params.append(pytest.param(name, i, False, id=f"{name}-{i}"))
        if differentiable:
            params.append(pytest.param(name, i, True, id=f"{name}-{i}-requires_grad"))
    return params


def test_opcheck_covers_every_op():
    assert {name for name, _, _ in _opcheck_samples()} == set(trigscan._extension.OP_NAMES)


@pytest.mark.parametrize("name, index, requires_grad", _opcheck_params())
def test_opcheck(name, index, requires_grad):
    _, args, _ = _opcheck_samples()[index]
    if requires_grad:
        args = tuple(a.detach().clone().requires_grad_() if isinstance(a, torch.Tensor) else a
                     for a in args)
    torch.library.opcheck(getattr(OPS, name).default, args)


# ---------------------------------------------------------------------------
# meta tensors and torch.compile
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("Cm", [1, 3])
def test_meta_shapes(Cm):
    T, N, C, H, W, k = 4, 5, 3, 6, 7, 3

    def meta(*shape):
        return torch.empty(*shape, device="meta")

    x, mask, pattern = meta(N, C, H, W), meta(T, Cm, H, W), meta(T, C, H, W)
    grad = meta(T, N, C, H, W)

    def check(t, shape):
        assert t.device.type == "meta" and tuple(t.shape) == shape and t.dtype == torch.float32

    check(ops.stamp(x, mask, pattern), (T, N, C, H, W))
    for got, want in zip(OPS.stamp_backward(grad, x, mask, pattern), (x, mask, pattern)):
        check(got, tuple(want.shape))
    check(ops.nes_sample_stamp(x, mask, pattern, k, 0.1, 1, 2, False), (T, 2 * k, N, C, H, W))
    check(ops.nes_sample_stamp(x, mask, pattern, k, 0.1, 1, 2, True), (T, k, N, C, H, W))
    for S, joint in ((2 * k, False), (k, True)):
        gm, gp = ops.nes_grad(meta(T, S), mask, pattern, k, 0.1, 1, 2, joint, True)
        check(gm, (T, Cm, H, W))
        check(gp, (T, C, H, W))
    masks, eps = ops.nes_samples(mask, pattern, k, 1, 2)
    check(masks, (T, k, Cm, H, W))
    check(eps, (T, k, C, H, W))
    check(ops.pixel_stamp(x, pattern, pattern, 1.0, True), (T, N, C, H, W))
    for got, want in zip(OPS.pixel_stamp_backward(grad, x, pattern, pattern, 1.0, False),
                         (x, pattern, pattern)):
        check(got, tuple(want.shape))
    check(ops.pixel_size_loss(pattern, pattern, 10.0), (T,))
    gp, gn = OPS.pixel_size_loss_backward(meta(T), pattern, pattern, 10.0)
    check(gp, (T, C, H, W))
    check(gn, (T, C, H, W))


def test_torch_compile_fullgraph_stamp():
    """Forward and backward through a compiled function using stamp (inductor,
    no graph breaks). Takes ~15 s here, mostly inductor's own start-up."""
    torch._dynamo.reset()

    def fn(x, theta, pattern):
        return (ops.stamp(x, torch.sigmoid(theta), pattern) ** 2).sum()

    compiled = torch.compile(fn, fullgraph=True)
    gen = _gen(7)
    x = _rand(gen, 2, 3, 4, 4)
    theta = _randn(gen, 2, 1, 4, 4).requires_grad_()
    pattern = _rand(gen, 2, 3, 4, 4).requires_grad_()
    got = compiled(x, theta, pattern)
    got_grads = torch.autograd.grad(got, (theta, pattern))
    want = fn(x, theta, pattern)
    want_grads = torch.autograd.grad(want, (theta, pattern))
    torch.testing.assert_close(got, want)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------
# non-contiguous inputs
# ---------------------------------------------------------------------------
def _noncontig(t: torch.Tensor) -> torch.Tensor:
    """The same values in a non-contiguous layout: column-major storage, and
    every other element of the last dimension."""
    shape = list(t.shape)
    shape[-1] *= 2
    perm = list(range(len(shape)))[::-1]
    big = torch.zeros([shape[i] for i in perm], dtype=t.dtype).permute(perm)
    view = big[..., ::2]
    view.copy_(t)
    assert not view.is_contiguous() and torch.equal(view, t)
    return view


def test_non_contiguous_inputs_give_same_results():
    gen = _gen(8)
    T, N, C, H, W, k = 2, 3, 3, 4, 5, 3
    x = _rand(gen, N, C, H, W)
    mask1, maskC = _rand(gen, T, 1, H, W), _rand(gen, T, C, H, W)
    pattern = _rand(gen, T, C, H, W)
    grad = _randn(gen, T, N, C, H, W)
    b_p = _rand(gen, T, C, H, W, lo=-0.5, hi=1.5)
    b_n = _rand(gen, T, C, H, W, lo=-0.5, hi=1.5)
    theta_m, theta_p = _randn(gen, T, 1, H, W), _randn(gen, T, C, H, W)
    losses = _randn(gen, T, 2 * k)
    calls = [
        (OPS.stamp, (x, mask1, pattern)),
        (OPS.stamp, (x, maskC, pattern)),
        (OPS.stamp_backward, (grad, x, maskC, pattern)),
        (OPS.stamp_backward, (grad, x, mask1, pattern)),
        (OPS.pixel_stamp, (x, b_p, b_n, 1.0, False)),
        (OPS.pixel_stamp_backward, (grad, x, b_p, b_n, 1.0, True)),
        (OPS.pixel_size_loss, (b_p, b_n, 2.0)),
        (OPS.pixel_size_loss_backward, (_randn(gen, T), b_p, b_n, 2.0)),
        (OPS.nes_sample_stamp, (x, theta_m, theta_p, k, 0.2, 3, 4, False)),
        (OPS.nes_grad, (losses, theta_m, theta_p, k, 0.2, 3, 4, False, True)),
        (OPS.nes_samples, (theta_m, theta_p, k, 3, 4)),
    ]
    for op, args in calls:
        want = op(*args)
        got = op(*(_noncontig(a) if isinstance(a, torch.Tensor) else a for a in args))
        want = want if isinstance(want, tuple) else (want,)
        got = got if isinstance(got, tuple) else (got,)
        for a, b in zip(got, want):
            assert torch.equal(a, b), op
    # Broadcast views (stride 0): one mask / pattern expanded over triggers.
    got = ops.stamp(x, mask1[:1].expand(T, -1, -1, -1), pattern[:1].expand(T, -1, -1, -1))
    want = ops.stamp(x, mask1[:1].repeat(T, 1, 1, 1), pattern[:1].repeat(T, 1, 1, 1))
    assert torch.equal(got, want)
    # Autograd hands stamp_backward an expanded (stride-0) gradient for .sum().
    leaves = [t.clone().requires_grad_() for t in (x, mask1, pattern)]
    ops.stamp(*leaves).sum().backward()
    want = OPS.stamp_backward(torch.ones(T, N, C, H, W), x, mask1, pattern)
    for leaf, w in zip(leaves, want):
        assert torch.equal(leaf.grad, w)


# ---------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------
def _bad_input_cases():
    T, N, C, H, W, k = 2, 2, 3, 4, 4, 2
    x = torch.rand(N, C, H, W)
    mask, pattern = torch.rand(T, 1, H, W), torch.rand(T, C, H, W)
    theta_m, theta_p = torch.randn(T, 1, H, W), torch.randn(T, C, H, W)
    grad = torch.randn(T, N, C, H, W)
    losses = torch.randn(T, 2 * k)
    meta = lambda t: t.to("meta")  # noqa: E731
    V, Ty = ValueError, TypeError

    def nes_ss(**kw):
        a = dict(x=x, theta_m=theta_m, theta_p=theta_p, k=k, sigma=0.1, seed=1, offset=2,
                 joint=False)
        a.update(kw)
        return lambda: OPS.nes_sample_stamp(*a.values())

    out = torch.empty(T, 2 * k, N, C, H, W)
    # an out buffer whose storage also holds x (the kernel reads x while writing)
    x_alias = torch.empty(out.numel())
    x_alias[:x.numel()].copy_(x.flatten())
    x_alias = x_alias.view(out.shape)

    def nes_out(**kw):
        a = dict(x=x_alias.view(-1)[:x.numel()].view(x.shape), theta_m=theta_m,
                 theta_p=theta_p, k=k, sigma=0.1, seed=1, offset=2, joint=False, out=out)
        a.update(kw)
        return lambda: OPS.nes_sample_stamp_out(*a.values())

    def nes_g(**kw):
        a = dict(losses=losses, theta_m=theta_m, theta_p=theta_p, k=k, sigma=0.1, seed=1,
                 offset=2, joint=False, baseline=False)
        a.update(kw)
        return lambda: OPS.nes_grad(*a.values())

    def nes_s(**kw):
        a = dict(theta_m=theta_m, theta_p=theta_p, k=k, seed=1, offset=2)
        a.update(kw)
        return lambda: OPS.nes_samples(*a.values())

    def pix(**kw):
        a = dict(x=x, b_p=pattern, b_n=pattern, maxp=1.0, use_tanh=False)
        a.update(kw)
        return lambda: OPS.pixel_stamp(*a.values())

    def size(**kw):
        a = dict(b_p=pattern, b_n=pattern, gamma=10.0)
        a.update(kw)
        return lambda: OPS.pixel_size_loss(*a.values())

    cases = [
        # --- stamp: rank, shapes, dtypes, devices
        ("stamp x rank 3", lambda: OPS.stamp(x[0], mask, pattern), V, "x"),
        ("stamp mask rank 5", lambda: OPS.stamp(x, mask[None], pattern), V, "mask"),
        ("stamp pattern rank 3", lambda: OPS.stamp(x, mask, pattern[0]), V, "pattern"),
        ("stamp mask T", lambda: OPS.stamp(x, mask[:1], pattern), V, "mask"),
        ("stamp mask 2 channels", lambda: OPS.stamp(x, torch.rand(T, 2, H, W), pattern), V,
         "mask"),
        ("stamp mask H", lambda: OPS.stamp(x, torch.rand(T, 1, H + 1, W), pattern), V, "mask"),
        ("stamp x channels", lambda: OPS.stamp(torch.rand(N, 1, H, W), mask, pattern), V, "x"),
        ("stamp x W", lambda: OPS.stamp(torch.rand(N, C, H, W + 1), mask, pattern), V, "x"),
        ("stamp x int", lambda: OPS.stamp(x.int(), mask, pattern), Ty, "x"),
        ("stamp x float16", lambda: OPS.stamp(x.half(), mask.half(), pattern.half()), Ty, "x"),
        ("stamp mask float64", lambda: OPS.stamp(x, mask.double(), pattern), Ty, "mask"),
        ("stamp pattern int64", lambda: OPS.stamp(x, mask, pattern.long()), Ty, "pattern"),
        ("stamp mask on meta", lambda: OPS.stamp(x, meta(mask), pattern), V, "mask"),
        ("stamp pattern on meta", lambda: OPS.stamp(x, mask, meta(pattern)), V, "pattern"),
        ("stamp_backward grad shape", lambda: OPS.stamp_backward(grad[:1], x, mask, pattern), V,
         "grad"),
        ("stamp_backward grad int", lambda: OPS.stamp_backward(grad.int(), x, mask, pattern),
         Ty, "grad"),
        ("stamp_backward grad on meta",
         lambda: OPS.stamp_backward(meta(grad), x, mask, pattern), V, "grad"),
        # --- nes_sample_stamp
        ("nes_sample_stamp k 0", nes_ss(k=0), V, "k"),
        ("nes_sample_stamp k -3", nes_ss(k=-3), V, "k"),
        ("nes_sample_stamp k 2^28", nes_ss(k=2**28), V, "k"),
        ("nes_sample_stamp sigma 0", nes_ss(sigma=0.0), V, "sigma"),
        ("nes_sample_stamp sigma -1", nes_ss(sigma=-1.0), V, "sigma"),
        ("nes_sample_stamp sigma nan", nes_ss(sigma=math.nan), V, "sigma"),
        ("nes_sample_stamp sigma inf", nes_ss(sigma=math.inf), V, "sigma"),
        ("nes_sample_stamp seed -1", nes_ss(seed=-1), V, "seed"),
        ("nes_sample_stamp offset 2^32", nes_ss(offset=2**32), V, "offset"),
        ("nes_sample_stamp offset -1", nes_ss(offset=-1), V, "offset"),
        ("nes_sample_stamp x rank", nes_ss(x=x[0]), V, "x"),
        ("nes_sample_stamp theta_m rank", nes_ss(theta_m=theta_m[0]), V, "theta_m"),
        ("nes_sample_stamp theta_p rank", nes_ss(theta_p=theta_p[None]), V, "theta_p"),
        ("nes_sample_stamp theta_m shape", nes_ss(theta_m=torch.randn(T, 2, H, W)), V,
         "theta_m"),
        ("nes_sample_stamp x shape", nes_ss(x=torch.rand(N, C, H + 1, W)), V, "x"),
        ("nes_sample_stamp theta_m float64", nes_ss(theta_m=theta_m.double()), Ty, "theta_m"),
        ("nes_sample_stamp theta_m float16", nes_ss(theta_m=theta_m.half()), Ty, "theta_m"),
        ("nes_sample_stamp theta_p int", nes_ss(theta_p=theta_p.int()), Ty, "theta_p"),
        ("nes_sample_stamp x float64", nes_ss(x=x.double()), Ty, "x"),
        ("nes_sample_stamp x int", nes_ss(x=x.int()), Ty, "x"),
        ("nes_sample_stamp theta_p on meta", nes_ss(theta_p=meta(theta_p)), V, "theta_p"),
        ("nes_sample_stamp x on meta", nes_ss(x=meta(x)), V, "x"),
        # --- nes_sample_stamp_out
        ("nes_sample_stamp_out out shape", nes_out(out=out[:, :1]), V, "out"),
        ("nes_sample_stamp_out out float64", nes_out(out=out.double()), Ty, "out"),
        ("nes_sample_stamp_out out non-contiguous",
         nes_out(out=out.transpose(0, 1).contiguous().transpose(0, 1)), V, "out"),
        ("nes_sample_stamp_out out on meta", nes_out(out=meta(out)), V, "out"),
        ("nes_sample_stamp_out out overlaps x", nes_out(out=x_alias), V, "out"),
        ("nes_sample_stamp_out k 0", nes_out(k=0), V, "k"),
        # --- nes_grad
        ("nes_grad losses nan", nes_g(losses=torch.full((T, 2 * k), math.nan)), V, "losses"),
        ("nes_grad losses inf", nes_g(losses=losses.clone().index_fill_(1, torch.tensor([1]),
                                                                         math.inf)), V, "losses"),
        ("nes_grad losses [T, k] in separate mode", nes_g(losses=losses[:, :k]), V, "losses"),
        ("nes_grad losses [T, 2k] in joint mode", nes_g(joint=True), V, "losses"),
        ("nes_grad losses T", nes_g(losses=losses[:1]), V, "losses"),
        ("nes_grad losses rank 1", nes_g(losses=losses[0]), V, "losses"),
        ("nes_grad losses rank 3", nes_g(losses=losses[None]), V, "losses"),
        ("nes_grad losses int", nes_g(losses=losses.int()), Ty, "losses"),
        ("nes_grad losses float64", nes_g(losses=losses.double()), Ty, "losses"),
        ("nes_grad k 0", nes_g(k=0), V, "k"),
        ("nes_grad sigma 0", nes_g(sigma=0.0), V, "sigma"),
        ("nes_grad sigma nan", nes_g(sigma=math.nan), V, "sigma"),
        ("nes_grad seed -5", nes_g(seed=-5), V, "seed"),
        ("nes_grad offset 2^32", nes_g(offset=2**32), V, "offset"),
        ("nes_grad theta_m int", nes_g(theta_m=theta_m.int()), Ty, "theta_m"),
        ("nes_grad theta_p float64", nes_g(theta_p=theta_p.double()), Ty, "theta_p"),
        ("nes_grad theta_m rank", nes_g(theta_m=theta_m[0]), V, "theta_m"),
        ("nes_grad losses on meta", nes_g(losses=meta(losses)), V, "losses"),
        ("nes_grad theta_p on meta", nes_g(theta_p=meta(theta_p)), V, "theta_p"),
        # --- nes_samples
        ("nes_samples k 0", nes_s(k=0), V, "k"),
        ("nes_samples seed -1", nes_s(seed=-1), V, "seed"),
        ("nes_samples offset 2^32", nes_s(offset=2**32), V, "offset"),
        ("nes_samples theta_m float16", nes_s(theta_m=theta_m.half()), Ty, "theta_m"),
        ("nes_samples theta_p int", nes_s(theta_p=theta_p.int()), Ty, "theta_p"),
        ("nes_samples theta_p rank", nes_s(theta_p=theta_p[0]), V, "theta_p"),
        ("nes_samples theta_m T", nes_s(theta_m=theta_m[:1]), V, "theta_m"),
        ("nes_samples theta_p on meta", nes_s(theta_p=meta(theta_p)), V, "theta_p"),
        # --- pixel_stamp
        ("pixel_stamp maxp 0", pix(maxp=0.0), V, "maxp"),
        ("pixel_stamp maxp -1", pix(maxp=-1.0), V, "maxp"),
        ("pixel_stamp maxp nan", pix(maxp=math.nan), V, "maxp"),
        ("pixel_stamp x rank", pix(x=x[0]), V, "x"),
        ("pixel_stamp b_n shape", pix(b_n=pattern[:, :1]), V, "b_n"),
        ("pixel_stamp b_p rank", pix(b_p=pattern[0]), V, "b_p"),
        ("pixel_stamp x shape", pix(x=torch.rand(N, C, H, W + 2)), V, "x"),
        ("pixel_stamp x int", pix(x=x.int()), Ty, "x"),
        ("pixel_stamp b_n float64", pix(b_n=pattern.double()), Ty, "b_n"),
        ("pixel_stamp x float16", pix(x=x.half()), Ty, "x"),
        ("pixel_stamp all float16", pix(x=x.half(), b_p=pattern.half(), b_n=pattern.half()), Ty,
         "b_p"),
        ("pixel_stamp b_n on meta", pix(b_n=meta(pattern)), V, "b_n"),
        ("pixel_stamp_backward grad shape",
         lambda: OPS.pixel_stamp_backward(grad[..., :1], x, pattern, pattern, 1.0, False), V,
         "grad"),
        ("pixel_stamp_backward maxp 0",
         lambda: OPS.pixel_stamp_backward(grad, x, pattern, pattern, 0.0, False), V, "maxp"),
        # --- pixel_size_loss
        ("pixel_size_loss gamma 0", size(gamma=0.0), V, "gamma"),
        ("pixel_size_loss gamma -2", size(gamma=-2.0), V, "gamma"),
        ("pixel_size_loss gamma nan", size(gamma=math.nan), V, "gamma"),
        ("pixel_size_loss b_n shape", size(b_n=pattern[:1]), V, "b_n"),
        ("pixel_size_loss b_p rank", size(b_p=pattern[0]), V, "b_p"),
        ("pixel_size_loss b_p int", size(b_p=pattern.int(), b_n=pattern.int()), Ty, "b_p"),
        ("pixel_size_loss b_n float16", size(b_n=pattern.half()), Ty, "b_n"),
        ("pixel_size_loss b_n on meta", size(b_n=meta(pattern)), V, "b_n"),
        ("pixel_size_loss_backward grad shape",
         lambda: OPS.pixel_size_loss_backward(torch.ones(T + 1), pattern, pattern, 1.0), V,
         "grad"),
        ("pixel_size_loss_backward gamma 0",
         lambda: OPS.pixel_size_loss_backward(torch.ones(T), pattern, pattern, 0.0), V,
         "gamma"),
    ]
    return cases


BAD = _bad_input_cases()


@pytest.mark.parametrize("case", range(len(BAD)), ids=[c[0] for c in BAD])
def test_bad_input_raises_clear_error(case):
    _, call, exc_type, argument = BAD[case]
    with pytest.raises(exc_type) as info:
        call()
    message = str(info.value)
    assert re.search(rf"(?<![\w.]){re.escape(argument)}(?!\w)", message), (
        f"message does not name {argument!r}: {message}")
    assert "trigscan." in message, message


def test_bad_input_through_autograd_and_wrappers():
    """The typed wrappers and the autograd path raise the same errors."""
    x = torch.rand(2, 3, 4, 4, requires_grad=True)
    mask = torch.rand(2, 1, 4, 4, requires_grad=True)
    with pytest.raises(ValueError, match="pattern"):
        ops.stamp(x, mask, torch.rand(2, 3, 4))
    with pytest.raises(TypeError, match="mask"):
        ops.stamp(x, mask.double(), torch.rand(2, 3, 4, 4))
    with pytest.raises(ValueError, match="maxp"):
        ops.pixel_stamp(x, torch.rand(2, 3, 4, 4), torch.rand(2, 3, 4, 4), maxp=0.0)
    with pytest.raises(ValueError, match="gamma"):
        ops.pixel_size_loss(torch.rand(2, 3, 4, 4, requires_grad=True), torch.rand(2, 3, 4, 4),
                            gamma=-1.0)
