"""How strong are B3D's kept triggers? One B3D scan of a zoo model at the
defaults (through its ONNX model, 100 test images, seed 0, as `zoo eval`),
then each class's kept mean trigger (mask, pattern) stamped on the scan images
and on the whole test set and classified by the model's TorchScript twin.

    OMP_NUM_THREADS=1 python scripts/b3d_kept_trigger_asr.py ZOO/MODEL [--out FILE.json]

Prints one line per class: mask L1, converged, ASR on the scan images, ASR on
the test set (docs/blackbox.md, "N = 8 images per iteration").
"""
import argparse
import json
from pathlib import Path

import numpy as np
import torch

import trigscan
from trigscan import ops
from trigscan.scanners.base import model_scores
from trigscan.zoo.evaluate import load_torchscript, open_model, scan_inputs


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="a built zoo model folder")
    parser.add_argument("--out", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args()
    images, _ = scan_inputs(args.model, False, 100, 0)
    result = trigscan.scan(open_model(args.model, "black", "b3d"), images, method="b3d", seed=0)
    net = load_torchscript(args.model / "model.pt")
    test = torch.as_tensor(np.load(args.model / "test.npz")["x"]).float()
    masks = torch.stack([c.trigger["mask"] for c in result.per_class])
    patterns = torch.stack([c.trigger["pattern"] for c in result.per_class])
    targets = torch.tensor([c.target for c in result.per_class])

    def asr(x):  # every class's trigger on every image: [T, N] stamped images, one forward
        stamped = ops.stamp(x, masks, patterns)
        labels = model_scores(net, stamped.flatten(0, 1)).argmax(1).view(stamped.shape[:2])
        return (labels == targets[:, None]).float().mean(dim=1).tolist()

    rows = [{"class": c.target, "mask_l1": round(c.statistic, 2), "converged": c.converged,
             "asr_scan_images": round(on_scan, 3), "asr_test_set": round(on_test, 3)}
            for c, on_scan, on_test in zip(result.per_class, asr(images), asr(test))]
    for row in rows:
        print(row)
    print(f"verdict: backdoored={result.backdoored} targets={result.targets} queries={result.queries}")
    if args.out:
        args.out.write_text(json.dumps({"model": args.model.name, "targets": result.targets, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
