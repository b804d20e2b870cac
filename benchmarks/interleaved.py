"""Cross-check of the kernel benchmarks on a machine whose speed drifts.

pytest-benchmark times one variant after the other, so a neighbour on the VM's
host that starts or stops between two variants of a case moves their ratio
(report.py shows the same case moving by up to 2x between runs). Here the
variants of a case run in alternation: blocks of a few calls of each, the
order reversed every block, so whatever slows the machine slows all of them
alike. Per case: the median time of each variant over all its calls, the
speed-up of the fastest kernel variant over the fastest plain-PyTorch one
(the targets of report.py), and the spread of that speed-up over the blocks.

    python benchmarks/interleaved.py [--blocks 20] [--threads 2]

The variants are those of the pytest benchmarks (variants.py); the naive forms
of the NES step (0.3 s a call, never the fastest) are left out. The price of
alternating: a variant that allocates finds the allocator and the caches in
the state the other variants left (`naive`'s three 7.5 MiB temporaries of
the stamp forward cost ~5x what they cost in a loop of their own), so this
is a cross-check of the ratios, not a replacement for the pytest runs.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import variants  # noqa: E402
from report import TARGETS, fastest_pair  # noqa: E402

# case -> (make the case, {variant: callable name}, calls per variant per block)
CASES = {
    "stamp forward": (variants.StampCase, {v: "fwd_" + v for v in
                                           ("fused", "naive", "lerp", "lerp_out")}, 10),
    "stamp forward+backward": (variants.StampCase, {v: "fb_" + v for v in
                                                    ("fused", "fused_ops", "naive",
                                                     "lerp_autograd", "manual")}, 10),
    "nes step 1x24x24": (lambda: variants.NesCase(C=1, H=24, W=24),
                         {v: v for v in ("fused_prealloc", "best_prealloc")}, 3),
    "nes step 3x32x32": (lambda: variants.NesCase(C=3, H=32, W=32),
                         {v: v for v in ("fused_prealloc", "best_prealloc")}, 2),
    "pixel stamp+size forward+backward": (variants.PixelCase, {v: v for v in (
        "fused", "naive", "best_autograd", "best_manual")}, 10),
}


def run_case(make, names, calls, blocks):
    case = make()
    fns = {v: getattr(case, attr) for v, attr in names.items()}
    for fn in fns.values():  # warm-up: first touches, allocator, lazy init
        fn(), fn()
    times = {v: [] for v in fns}
    block_speedups = []
    order = list(fns)
    for b in range(blocks):
        block = {}
        for v in (order if b % 2 == 0 else order[::-1]):
            ts = []
            for _ in range(calls):
                t0 = time.perf_counter()
                fns[v]()
                ts.append(time.perf_counter() - t0)
            times[v] += ts
            block[v] = statistics.median(ts)
        _, kernel_t, _, plain_t = fastest_pair(block)
        block_speedups.append(plain_t / kernel_t)
    return {v: statistics.median(t) for v, t in times.items()}, block_speedups


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--blocks", type=int, default=20)
    ap.add_argument("--threads", type=int, default=variants.THREADS)
    args = ap.parse_args(argv)
    if args.blocks < 4:
        ap.error("--blocks: at least 4 (the speed-up's quartiles over the blocks)")
    torch.set_num_threads(args.threads)
    print(f"torch.get_num_threads() = {torch.get_num_threads()}, {args.blocks} blocks, "
          f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())} UTC\n")
    print("| case | variant medians (ms) | fastest kernel | fastest plain | speed-up | "
          "speed-up over blocks (min / quartiles / max) | target | met |")
    print("|---|---|---|---|---:|---|---:|:-:|")
    for case, (make, names, calls) in CASES.items():
        medians, speedups = run_case(make, names, calls, args.blocks)
        kv, kt, pv, pt = fastest_pair(medians)
        q = statistics.quantiles(speedups, n=4)
        target = TARGETS[case]
        cells = ", ".join(f"{v} {t * 1e3:.3f}" for v, t in medians.items())
        print(f"| {case} | {cells} | {kv} | {pv} | {pt / kt:.2f}x | {min(speedups):.2f} / "
              f"{q[0]:.2f} {q[1]:.2f} {q[2]:.2f} / {max(speedups):.2f} | {target:g}x | "
              f"{'yes' if pt / kt >= target else 'no'} |", flush=True)


if __name__ == "__main__":
    main()
