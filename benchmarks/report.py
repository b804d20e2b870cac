"""Summarise a pytest-benchmark JSON file as Markdown.

    python -m pytest benchmarks -q --benchmark-json=/tmp/bench.json
    python benchmarks/report.py /tmp/bench.json

Prints the machine/threads line, one table of all cases (median ms and the
ratio variant / fused, so 2.0 means the fused kernel is twice as fast), the
stamp-forward throughput as a fraction of the measured copy bandwidth, the
peak memory of each NES-step variant, and the issue's targets met or missed.
"""
from __future__ import annotations

import json
import sys
from collections import OrderedDict

MiB = 1 << 20

# group -> (target speed-up of fused over the best plain-PyTorch variant)
TARGETS = OrderedDict([
    ("stamp forward", 1.0),
    ("stamp forward+backward", 2.0),
    ("nes step 1x24x24", 2.0),
    ("nes step 3x32x32", 2.0),
    ("pixel stamp+size forward+backward", 2.0),
])


def variant_of(bench):
    params = bench.get("params") or {}
    return str(params.get("variant", params.get("size", bench["name"])))


def load(path):
    with open(path) as f:
        data = json.load(f)
    groups = OrderedDict()
    for b in data["benchmarks"]:
        groups.setdefault(b["group"], OrderedDict())[variant_of(b)] = b
    return data, groups


def ms(b):
    return b["stats"]["median"] * 1e3


def render(data, groups):
    out = []
    info = data.get("machine_info", {}).get("trigscan", {})
    out.append(f"Machine: {info.get('cpu_model', '?')}, {info.get('logical_cpus', '?')} logical "
               f"CPUs, torch.get_num_threads() = {info.get('torch_threads', '?')}, "
               f"torch {info.get('torch', '?')} (CPU capability "
               f"{info.get('torch_cpu_capability', '?')}); timer {info.get('timer', '?')}; "
               f"run {data.get('datetime', '?')[:19]}.")
    busy = [b["extra_info"].get("busy_before") for g in groups.values() for b in g.values()]
    busy = [x for x in busy if x is not None]
    if busy:
        out.append(f"CPU busy (other processes) just before each benchmark: max "
                   f"{100 * max(busy):.0f}%, median {100 * sorted(busy)[len(busy) // 2]:.0f}%.")
    out.append("")
    out.append("| case | variant | median ms | min ms | IQR ms | rounds | variant / fused "
               "(medians) |")
    out.append("|---|---|---:|---:|---:|---:|---:|")
    for group, benches in groups.items():
        fused = benches.get("fused")
        for variant, b in benches.items():
            ratio = f"{ms(b) / ms(fused):.2f}" if fused else ""
            out.append(f"| {group} | {variant} | {ms(b):.3f} | {b['stats']['min'] * 1e3:.3f} | "
                       f"{b['stats']['iqr'] * 1e3:.3f} | {b['stats']['rounds']} | {ratio} |")
    out.append("")

    # bandwidth
    copy = groups.get("memory copy", {})
    fwd = groups.get("stamp forward", {})
    if copy and fwd:
        out.append("Stamp forward throughput (bytes: read x, mask, pattern once + write the "
                   "output) against the measured copy bandwidth (bytes read + written by "
                   "`dst.copy_(src)`):")
        out.append("")
        bw = {k: v["extra_info"]["bytes_moved"] / v["stats"]["median"] / 1e9
              for k, v in copy.items()}
        header = "| variant | GB/s |" + "".join(f" fraction of copy {k} ({bw[k]:.1f} GB/s) |"
                                                for k in bw)
        out.append(header)
        out.append("|---|---:|" + "---:|" * len(bw))
        for variant, b in fwd.items():
            gbs = b["extra_info"]["bytes_moved"] / b["stats"]["median"] / 1e9
            out.append(f"| {variant} | {gbs:.1f} |" + "".join(f" {gbs / v:.2f} |"
                                                             for v in bw.values()))
        out.append("")

    # memory
    nes = [(g, b) for g, bs in groups.items() if g.startswith("nes step") for b in bs.values()]
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

    # targets
    out.append("| target | fused ms | best plain PyTorch | speed-up | met |")
    out.append("|---|---:|---|---:|:-:|")
    for group, want in TARGETS.items():
        benches = groups.get(group)
        if not benches or "fused" not in benches:
            continue
        others = {v: b for v, b in benches.items() if v != "fused"}
        best_v = min(others, key=lambda v: ms(others[v]))
        speedup = ms(others[best_v]) / ms(benches["fused"])
        what = "not slower than" if want == 1.0 else f">= {want:g}x"
        out.append(f"| {group}: {what} best | {ms(benches['fused']):.3f} | {best_v} "
                   f"{ms(others[best_v]):.3f} ms | {speedup:.2f}x | "
                   f"{'yes' if speedup >= want else 'no'} |")
    return "\n".join(out)


def main(argv):
    if len(argv) != 2:
        raise SystemExit(__doc__)
    print(render(*load(argv[1])))


if __name__ == "__main__":
    main(sys.argv)
