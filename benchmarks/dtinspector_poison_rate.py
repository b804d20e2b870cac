"""DTInspector on blended models trained at lower poisoning rates.

    python benchmarks/dtinspector_poison_rate.py OUT_DIR [--model blend-cnn-grey] [--rates 0.01 0.02 0.03 0.05]

The DTInspector paper builds each attack at the smallest poisoning rate (in
0.1% steps) that reaches 95% ASR; the zoo poisons a fixed 10%. This trains
the zoo's blended model (same architecture, data, seed and trigger) at each
rate into OUT_DIR (reused when present), and prints its accuracy and ASR, how
many of the target label's 50 most confident training images are poisoned
(the paper's premise: most of them), and DTInspector's verdict with the
target's transfer ratio, the median ratio and the target's anomaly index.
One torch thread.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

import trigscan
from trigscan.data import read_npz
from trigscan.scanners.base import model_scores
from trigscan.scanners.dtinspector import confidence_log_odds
from trigscan.zoo.build import ModelSpec, build_model, standard_specs
from trigscan.zoo.evaluate import load_torchscript, scan_inputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="where the models are built")
    parser.add_argument("--model", default="blend-cnn-grey", help="a blended model of the standard zoo")
    parser.add_argument("--rates", type=float, nargs="+", default=[0.01, 0.02, 0.03, 0.05])
    parser.add_argument("--k", type=int, default=50, help="DTInspector's K (high-set size)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    spec = next((s for s in standard_specs() if s.name == args.model), None)
    if spec is None or len(spec.rules) != 1:
        parser.error(f"--model: expected a single-rule model of the standard zoo, got {args.model!r}")
    rule = spec.rules[0]
    for rate in args.rates:
        folder = args.out / f"{spec.name}-rate{rate:g}"
        if not (folder / "truth.json").exists():
            build_model(ModelSpec(folder.name, spec.arch, spec.data, spec.seed, spec.attack,
                                  [dataclasses.replace(rule, rate=rate)]), folder)
        truth = json.loads((folder / "truth.json").read_text())
        x, y = scan_inputs(folder, True, 0, 0)
        model = load_torchscript(folder / "model.pt")
        poisoned = set(read_npz(folder / "train.npz")["poisoned"].tolist())
        confidence, predicted = confidence_log_odds(model_scores(model, x))
        group = (predicted == rule.target).nonzero().flatten()
        top = group[torch.argsort(-confidence[group], stable=True)[:args.k]].tolist()
        start = time.perf_counter()
        result = trigscan.scan(model, x, y, method="dtinspector", k=args.k)
        ratios = result.statistics
        print(f"{folder.name}: accuracy {truth['clean_accuracy']:.3f}, ASR {truth['asr']:.3f}, "
              f"{len(poisoned)} poisoned, {len(group)} predicted {rule.target}, "
              f"top {args.k} poisoned {sum(i in poisoned for i in top)}; DTInspector -> {result.targets} "
              f"(ratio {ratios[rule.target]:.2f}, median {sorted(ratios)[len(ratios) // 2]:.2f}, "
              f"index {result.anomaly.values[rule.target]:.1f}; {time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
