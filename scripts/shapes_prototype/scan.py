"""Run Neural Cleanse (or another method, at its defaults) on a model folder holding model.pt and test.npz.

usage: python scan.py [--method M] [--seed S] [--out OUTDIR] FOLDER [FOLDER ...]
       -> FOLDER/M.json (or OUTDIR/<name>.M.json with --out OUTDIR); M defaults to nc, S to 0 (S != 0: M-seedS.json)
"""
import json
import sys
import time
from pathlib import Path

import torch

torch.set_num_threads(1)
import trigscan  # noqa: E402
from trigscan.zoo.evaluate import load_torchscript, scan_inputs  # noqa: E402


def run(folder: Path, out: Path, method: str = "nc", seed: int = 0):
    model = load_torchscript(folder / "model.pt")
    x, y = scan_inputs(folder, False, 100, 0)
    t0 = time.perf_counter()
    r = trigscan.scan(model, x, y, method=method, seed=seed)
    wall = time.perf_counter() - t0
    rec = {
        "model": str(folder),
        "method": method,
        "seed": seed,
        "n_images": len(y),
        "image_shape": list(x.shape[1:]),
        "mask_l1": [c.statistic for c in r.per_class],  # the method's statistic (NC: mask L1; TABOR: quality)
        "statistic": [c.statistic for c in r.per_class],
        "converged": [c.converged for c in r.per_class],
        "asr": [c.asr for c in r.per_class],
        "steps": [c.steps for c in r.per_class],
        "anomaly": r.anomaly.values,
        "backdoored": r.backdoored,
        "targets": list(r.targets),
        "wall_s": wall,
        "elapsed_s": r.elapsed_s,
        "partial": r.partial,
        "notes": list(r.notes),
    }
    import numpy as np
    masks = np.stack([c.trigger["mask"].detach().cpu().numpy().reshape(x.shape[-2:]) for c in r.per_class])
    pats = np.stack([c.trigger["pattern"].detach().cpu().numpy().reshape(x.shape[1:]) for c in r.per_class])
    rec["mask_sum"] = [float(m.sum()) for m in masks]  # ||M||_1 of each class's mask, whatever the statistic
    out.write_text(json.dumps(rec, indent=1) + "\n")
    np.savez_compressed(out.with_suffix(".masks.npz"), mask=masks, pattern=pats)
    print(folder.name, method, "stat", [round(v, 1) for v in rec["mask_l1"]], "idx", [round(v, 2) for v in rec["anomaly"]],
          "verdict", rec["backdoored"], rec["targets"], f"{wall:.0f}s", flush=True)


if __name__ == "__main__":
    args = sys.argv[1:]
    outdir, method, seed = None, "nc", 0
    while args and args[0] in ("--out", "--method", "--seed"):
        if args[0] == "--seed":
            seed = int(args[1])
        elif args[0] == "--out":
            outdir = Path(args[1])
            outdir.mkdir(parents=True, exist_ok=True)
        else:
            method = args[1]
        args = args[2:]
    for a in args:
        f = Path(a)
        tag = method if seed == 0 else f"{method}-seed{seed}"
        run(f, (outdir / f"{f.name}.{tag}.json") if outdir else f / f"{tag}.json", method, seed)
