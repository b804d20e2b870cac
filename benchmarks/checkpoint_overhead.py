"""What saving a checkpoint after every step costs an NC scan.

For each zoo model: NC on 100 class-balanced test images (as ``trigscan zoo
eval``), all classes batched, a fixed number of steps (early stop off, so every
run does the same work), run without a checkpoint and with a save after every
step (the default), interleaved and repeated. Reported: the scan's wall and
CPU time per step, each save's wall and CPU time (timed inside
``Checkpoint.save``; the wall time includes the fsync), their ratio, and the
end-to-end difference. On a shared machine the end-to-end difference is
within the noise; the save/step ratios are the robust figure.

Run:  nice -n 10 python benchmarks/checkpoint_overhead.py [--zoo /tmp/zoo_std]
      [--models badnets-cnn-grey] [--steps 20] [--repeats 2] [--threads 2]
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

import trigscan
from trigscan import checkpoint as ck
from trigscan.data import balanced_subset, read_npz


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", default="/tmp/zoo_std")
    parser.add_argument("--models", nargs="+", default=["badnets-cnn-grey"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    saves: list[tuple[float, float]] = []  # (wall, cpu) of each save
    original = ck.Checkpoint.save

    def timed_save(self, state, **kw):
        wall, cpu = time.perf_counter(), time.process_time()
        wrote = original(self, state, **kw)
        if wrote:
            saves.append((time.perf_counter() - wall, time.process_time() - cpu))
        return wrote

    ck.Checkpoint.save = timed_save
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, NC {args.steps} steps, "
          f"{args.repeats} repeats (medians), load average {os.getloadavg()[0]:.1f} at start")
    for name in args.models:
        folder = Path(args.zoo) / name
        test = read_npz(folder / "test.npz")
        idx = torch.from_numpy(balanced_subset(test["y"], 100, 0))
        x, y = torch.as_tensor(test["x"])[idx], torch.as_tensor(test["y"])[idx]
        model = trigscan.load_model(folder / "model.pt")
        options = {"max_steps": args.steps, "early_stop_patience": None}
        runs: dict[str, list[tuple[float, float]]] = {"none": [], "every step": []}
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "nc.pt"
            for _ in range(args.repeats):
                for case in runs:
                    path.unlink(missing_ok=True)
                    wall, cpu = time.perf_counter(), time.process_time()
                    trigscan.scan(model, x, y, method="nc", progress=False,
                                  checkpoint=None if case == "none" else path, **options)
                    runs[case].append((time.perf_counter() - wall, time.process_time() - cpu))
            size = path.stat().st_size
        step_wall = statistics.median(w for w, _ in runs["none"]) / args.steps
        step_cpu = statistics.median(c for _, c in runs["none"]) / args.steps
        save_wall = statistics.median(w for w, _ in saves)
        save_cpu = statistics.median(c for _, c in saves)
        saves.clear()
        total = {case: statistics.median(w for w, _ in values) for case, values in runs.items()}
        print(f"{name} {tuple(x.shape[1:])}: final (complete) state file {size / 1e6:.2f} MB")
        print(f"  step (no checkpoint): {step_wall * 1e3:7.1f} ms wall {step_cpu * 1e3:7.1f} ms CPU")
        print(f"  one save:             {save_wall * 1e3:7.1f} ms wall {save_cpu * 1e3:7.1f} ms CPU"
              f"   = {100 * save_wall / step_wall:.1f}% of a step's wall time, "
              f"{100 * save_cpu / step_cpu:.1f}% of its CPU time")
        print(f"  end to end: {total['none']:.2f} s without, {total['every step']:.2f} s with a save "
              f"per step ({100 * (total['every step'] - total['none']) / total['none']:+.1f}%)")
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
