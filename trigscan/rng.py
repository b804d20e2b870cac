"""Pure-Python reference of trigscan's random-number contract.

The NES kernels (``torch.ops.trigscan.nes_sample_stamp``, ``nes_grad``,
``nes_samples``) never take random numbers from a ``torch.Generator``: every
sample is a pure function of ``(seed, offset, trigger, sample, element)``
computed with the counter-based generator Philox4x32-10. This module restates
that function in plain Python/numpy so that anyone -- the tests, a scanner that
embeds the kernels, a user who wants to audit a scan -- can regenerate the
exact samples a kernel used without running it. It is the specification; the
C++ side (``csrc/common/philox.h``, ``math.h``, ``nes.h``) implements it.

The contract
------------
**Generator.** Philox4x32-10 (Salmon, Moraes, Dror, Shaw, SC'11; Random123):
a counter ``(c0, c1, c2, c3)`` and a key ``(k0, k1)`` of 32-bit words are mapped
to four 32-bit output words by ten rounds of::

    (hi0, lo0) = 0xD2511F53 * c0        (64-bit product split in halves)
    (hi1, lo1) = 0xCD9E8D57 * c2
    c = (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0)

with the key bumped by ``(0x9E3779B9, 0xBB67AE85)`` (mod 2^32) before every
round but the first. :func:`philox4x32_10` reproduces Random123's known-answer
vectors (:data:`RANDOM123_KAT`).

**Key.** ``key = (low32(seed), high32(seed))`` for the scan's ``seed`` in
``[0, 2^63)``.

**Counter.** ``counter = (block, (domain << 28) | sample, trigger, offset)``
(:func:`counter`), where

* ``offset`` in ``[0, 2^32)`` is the caller's stream position: a scanner uses a
  fresh offset per NES step, so no two steps share samples;
* ``trigger`` is the index ``t`` along the T axis of ``theta_m``/``theta_p``;
* ``sample`` is the perturbation index ``j`` in ``[0, k)``, ``k < 2^28``;
* ``domain`` tells the two kinds of draws apart: :data:`DOMAIN_MASK` (0) for
  Bernoulli mask samples, :data:`DOMAIN_PATTERN` (1) for Gaussian pattern noise;
* ``block`` is ``e // 4`` for element ``e``.

**Elements.** For one (trigger, sample), the mask sample ``m_j`` has the
elements of ``theta_m[t]`` (``[Cm, H, W]``, Cm = 1 or C) and the noise sample
``eps_j`` those of ``theta_p[t]`` (``[C, H, W]``), both in C (row-major) order;
element ``e`` uses word ``e % 4`` of block ``e // 4`` of its domain.

**Word -> uniform.** ``u = ((w >> 8) | 1) * 2^-24`` (:func:`uniform`): an odd
multiple of 2^-24, exact in float32, never 0 and never 1.

**Bernoulli.** ``m = 1`` iff ``u < p`` with ``p = g(theta_m[t, e])``,
``g(z) = (tanh z + 1) / 2`` (:func:`bernoulli`). The kernels compute ``p`` in
float32 with their own exp; :func:`squash` here computes it in float64, so the
two can disagree only where ``u`` is within a few float32 ulps of ``p``. For
``theta_m = 0`` the kernels' ``p`` is exactly 0.5 and every decision is exact.

**Normals.** Box-Muller on word pairs (:func:`box_muller`):
words 0 and 1 of block b give elements 4b and 4b+1 as
``(r cos 2 pi u1, r sin 2 pi u1)`` with ``r = sqrt(-2 ln u0)``, words 2 and 3
give elements 4b+2 and 4b+3 the same way. Here the normals are computed in
float64 from the exact uniforms; the kernels compute them in float32 (with
their own log and sin/cos), which agrees to about 1e-6 absolute.

A trailing partial block is drawn whole and its unused words are discarded.

Everything here is vectorised with numpy uint64 arithmetic (the 32 x 32-bit
products fit in 64 bits), so thousands of blocks take milliseconds.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

__all__ = [
    "MUL0", "MUL1", "WEYL0", "WEYL1", "ROUNDS",
    "DOMAIN_MASK", "DOMAIN_PATTERN", "MAX_SAMPLES", "RANDOM123_KAT",
    "philox4x32_10", "philox4x32_10_np", "key", "counter", "draw_block", "draw_blocks",
    "element_words", "uniform", "bernoulli", "box_muller", "normals", "squash",
    "nes_samples",
]

MUL0 = 0xD2511F53
MUL1 = 0xCD9E8D57
WEYL0 = 0x9E3779B9  # golden ratio
WEYL1 = 0xBB67AE85  # sqrt(3) - 1
ROUNDS = 10
_M32 = 0xFFFFFFFF

DOMAIN_MASK = 0
DOMAIN_PATTERN = 1
MAX_SAMPLES = 1 << 28

# Random123 tests/kat_vectors, philox4x32 with 10 rounds: (counter, key, output).
RANDOM123_KAT = (
    ((0x00000000, 0x00000000, 0x00000000, 0x00000000), (0x00000000, 0x00000000),
     (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF),
     (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
)


# ---------------------------------------------------------------------------
# The generator
# ---------------------------------------------------------------------------
def philox4x32_10(ctr: Sequence[int], key_words: Sequence[int],
                  rounds: int = ROUNDS) -> tuple[int, int, int, int]:
    """One Philox4x32 call in plain integer arithmetic: 4 counter words and
    2 key words (each in [0, 2^32)) -> 4 output words."""
    c0, c1, c2, c3 = (int(v) & _M32 for v in ctr)
    k0, k1 = (int(v) & _M32 for v in key_words)
    for r in range(rounds):
        if r > 0:
            k0 = (k0 + WEYL0) & _M32
            k1 = (k1 + WEYL1) & _M32
        p0 = MUL0 * c0
        p1 = MUL1 * c2
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0, p1 & _M32, (p0 >> 32) ^ c3 ^ k1, p0 & _M32)
    return c0, c1, c2, c3


def philox4x32_10_np(c0, c1, c2, c3, k0, k1, rounds: int = ROUNDS) -> np.ndarray:
    """Vectorised Philox4x32: broadcastable integer arrays (values in [0, 2^32))
    -> uint64 array of shape [..., 4] holding the four output words."""
    m32 = np.uint64(_M32)
    sh = np.uint64(32)
    c0, c1, c2, c3, k0, k1 = np.broadcast_arrays(
        *(np.asarray(v, dtype=np.uint64) & m32 for v in (c0, c1, c2, c3, k0, k1)))
    c0, c1, c2, c3, k0, k1 = (v.copy() for v in (c0, c1, c2, c3, k0, k1))
    mul0, mul1 = np.uint64(MUL0), np.uint64(MUL1)
    weyl0, weyl1 = np.uint64(WEYL0), np.uint64(WEYL1)
    for r in range(rounds):
        if r > 0:
            k0 = (k0 + weyl0) & m32
            k1 = (k1 + weyl1) & m32
        p0 = mul0 * c0  # < 2^64: no overflow in uint64
        p1 = mul1 * c2
        c0, c1, c2, c3 = ((p1 >> sh) ^ c1 ^ k0, p1 & m32, (p0 >> sh) ^ c3 ^ k1, p0 & m32)
    return np.stack([c0, c1, c2, c3], axis=-1)


# ---------------------------------------------------------------------------
# trigscan's layout
# ---------------------------------------------------------------------------
def _check_seed_offset(seed: int, offset: int) -> None:
    if not 0 <= int(seed) < (1 << 63):
        raise ValueError(f"seed must be in [0, 2^63), got {seed}")
    if not 0 <= int(offset) < (1 << 32):
        raise ValueError(f"offset must be in [0, 2^32), got {offset}")


def key(seed: int) -> tuple[int, int]:
    """The Philox key of a seed: (low32(seed), high32(seed))."""
    seed = int(seed)
    return seed & _M32, (seed >> 32) & _M32


def counter(offset: int, trigger: int, sample: int, domain: int,
            block: int) -> tuple[int, int, int, int]:
    """The Philox counter of one block: (block, (domain << 28) | sample, trigger, offset)."""
    if not 0 <= sample < MAX_SAMPLES:
        raise ValueError(f"sample must be in [0, 2^28), got {sample}")
    if domain not in (DOMAIN_MASK, DOMAIN_PATTERN):
        raise ValueError(f"domain must be DOMAIN_MASK (0) or DOMAIN_PATTERN (1), got {domain}")
    return (int(block) & _M32, (int(domain) << 28) | int(sample), int(trigger) & _M32,
            int(offset) & _M32)


def draw_block(seed: int, offset: int, trigger: int, sample: int, domain: int,
               block: int) -> tuple[int, int, int, int]:
    """Mirror of the C++ ``draw_block``: the four words of one block."""
    _check_seed_offset(seed, offset)
    return philox4x32_10(counter(offset, trigger, sample, domain, block), key(seed))


def draw_blocks(seed: int, offset: int, trigger, sample, domain: int, block) -> np.ndarray:
    """Vectorised :func:`draw_block`: ``trigger``, ``sample`` and ``block`` are
    broadcastable integer arrays; returns uint64 words of shape [..., 4]."""
    _check_seed_offset(seed, offset)
    if domain not in (DOMAIN_MASK, DOMAIN_PATTERN):
        raise ValueError(f"domain must be DOMAIN_MASK (0) or DOMAIN_PATTERN (1), got {domain}")
    sample = np.asarray(sample, dtype=np.uint64)
    if np.any(sample >= np.uint64(MAX_SAMPLES)):
        raise ValueError("sample must be in [0, 2^28)")
    k0, k1 = key(seed)
    lane1 = (np.uint64(domain) << np.uint64(28)) | sample
    return philox4x32_10_np(block, lane1, trigger, offset, k0, k1)


def element_words(seed: int, offset: int, trigger: int, sample: int, domain: int,
                  n: int) -> np.ndarray:
    """The word of every element 0..n-1 of one (trigger, sample, domain): uint64 [n]."""
    blocks = np.arange((n + 3) // 4, dtype=np.uint64)
    return draw_blocks(seed, offset, trigger, sample, domain, blocks).reshape(-1)[:n]


# ---------------------------------------------------------------------------
# Word -> value conversions
# ---------------------------------------------------------------------------
def uniform(words) -> np.ndarray:
    """u = ((w >> 8) | 1) * 2^-24 in (0, 1), float64 (exact; also exact in float32)."""
    w = np.asarray(words, dtype=np.uint64)
    return ((w >> np.uint64(8)) | np.uint64(1)).astype(np.float64) * 2.0 ** -24


def bernoulli(words, p) -> np.ndarray:
    """1.0 where u(w) < p else 0.0 (p = 0 never fires, p = 1 always does)."""
    return (uniform(words) < np.asarray(p, dtype=np.float64)).astype(np.float64)


def box_muller(w0, w1) -> tuple[np.ndarray, np.ndarray]:
    """(r cos 2 pi u1, r sin 2 pi u1) with r = sqrt(-2 ln u0), in float64."""
    u0, u1 = uniform(w0), uniform(w1)
    r = np.sqrt(-2.0 * np.log(u0))
    angle = 2.0 * math.pi * u1
    return r * np.cos(angle), r * np.sin(angle)


def normals(words) -> np.ndarray:
    """Standard normals of whole blocks: words [..., 4] -> float64 [..., 4] with
    words (0, 1) -> elements (0, 1) and words (2, 3) -> elements (2, 3)."""
    w = np.asarray(words, dtype=np.uint64)
    z0, z1 = box_muller(w[..., 0], w[..., 1])
    z2, z3 = box_muller(w[..., 2], w[..., 3])
    return np.stack([z0, z1, z2, z3], axis=-1)


def squash(z) -> np.ndarray:
    """g(z) = (tanh z + 1) / 2 in float64."""
    return (np.tanh(np.asarray(z, dtype=np.float64)) + 1.0) / 2.0


# ---------------------------------------------------------------------------
# The NES samples of one call
# ---------------------------------------------------------------------------
def _domain_words(seed, offset, T, k, d, domain) -> np.ndarray:
    """uint64 [T, k, d]: the word of every element of every (trigger, sample)."""
    nblocks = (d + 3) // 4
    t = np.arange(T, dtype=np.uint64)[:, None, None]
    j = np.arange(k, dtype=np.uint64)[None, :, None]
    b = np.arange(nblocks, dtype=np.uint64)[None, None, :]
    words = draw_blocks(seed, offset, t, j, domain, b)  # [T, k, nblocks, 4]
    return words.reshape(T, k, nblocks * 4)[:, :, :d]


def nes_samples(theta_m, theta_p, k: int, seed: int, offset: int):
    """Reproduce ``torch.ops.trigscan.nes_samples(theta_m, theta_p, k, seed, offset)``.

    theta_m: array-like [T, Cm, H, W] (Cm = 1 or C); theta_p: [T, C, H, W] (only
    its shape matters; torch tensors are accepted). Returns numpy float64
    ``masks`` [T, k, Cm, H, W] of 0/1 (with p = g(theta_m) computed in float64
    from the float32 value of theta_m) and ``eps`` [T, k, C, H, W].
    """
    tm = np.asarray(_to_numpy(theta_m), dtype=np.float32)
    tp_shape = tuple(_to_numpy(theta_p).shape)
    if tm.ndim != 4 or len(tp_shape) != 4:
        raise ValueError("theta_m and theta_p must be 4-D")
    if not 1 <= k < MAX_SAMPLES:
        raise ValueError(f"k must be in [1, 2^28), got {k}")
    T = tm.shape[0]
    dm = int(np.prod(tm.shape[1:]))
    dp = int(np.prod(tp_shape[1:]))
    p = squash(tm.astype(np.float64)).reshape(T, 1, dm)
    masks = bernoulli(_domain_words(seed, offset, T, k, dm, DOMAIN_MASK), p)
    nblocks = (dp + 3) // 4
    wp = _domain_words(seed, offset, T, k, nblocks * 4, DOMAIN_PATTERN).reshape(T, k, nblocks, 4)
    eps = normals(wp).reshape(T, k, nblocks * 4)[:, :, :dp]
    return (masks.reshape(T, k, *tm.shape[1:]), eps.reshape(T, k, *tp_shape[1:]))


def _to_numpy(a):
    if hasattr(a, "detach"):  # torch tensor
        return a.detach().cpu().numpy()
    return np.asarray(a)
