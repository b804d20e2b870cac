"""Peak memory of one call, measured in a fresh process.

    python benchmarks/memory.py nes 3x32x32 fused        # JSON on stdout
    python benchmarks/memory.py calibrate                # check both methods

Two independent measurements, each in its own fresh interpreter (so nothing
allocated by an earlier variant is still cached or counted):

* ``rss``: the kernel's peak resident set size. After the inputs exist and a
  tiny warm-up call of the same variant has initialised thread pools and
  lazily loaded code, ``5`` is written to /proc/self/clear_refs, which resets
  VmHWM to the current VmRSS; the call runs; the peak is VmHWM minus the VmRSS
  before it. Sees every touched page (torch tensors, kernel scratch, library
  buffers), at page granularity.
* ``profiler``: torch.profiler(profile_memory=True); the allocation events of
  the call are summed in time order and the running maximum taken. Sees only
  allocations made through the c10 CPU allocator (tensors), counts them whether
  touched or not, and misses std::vector scratch inside kernels.

``calibrate`` allocates and fills known tensors (64 MiB, then 64 + 128 MiB with
the first freed in between) and reports what both methods see, to show they
are trustworthy for buffers that are written (all our outputs are).
"""
from __future__ import annotations

import gc
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
MiB = 1 << 20


def _status(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # kB -> bytes
    raise KeyError(field)


def peak_rss(fn):
    """Peak RSS above the current RSS while fn() runs (bytes), and fn's result."""
    gc.collect()
    before = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    if _status("VmHWM") > before + 2 * MiB:
        raise RuntimeError("could not reset VmHWM through /proc/self/clear_refs")
    result = fn()
    return _status("VmHWM") - before, result


def peak_profiler(fn):
    """Peak of (bytes allocated - bytes freed) through the c10 allocator during fn()."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    deltas = []

    def walk(node):
        if node.tag == torch._C._profiler._EventType.Allocation:
            deltas.append((node.start_time_ns, node.extra_fields.alloc_size))
        for child in node.children:
            walk(child)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    current = peak = 0
    for _, size in sorted(deltas, key=lambda d: d[0]):
        current += size
        peak = max(peak, current)
    return peak, result


def _make(kind, shape, small=False):
    import variants

    if kind == "nes":
        C, H, W = variants.NES_SHAPES[shape]
        if small:
            return variants.NesCase(C=C, H=H, W=W, T=1, k=1, N=1)
        return variants.NesCase(C=C, H=H, W=W)
    raise ValueError(kind)


def measure_here(kind, shape, variant, method):
    import torch

    sys.path.insert(0, str(HERE))
    import variants

    torch.set_num_threads(variants.THREADS)
    getattr(_make(kind, shape, small=True), variant)()  # warm-up: pools, lazy init
    case = _make(kind, shape)
    fn = getattr(case, variant)
    peak, result = (peak_rss if method == "rss" else peak_profiler)(fn)
    del result
    return {"peak_bytes": peak, "out_bytes": case.out_bytes(),
            "samples_bytes": case.samples_bytes(), "method": method}


def calibrate_here(method):
    import torch

    def one():
        return torch.empty(64 * MiB // 4).fill_(1.0)

    def two():
        a = torch.empty(64 * MiB // 4).fill_(1.0)
        a.add_(1.0)
        del a
        return torch.empty(128 * MiB // 4).fill_(2.0)

    def both():
        a = torch.empty(64 * MiB // 4).fill_(1.0)
        b = torch.empty(128 * MiB // 4).fill_(2.0)
        return a, b

    torch.empty(1).fill_(0)
    measure = peak_rss if method == "rss" else peak_profiler
    return {name: measure(fn)[0] / MiB for name, fn in
            (("64 MiB", one), ("64 MiB freed, then 128 MiB", two), ("64 + 128 MiB live", both))}


def measure(kind, shape, variant, method="rss", timeout=600):
    """Run measure_here in a fresh interpreter; returns its dict."""
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), kind, shape, variant,
                           method], capture_output=True, text=True, timeout=timeout,
                          check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def calibrate(method="rss"):
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "calibrate", method],
                          capture_output=True, text=True, timeout=300, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv):
    if len(argv) >= 2 and argv[1] == "calibrate":
        method = argv[2] if len(argv) > 2 else "rss"
        print(json.dumps(calibrate_here(method)))
        return
    if len(argv) not in (4, 5):
        raise SystemExit(__doc__)
    method = argv[4] if len(argv) == 5 else "rss"
    print(json.dumps(measure_here(argv[1], argv[2], argv[3], method)))


if __name__ == "__main__":
    main(sys.argv)
