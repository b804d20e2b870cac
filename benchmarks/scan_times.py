"""Full-scan time of every method on one zoo model, at its defaults.

    python benchmarks/scan_times.py ZOO/badnets-cnn-grey [--threads 2] [--method nc ...] [--json F]

One fresh process per method (so each starts from the same state), the
method's defaults, seed 0, all 10 candidate classes, the inputs `trigscan zoo
eval` gives it (`zoo.evaluate.inputs_for`: 100 class-balanced clean test images,
the training set for DTInspector, none for B3D-SS); black-box methods query
the ONNX model through ONNX Runtime. Prints wall and CPU time (user + sys of
the scan's process), the verdict, and the load average before and after each
scan: the machine may be shared, and a wall time is only as good as its load.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

METHODS = ["nc", "tabor", "pixel", "lred", "ured", "dtinspector", "b3d", "b3d-ss"]

ONE_SCAN = r"""
import json, resource, sys, time, torch
folder, method, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.set_num_threads(threads)
import trigscan
from pathlib import Path
from trigscan import scanners
from trigscan.zoo.evaluate import inputs_for, open_model
cls = scanners.get(method)
images, labels = inputs_for(cls, Path(folder), 100, 0)
model = open_model(Path(folder), cls.access, method)
usage = lambda: sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
cpu0, t0 = usage(), time.perf_counter()
result = cls().scan(model, images, labels, seed=0)
wall, cpu = time.perf_counter() - t0, usage() - cpu0
queries = sum(c.queries or 0 for c in result.per_class)
print(json.dumps({"method": method, "wall_s": wall, "cpu_s": cpu, "backdoored": result.backdoored,
                  "targets": result.targets, "queries": queries, "threads": torch.get_num_threads(),
                  "images": None if images is None else len(images)}))
"""


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a built zoo model folder (model.pt, model.onnx, test.npz, train.npz)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--method", action="append", choices=METHODS, help="default: all")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    truth = json.loads((Path(args.model) / "truth.json").read_text())
    print(f"model {truth['name']} (truth: {'-> ' + str(truth['targets']) if truth['backdoored'] else 'clean'}), "
          f"{args.threads} torch threads, {os.cpu_count()} logical CPUs")
    print(f"{'method':<12} {'wall s':>8} {'CPU s':>8} {'verdict':<14} {'queries':>11}  load before -> after")
    rows = []
    for method in args.method or METHODS:
        before = loadavg()
        run = subprocess.run([sys.executable, "-c", ONE_SCAN, args.model, method, str(args.threads)],
                             capture_output=True, text=True)
        if run.returncode != 0:
            print(f"{method:<12} failed: {run.stderr.strip().splitlines()[-1] if run.stderr else run.returncode}")
            continue
        row = json.loads(run.stdout.strip().splitlines()[-1])
        row.update(load_before=before, load_after=loadavg())
        rows.append(row)
        verdict = ("-> " + ",".join(map(str, row["targets"]))) if row["backdoored"] else "clean"
        print(f"{method:<12} {row['wall_s']:8.1f} {row['cpu_s']:8.1f} {verdict:<14} "
              f"{row['queries'] or '':>11}  {row['load_before']} -> {row['load_after']}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"model": truth["name"], "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
