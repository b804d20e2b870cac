"""Per-model table of one variant folder: python summary_hex.py models/rgb32-hex [nc tabor]

Columns: clean accuracy; ASR of the model's own trigger (BadNets) or of Patch(3,(-4,-4))->0 (clean: control);
per method: verdict and flagged classes, the anomaly index of the "target" (the rule's target; class 0 on clean
models), the largest low-side index among the other classes, the ceiling (index the target would get with
statistic 0, others unchanged; only meaningful for NC's mask L1), scan wall time.
Then per method: detection (BadNets models flagged with their target among the flags) and false positives.
"""
import json
import statistics
import sys
from pathlib import Path

from trigscan.detect import mad_anomaly_index, true_median


def low_side_max(vals, idx, skip):
    med = true_median(vals)
    c = [idx[i] for i in range(len(vals)) if i != skip and vals[i] < med]
    return max(c) if c else 0.0


def signed(vals, idx, i):
    """The anomaly index with a sign: + below the median (the suspicious side), - above it."""
    return idx[i] if vals[i] < true_median(vals) else -idx[i]


def ceiling(vals, t):
    v = list(vals)
    v[t] = 0.0
    return float(mad_anomaly_index(v)[t])


def main(root, methods):
    rows, tally = [], {m: {"bad": 0, "det": 0, "clean": 0, "fp": 0, "t": []} for m in methods}
    for f in sorted(Path(root).iterdir()):
        if not (f / "truth.json").is_file():
            continue
        t = json.loads((f / "truth.json").read_text())
        bad = t["backdoored"]
        target = t["rule"]["target"] if bad else 0
        asr = t["asr"] if bad else t["patch_asr"]
        line = [f"{f.name:<13}", f"{t['clean_accuracy']:6.1%}", f"{asr:6.1%}{'' if bad else '*'}", (f"{t['train_cpu_s']:5.0f}s" if "train_cpu_s" in t else f"{t['train_s']:5.0f}w")]
        for m in methods:
            p = f / f"{m}.json"
            if not p.is_file():
                line.append(f"{'(not run)':<40}")
                continue
            r = json.loads(p.read_text())
            vals, idx = r["statistic"] if "statistic" in r else r["mask_l1"], r["anomaly"]
            flagged = r["targets"]
            verdict = ("BD->" + ",".join(map(str, flagged))) if r["backdoored"] else "clean"
            ceil = f"{ceiling(vals, target):5.2f}" if m == "nc" else "  n/a"
            line.append(f"{verdict:<10} {signed(vals, idx, target):5.2f} {low_side_max(vals, idx, target):5.2f} {ceil} {r['wall_s']:5.0f}s")
            k = tally[m]
            k.setdefault("extra", 0)
            k["extra"] += int(bad and any(c != target for c in flagged))
            k["t"].append(r["wall_s"])
            if bad:
                k["bad"] += 1
                k["det"] += int(r["backdoored"] and target in flagged)
            else:
                k["clean"] += 1
                k["fp"] += int(r["backdoored"])
        rows.append("  ".join(line))
    head = f"{'model':<13}  {'acc':>6}  {'ASR':>7}  {'train':>6}" + "".join(
        f"  {m.upper() + ': verdict':<10} {'t-idx':>5} {'c-max':>5} {'ceil':>5} {'scan':>6}" for m in methods)
    print(head)
    print("\n".join(rows))
    print("ASR*: clean model, Patch(3,(-4,-4),checker)->0 control.  train: CPU seconds (w: wall, CPU not recorded).\n"
          "t-idx: anomaly index of the target (class 0 on clean models), + below the median, - above; "
          "c-max: largest low-side index of the other classes")
    for m in methods:
        k = tally[m]
        if k["t"]:
            print(f"{m}: detected {k['det']}/{k['bad']} BadNets models (target flagged; {k.get('extra', 0)} of them with other classes flagged too); false positives {k['fp']}/{k['clean']} "
                  f"clean models; scan time median {statistics.median(k['t']):.0f}s (range {min(k['t']):.0f}-{max(k['t']):.0f}s)")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:] or ["nc", "tabor"])
