"""Summarise pytest-benchmark JSON files as Markdown.

    python -m pytest benchmarks -q --benchmark-json=/tmp/bench.json
    python benchmarks/report.py /tmp/bench.json [/tmp/bench2.json ...]

Prints the machine/threads line, one table of all cases (median ms and the
ratio variant / fused, so 2.0 means the fused kernel is twice as fast), the
stamp-forward throughput as a fraction of the measured copy bandwidth, the
peak memory of each NES-step variant, and the issue's targets met or missed
(the fastest kernel variant -- `fused` or e.g. `fused_prealloc`, which reuses
its output buffer -- against the fastest plain-PyTorch variant).

The machine may be shared: every benchmark records `others_busy`, the share of
all CPU time other processes used while it ran. Given several runs, each case
(group of variants) is taken whole from the run in which its worst row was the
least disturbed, and the run it came from is shown. A VM's neighbours on the
same host (memory bandwidth, last-level cache) are not seen in `others_busy`,
so with several runs the targets are also given run by run, with the median of
the runs' speed-ups.
"""
from __future__ import annotations

import json
import statistics
import sys
from collections import OrderedDict

MiB = 1 << 20

# group -> target speed-up of fused over the best plain-PyTorch variant
TARGETS = OrderedDict([
    ("stamp forward", 1.0),
    ("stamp forward+backward", 2.0),
    ("nes step 1x24x24", 2.0),
    ("nes step 3x32x32", 2.0),
    ("pixel stamp+size forward+backward", 2.0),
])


def is_kernel(variant):
    """fused, fused_prealloc, ...: the trigscan kernels; everything else is plain PyTorch."""
    return variant.startswith("fused")


def variant_of(bench):
    params = bench.get("params") or {}
    return str(params.get("variant", params.get("size", bench["name"])))


def disturbance(bench):
    e = bench.get("extra_info", {})
    value = e.get("others_busy")
    return value if value is not None else e.get("busy_before", 1.0)


def load(paths):
    runs = []
    for i, path in enumerate(paths):
        with open(path) as f:
            data = json.load(f)
        groups = OrderedDict()
        for b in data["benchmarks"]:
            groups.setdefault(b["group"], OrderedDict())[variant_of(b)] = b
        runs.append((i + 1, data, groups))
    merged = OrderedDict()  # group -> (run id, benches)
    for run_id, _, groups in runs:
        for group, benches in groups.items():
            worst = max(disturbance(b) for b in benches.values())
            if group not in merged or worst < merged[group][2]:
                merged[group] = (run_id, benches, worst)
    return runs, merged


def ms(b):
    return b["stats"]["median"] * 1e3


def pct(x):
    return "" if x is None else f"{100 * x:.0f}"


