"""Bit-for-bit regression guard for kernel optimisations.

    python benchmarks/bitexact.py save  /tmp/golden.pt   # with the old kernels
    python benchmarks/bitexact.py check /tmp/golden.pt   # with the new kernels
    python benchmarks/bitexact.py check-all /tmp/golden.pt
        # check under every CPU clone (TRIGSCAN_CPU_ISA=base|avx2|avx512) with
        # non-temporal stores forced on and off (TRIGSCAN_CPU_STREAM=1|0)

Runs every CPU op (forward and backward entry points) on a fixed set of
random inputs -- odd sizes, broadcast and per-channel masks, float32 and
float64, both NES modes, with and without baseline, both pixel
parametrisations -- at 1 and 2 threads, and compares with torch.equal.
Any difference, including between thread counts, is an error.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout
import trigscan.ops  # noqa: F401  (registers the ops)

ops = torch.ops.trigscan

STAMP_SHAPES = [  # (T, N, C, Cm, H, W)
    (1, 1, 1, 1, 1, 1),
    (3, 5, 3, 1, 5, 7),
    (2, 4, 3, 3, 9, 13),
    (10, 64, 3, 1, 32, 32),
    (4, 7, 1, 1, 24, 24),
    (3, 2, 3, 1, 67, 31),
]
NES_SHAPES = [  # (T, N, C, Cm, H, W, k)
    (1, 1, 1, 1, 1, 1, 1),
    (2, 3, 3, 1, 5, 7, 5),
    (3, 2, 3, 3, 9, 13, 4),
    (10, 32, 1, 1, 24, 24, 50),
    (10, 8, 3, 1, 32, 32, 50),
]


def cases():
    gen = torch.Generator().manual_seed(1234)

    def rnd(*shape, dtype=torch.float32, scale=1.0, lo=0.0):
        return (torch.rand(*shape, generator=gen, dtype=torch.float64) * scale + lo).to(dtype)

    def randn(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    for dtype in (torch.float32, torch.float64):
        for T, N, C, Cm, H, W in STAMP_SHAPES:
            x = rnd(N, C, H, W, dtype=dtype)
            m = rnd(T, Cm, H, W, dtype=dtype)
            p = rnd(T, C, H, W, dtype=dtype)
            g = randn(T, N, C, H, W, dtype=dtype)
            tag = f"{dtype}-{T}x{N}x{C}x{Cm}x{H}x{W}"
            yield f"stamp-{tag}", lambda x=x, m=m, p=p: ops.stamp(x, m, p)
            yield f"stamp_backward-{tag}", lambda g=g, x=x, m=m, p=p: ops.stamp_backward(g, x, m, p)
            # pixel ops: b in [-0.5, 1.5] so both clip sides and the inside are hit
            bp = rnd(T, C, H, W, dtype=dtype, scale=2.0, lo=-0.5)
            bn = rnd(T, C, H, W, dtype=dtype, scale=2.0, lo=-0.5)
            # ties in the channel max (first-argmax convention)
            if C > 1:
                bp[:, 1, 0] = bp[:, 0, 0]
            for maxp in (1.0, 0.7):
                for use_tanh in (False, True):
                    a = (x, bp, bn, maxp, use_tanh)
                    yield f"pixel_stamp-{tag}-{maxp}-{use_tanh}", lambda a=a: ops.pixel_stamp(*a)
                    yield (f"pixel_stamp_backward-{tag}-{maxp}-{use_tanh}",
                           lambda g=g, a=a: ops.pixel_stamp_backward(g, *a))
            for gamma in (10.0, 0.3):
                yield f"pixel_size_loss-{tag}-{gamma}", lambda bp=bp, bn=bn, gamma=gamma: ops.pixel_size_loss(bp, bn, gamma)
                gl = randn(T, dtype=dtype)
                yield (f"pixel_size_loss_backward-{tag}-{gamma}",
                       lambda gl=gl, bp=bp, bn=bn, gamma=gamma: ops.pixel_size_loss_backward(gl, bp, bn, gamma))

    for T, N, C, Cm, H, W, k in NES_SHAPES:
        x = rnd(N, C, H, W)
        tm = randn(T, Cm, H, W) * 2
        tp = randn(T, C, H, W) * 2
        tag = f"{T}x{N}x{C}x{Cm}x{H}x{W}-k{k}"
        for joint in (False, True):
            S = k if joint else 2 * k
            losses = randn(T, S)
            for sigma, seed, offset in ((0.1, 7, 0), (1.0, 2**40 + 3, 12345)):
                a = (k, sigma, seed, offset, joint)
                yield f"nes_sample_stamp-{tag}-{a}", lambda x=x, tm=tm, tp=tp, a=a: ops.nes_sample_stamp(x, tm, tp, *a)
                for baseline in (False, True):
                    yield (f"nes_grad-{tag}-{a}-{baseline}",
                           lambda losses=losses, tm=tm, tp=tp, a=a, b=baseline: ops.nes_grad(losses, tm, tp, *a, b))
        yield f"nes_samples-{tag}", lambda tm=tm, tp=tp, k=k: ops.nes_samples(tm, tp, k, 99, 5)


def as_tuple(out):
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def run_all():
    results = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for name, fn in cases():
            out = tuple(t.clone() for t in as_tuple(fn()))
            if name in results:
                if not all(torch.equal(a, b) for a, b in zip(results[name], out)):
                    raise SystemExit(f"{name}: result depends on the thread count")
            else:
                results[name] = out
    return results


def check_all(path):
    import os
    import subprocess

    failed = []
    for isa in ("base", "avx2", "avx512"):
        for stream in ("0", "1"):
            env = dict(os.environ, TRIGSCAN_CPU_ISA=isa, TRIGSCAN_CPU_STREAM=stream)
            print(f"TRIGSCAN_CPU_ISA={isa} TRIGSCAN_CPU_STREAM={stream}: ", end="", flush=True)
            if subprocess.run([sys.executable, __file__, "check", path], env=env).returncode:
                failed.append((isa, stream))
    if failed:
        raise SystemExit(f"differences under {failed}")


def main(argv):
    if len(argv) == 3 and argv[1] == "check-all":
        check_all(argv[2])
        return
    if len(argv) != 3 or argv[1] not in ("save", "check"):
        raise SystemExit(__doc__)
    results = run_all()
    if argv[1] == "save":
        torch.save(results, argv[2])
        print(f"saved {len(results)} cases to {argv[2]}")
        return
    golden = torch.load(argv[2])
    bad = []
    for name, ref in golden.items():
        got = results.get(name)
        if got is None or len(got) != len(ref) or not all(
                a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
                for a, b in zip(ref, got)):
            bad.append(name)
    missing = set(results) - set(golden)
    print(f"checked {len(golden)} cases: {len(bad)} differ" +
          (f", {len(missing)} not in golden" if missing else ""))
    for name in bad[:20]:
        print("  DIFFERS:", name)
    if bad:
        raise SystemExit(1)


if __name__ == "__main__":
    main(sys.argv)
