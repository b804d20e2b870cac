"""Tabulate every NC result: python summary.py > results/summary.txt"""
import json
import statistics
from pathlib import Path


def mad_index(vals, i):
    med = statistics.median(vals)
    mad = 1.4826 * statistics.median([abs(v - med) for v in vals])
    return (med - vals[i]) / mad if mad else float("inf")


files = sorted(Path("results/digits").glob("*.nc.json")) + sorted(Path("models").glob("*/*/nc.json"))
print("mask L1 per class (c = converged), MAD anomaly index (low side), verdict; "
      "'ceil' = index class 0 would get with L1 = 0 (others unchanged); med/L1[0] = median over classes / class-0 L1")
for f in files:
    r = json.loads(f.read_text())
    name = f.name.replace(".nc.json", "") if f.parent.name == "digits" else f"{f.parent.parent.name}/{f.parent.name}"
    truth = f.parent / "truth.json"
    extra = ""
    if truth.is_file():
        t = json.loads(truth.read_text())
        extra = f"acc {t['clean_accuracy']:.1%}  patch->0 {t['patch_asr']:.1%}  n_train {t['n_train']}"
    elif f.parent.name == "digits":
        t = json.loads((Path("/tmp/zoo_std") / name / "truth.json").read_text())
        extra = f"acc {t['clean_accuracy']:.1%}  " + (f"ASR {t['asr']:.1%}" if t["asr"] is not None else "")
    l1, idx = r["mask_l1"], r["anomaly"]
    vals0 = [0.0] + l1[1:]
    med = statistics.median(l1)
    print(f"\n{name}  [{'x'.join(map(str, r['image_shape']))}, {r['n_images']} images]  {extra}")
    print("  class  " + " ".join(f"{c:>6d}" for c in range(10)))
    print("  L1     " + " ".join(f"{v:6.1f}" for v in l1) + f"   median {med:.1f}  ({med / (r['image_shape'][1] * r['image_shape'][2]):.1%} of image)")
    print("  conv   " + " ".join(f"{'c' if c else '-':>6}" for c in r["converged"]))
    print("  index  " + " ".join(f"{v:6.2f}" for v in idx))
    print(f"  verdict {'BACKDOORED ->' + ','.join(map(str, r['targets'])) if r['backdoored'] else 'clean'}   "
          f"ceil {mad_index(vals0, 0):.2f}   med/L1[0] {med / l1[0]:.1f}   rank of class 0: {sorted(l1).index(l1[0]) + 1}   "
          f"scan {r['wall_s']:.0f}s")
