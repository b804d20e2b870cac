"""What saving a checkpoint after every step costs an NC scan.

For each zoo model: NC on 100 class-balanced test images (as ``trigscan zoo
eval``), all classes batched, a fixed number of steps (early stop off, so every
run does the same work), timed without a checkpoint, with a save after every
step (the default) and with ``min_interval``. Runs are interleaved and
repeated; the median is reported. Also reports the time of a save itself
(timed inside ``Checkpoint.save``) and the file size.

Run:  nice -n 10 python benchmarks/checkpoint_overhead.py [--zoo /tmp/zoo_std]
      [--models badnets-cnn-grey blend-resnet-rgb] [--steps 40] [--repeats 3]
"""
from __future__ import annotations

import argparse
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
    parser.add_argument("--models", nargs="+", default=["badnets-cnn-grey", "blend-resnet-rgb"])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    save_times: list[float] = []
    original = ck.Checkpoint.save

    def timed_save(self, state, **kw):
        start = time.perf_counter()
        wrote = original(self, state, **kw)
        if wrote:
            save_times.append(time.perf_counter() - start)
        return wrote

    ck.Checkpoint.save = timed_save
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, NC {args.steps} steps, "
          f"median of {args.repeats}")
    for name in args.models:
        folder = Path(args.zoo) / name
        test = read_npz(folder / "test.npz")
        idx = torch.from_numpy(balanced_subset(test["y"], 100, 0))
        x, y = torch.as_tensor(test["x"])[idx], torch.as_tensor(test["y"])[idx]
        model = trigscan.load_model(folder / "model.pt")
        options = {"max_steps": args.steps, "early_stop_patience": None}
        cases = {"none": None, "every step": 0.0, "min_interval=1s": 1.0}
        times: dict[str, list[float]] = {case: [] for case in cases}
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "nc.pt"
            for _ in range(args.repeats):
                for case, interval in cases.items():
                    path.unlink(missing_ok=True)
                    save_times.clear()
                    target = None if interval is None else ck.Checkpoint(path, min_interval=interval)
                    start = time.perf_counter()
                    trigscan.scan(model, x, y, method="nc", checkpoint=target, progress=False, **options)
                    times[case].append(time.perf_counter() - start)
                    if case == "every step":
                        per_save = statistics.median(save_times)
                        size = path.stat().st_size
        base = statistics.median(times["none"])
        print(f"{name}: {tuple(x.shape[1:])}, state file {size / 1e6:.2f} MB, "
              f"one save {per_save * 1e3:.1f} ms (median)")
        for case, values in times.items():
            t = statistics.median(values)
            print(f"  {case:>16}: {t:6.2f} s  {t / args.steps * 1e3:6.1f} ms/step  "
                  f"overhead {100 * (t - base) / base:+5.1f}%")


if __name__ == "__main__":
    main()