def render(runs, merged):
    out = []
    _, data, _ = runs[0]
    info = data.get("machine_info", {}).get("trigscan", {})
    out.append(f"Machine: {info.get('cpu_model', '?')}, {info.get('logical_cpus', '?')} logical "
               f"CPUs, torch.get_num_threads() = {info.get('torch_threads', '?')}, "
               f"torch {info.get('torch', '?')} (CPU capability "
               f"{info.get('torch_cpu_capability', '?')}); timer {info.get('timer', '?')}.")
    for run_id, d, _ in runs:
        out.append(f"Run {run_id}: {d.get('datetime', '?')[:19]} (commit "
                   f"{d.get('commit_info', {}).get('id', '?')[:10]}"
                   f"{', dirty' if d.get('commit_info', {}).get('dirty') else ''}).")
    out.append("")
    multi = len(runs) > 1
    out.append("| case | variant | median ms | min ms | IQR ms | rounds | variant / fused "
               "(medians) | others busy % |" + (" run |" if multi else ""))
    out.append("|---|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if multi else ""))
    for group, (run_id, benches, _) in merged.items():
        fused = benches.get("fused")
        for variant, b in benches.items():
            ratio = f"{ms(b) / ms(fused):.2f}" if fused else ""
            s = b["stats"]
            out.append(f"| {group} | {variant} | {ms(b):.3f} | {s['min'] * 1e3:.3f} | "
                       f"{s['iqr'] * 1e3:.3f} | {s['rounds']} | {ratio} | "
                       f"{pct(b['extra_info'].get('others_busy'))} |"
                       + (f" {run_id} |" if multi else ""))
    out.append("")

    copy = merged.get("memory copy", (None, {}))[1]
    fwd = merged.get("stamp forward", (None, {}))[1]
    if copy and fwd:
        out.append("Stamp forward throughput (bytes: read x, mask, pattern once + write the "
                   "output) against the measured copy bandwidth (bytes read + written by "
                   "`dst.copy_(src)`):")
        out.append("")
        bw = {k: v["extra_info"]["bytes_moved"] / v["stats"]["median"] / 1e9
              for k, v in copy.items()}
        out.append("| variant | GB/s |" + "".join(f" fraction of copy {k} ({bw[k]:.1f} GB/s) |"
                                                  for k in bw))
        out.append("|---|---:|" + "---:|" * len(bw))
        for variant, b in fwd.items():
            gbs = b["extra_info"]["bytes_moved"] / b["stats"]["median"] / 1e9
            out.append(f"| {variant} | {gbs:.1f} |" + "".join(f" {gbs / v:.2f} |"
                                                             for v in bw.values()))
        out.append("")

    nes = [(g, b) for g, (_, bs, _) in merged.items() if g.startswith("nes step")
           for b in bs.values()]
    if nes:
        out.append("Peak memory of one NES step above the process's resident set before it "
                   "(fresh process per variant; `rss` = VmHWM after resetting it via "
                   "/proc/self/clear_refs, `profiler` = torch.profiler allocation events):")
        out.append("")
        out.append("| case | variant | output MiB | peak rss MiB | peak profiler MiB | "
                   "rss above output MiB |")
        out.append("|---|---|---:|---:|---:|---:|")
        for group, b in nes:
            e = b["extra_info"]
            out.append(f"| {group} | {variant_of(b)} | {e['out_bytes'] / MiB:.1f} | "
                       f"{e['peak_rss_bytes'] / MiB:.1f} | {e['peak_profiler_bytes'] / MiB:.1f} | "
                       f"{(e['peak_rss_bytes'] - e['out_bytes']) / MiB:.2f} |")
        out.append("")

    out.append("| target | fused (fastest kernel variant) | best plain PyTorch | speed-up | met |")
    out.append("|---|---|---|---:|:-:|")
    for group, want in TARGETS.items():
        if group not in merged or "fused" not in merged[group][1]:
            continue
        fused_v, fused_ms, best_v, best_ms = contenders(merged[group][1])
        speedup = best_ms / fused_ms
        out.append(f"| {group}: {target_text(want)} | {fused_v} {fused_ms:.3f} ms | {best_v} "
                   f"{best_ms:.3f} ms | {speedup:.2f}x | {'yes' if speedup >= want else 'no'} |")

    if len(runs) > 1:
        out.append("")
        out.append("Speed-up (fastest plain PyTorch / fastest kernel variant) in each run:")
        out.append("")
        out.append("| target | " + " | ".join(f"run {r}" for r, _, _ in runs) + " | median | met |")
        out.append("|---|" + "---:|" * len(runs) + "---:|:-:|")
        for group, want in TARGETS.items():
            ups = [contenders(g[group]) for _, _, g in runs if group in g and "fused" in g[group]]
            if len(ups) != len(runs):
                continue
            ratios = [best_ms / fused_ms for _, fused_ms, _, best_ms in ups]
            middle = statistics.median(ratios)
            out.append(f"| {group}: {target_text(want)} | "
                       + " | ".join(f"{r:.2f}x" for r in ratios)
                       + f" | {middle:.2f}x | {'yes' if middle >= want else 'no'} |")
    return "\n".join(out)


def contenders(benches):
    """(fastest kernel variant, its median ms, fastest plain variant, its median ms)."""
    return fastest_pair({v: ms(b) for v, b in benches.items()})


def fastest_pair(times):
    """{variant: time} -> (fastest kernel variant, its time, fastest plain variant, its time)."""
    kernels = {v: t for v, t in times.items() if is_kernel(v)}
    others = {v: t for v, t in times.items() if not is_kernel(v)}
    fused_v = min(kernels, key=kernels.get)
    best_v = min(others, key=others.get)
    return fused_v, kernels[fused_v], best_v, others[best_v]


def target_text(want):
    return ("not slower than" if want == 1.0 else f">= {want:g}x") + " best"


def main(argv):
    if len(argv) < 2:
        raise SystemExit(__doc__)
    print(render(*load(argv[1:])))


if __name__ == "__main__":
    main(sys.argv)
