"""The demo scan: a backdoored and a clean model from the embedded digits data,
each scanned with Neural Cleanse and L-RED, verdicts printed with the target found.

Models are built once with the zoo machinery and cached (``--cache`` or
$TRIGSCAN_CACHE, default ~/.cache/trigscan/demo); later runs reuse them.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

def demo_specs():
    """A BadNets model (4x4 checkerboard near the bottom-right corner -> class 3,
    10% of the training set poisoned) and a clean model of the same architecture."""
    from trigscan.zoo import ModelSpec, Patch, Rule, standard_specs

    clean = next(s for s in standard_specs() if s.name == "clean-cnn-grey-s0")
    backdoored = ModelSpec("demo-badnets-cnn-grey", "cnn", "digits", 30, "badnets",
                           [Rule(Patch(4, (-5, -5), "checker"), target=3, rate=0.1)])
    return [backdoored, clean]
# Settings chosen to keep the demo within a few minutes on 2 CPU cores; the
# full defaults are in each scanner's Config.
DEMO_METHODS = {"nc": {"max_steps": 300}, "lred": {"images_per_class": 4}}


def default_cache() -> Path:
    return Path(os.environ.get("TRIGSCAN_CACHE", Path.home() / ".cache" / "trigscan" / "demo"))


def run_demo(cache: Path | None = None, out=print, seed: int = 0) -> dict:
    """Build (or reuse) the demo models, scan them, print and return the verdicts."""
    import trigscan
    from trigscan.data import read_npz
    from trigscan.zoo import build_zoo

    cache = Path(cache) if cache is not None else default_cache()
    specs = demo_specs()
    started = time.perf_counter()
    out(f"demo models in {cache} (built once, then reused)")
    build_zoo(cache, specs, command="trigscan demo", log=lambda line: out("  " + line), quiet=True)
    summary = {"models": {}, "cache": str(cache)}
    for spec in specs:
        name = spec.name
        folder = cache / name
        truth = json.loads((folder / "truth.json").read_text())
        test = read_npz(folder / "test.npz")
        x, y = torch.as_tensor(test["x"])[:100], torch.as_tensor(test["y"])[:100]
        model = trigscan.load_model(folder / "model.pt")
        truth_text = (f"backdoored, target {truth['targets']}" if truth["backdoored"] else "clean")
        out(f"\n{name}  (truth: {truth_text}, clean accuracy {truth['clean_accuracy']:.3f})")
        summary["models"][name] = {"truth": truth_text, "results": {}}
        for method, options in DEMO_METHODS.items():
            labels = y if trigscan.scanners.get(method).needs_labels else None
            result = trigscan.scan(model, x, labels, method=method, seed=seed, **options)
            verdict = f"BACKDOORED, target {result.targets}" if result.backdoored else "clean"
            extra = (f"p-value {result.anomaly.p_value:.2g}" if result.anomaly.p_value is not None
                     else f"max anomaly index {max(result.anomaly.values):.2f}")
            out(f"  {method:6s} -> {verdict:28s} ({extra}; {result.elapsed_s:.0f} s)")
            summary["models"][name]["results"][method] = {
                "backdoored": result.backdoored, "targets": result.targets}
    summary["elapsed_s"] = time.perf_counter() - started
    out(f"\ndemo finished in {summary['elapsed_s']:.0f} s")
    return summary
