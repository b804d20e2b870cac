"""End-to-end scanner benchmarks on a zoo model (2 intra-op threads, set by conftest).

The model is the zoo's ``badnets-cnn-grey`` (SmallCNN 16/32 channels with
batch-norm, 1x24x24 digits, 3x3 checkerboard -> class 0), trained here in a
temporary folder (~30 s); the scan images are 100 class-balanced clean test
images (``balanced_subset(y, 100, seed=0)``, as ``trigscan zoo eval``).

- ``bench_scan[nc-batched]``: a full default NC scan, all 10 classes as one
  batch (target: <= 90 s on 2 threads).
- ``bench_scan[<method>-loop]``: the same algorithm with ``batched=False`` --
  one class after the other, each with its own Adam, schedule and early stop,
  same per-class maths; ``test_batched_and_loop_agree`` checks the verdicts.
  PixelBackdoor runs both ways with max_steps=100 (its default 1000 steps
  have no early stop; the cost per step does not change with the step count).
- ``bench_scan[nc-as-given]``: the batched NC scan of the model exactly as
  loaded (``WhiteBoxModel(model, optimize=False)``); every other case scans
  the faster copy a TorchScript model gets on the CPU by default
  (``trigscan.models.fast_cpu_copy``: channels_last weights, frozen, batch-norm
  folded). The ratio of the two is what that copy gains.
- ``bench_model_floor[as-given-320]``: the model's own forward + backward
  (gradient to the input, as a scan needs) on one batch of 10 x 32 images --
  the floor of a batched scan step; ``[as-given-32]``: one class's mini-batch,
  the floor of the class loop; ``[fast-*]``: the same for the fast copy, the
  floor the scans run against. The ratio of 320 to 32 bounds what batching
  the classes can gain on this machine. The summary prints images per second
  of every scan next to them.

Run:  python -m pytest benchmarks/bench_scanners.py --benchmark-json=scanners.json
(--idle-wait 600 waits for a quiet machine before each benchmark;
TRIGSCAN_BENCH_QUICK=1 runs every scan for 3 steps only, as a smoke test).
"""
from __future__ import annotations

import os

import pytest
import torch

import trigscan  # noqa: F401
from trigscan import scanners
from trigscan.data import balanced_subset, read_npz
from trigscan.models import WhiteBoxModel, fast_cpu_copy
from trigscan.scanners import nc, pixel, tabor  # noqa: F401  (registers them)
from trigscan.zoo import build_model, standard_specs
from trigscan.zoo.evaluate import load_torchscript

MODEL = "badnets-cnn-grey"
N_IMAGES = 100
CASES = {  # name -> (method, options)
    "nc-batched": ("nc", {}),
    "nc-as-given": ("nc", {}),
    "nc-loop": ("nc", {"batched": False}),
    "pixel-batched": ("pixel", {"max_steps": 100}),
    "pixel-loop": ("pixel", {"max_steps": 100, "batched": False}),
}
if os.environ.get("TRIGSCAN_BENCH_QUICK"):  # a smoke run of this file: 3 steps per scan
    CASES = {case: (method, {**options, "max_steps": 3}) for case, (method, options) in CASES.items()}
RESULTS: dict[str, dict] = {}


@pytest.fixture(scope="module")
def zoo_model(tmp_path_factory):
    spec = next(s for s in standard_specs() if s.name == MODEL)
    folder = tmp_path_factory.mktemp("zoo") / spec.name
    truth = build_model(spec, folder)
    model = load_torchscript(folder / "model.pt")
    test = read_npz(folder / "test.npz")
    x, y = torch.from_numpy(test["x"]), torch.from_numpy(test["y"])
    idx = torch.from_numpy(balanced_subset(y.numpy(), N_IMAGES, 0))
    return model, x[idx], truth


def images_processed(result, n_images: int) -> int:
    """Stamped images that went through forward + backward: every class step
    is one pass over the scan images."""
    return sum(c.steps for c in result.per_class) * n_images


@pytest.mark.benchmark(group="scan (10 classes, 100 images, 24x24)")
@pytest.mark.parametrize("case", list(CASES))
def bench_scan(bench, zoo_model, case):
    model, images, truth = zoo_model
    method, options = CASES[case]
    scanner = scanners.get(method)(**options)
    if case.endswith("as-given"):
        model = WhiteBoxModel(model, optimize=False)
    results = []
    bench(lambda: results.append(scanner.scan(model, images, seed=0, progress=False)), rounds=1,
          warmup=0, case=case)
    result = results[-1]
    seconds = bench.benchmark.stats.stats.median
    processed = images_processed(result, images.shape[0])
    RESULTS[case] = {"seconds": seconds, "images_per_s": processed / seconds, "targets": result.targets,
                     "statistics": result.statistics, "steps": [c.steps for c in result.per_class]}
    bench.benchmark.extra_info.update(images=processed, images_per_s=round(processed / seconds, 1),
                                      flagged=result.targets, truth=truth["targets"],
                                      steps=RESULTS[case]["steps"])


@pytest.mark.benchmark(group="model forward+backward floor")
@pytest.mark.parametrize("form", ["as-given", "fast"])
@pytest.mark.parametrize("batch_size", [32, 320])
def bench_model_floor(bench, zoo_model, batch_size, form):
    """The model alone: 320 = the 10 classes x 32 images of a batched scan step,
    32 = one class's mini-batch in the class loop; as loaded, or its fast copy."""
    model, images, _ = zoo_model
    if form == "fast":
        model = fast_cpu_copy(model)
    batch = images[torch.arange(batch_size) % images.shape[0]].clone().requires_grad_(True)
    target = torch.zeros(batch_size, dtype=torch.long)

    def step():
        batch.grad = None
        torch.nn.functional.cross_entropy(model(batch), target).backward()

    bench(step, rounds=max(30, 3000 // batch_size), warmup=3)
    seconds = bench.benchmark.stats.stats.median
    RESULTS[f"floor-{form}-{batch_size}"] = {"seconds": seconds, "images_per_s": batch_size / seconds}
    bench.benchmark.extra_info.update(images_per_s=round(batch_size / seconds, 1))


@pytest.mark.parametrize("method", ["nc", "pixel"])
def test_batched_and_loop_agree(method):
    batched, loop = RESULTS.get(f"{method}-batched"), RESULTS.get(f"{method}-loop")
    if batched is None or loop is None:
        pytest.skip("run the bench_scan cases first (same session)")
    assert batched["targets"] == loop["targets"]
    assert batched["steps"] == loop["steps"]


def pytest_terminal_summary_lines() -> list[str]:
    lines = []
    for case, r in RESULTS.items():
        if case.startswith("floor"):
            continue
        form = "as-given" if case.endswith("as-given") else "fast"
        floor = RESULTS.get(f"floor-{form}-320", {}).get("images_per_s")
        share = f", {100 * r['images_per_s'] / floor:.0f}% of the {form} model's floor at batch 320" if floor else ""
        lines.append(f"{case:14s} {r['seconds']:7.1f} s  {r['images_per_s']:8.0f} images/s{share}  "
                     f"flagged {r['targets']}")
    for method in ("nc", "pixel"):
        b, lp = RESULTS.get(f"{method}-batched"), RESULTS.get(f"{method}-loop")
        if b and lp:
            lines.append(f"{method}: batched is {lp['seconds'] / b['seconds']:.2f}x faster than the class loop")
    fast, given = RESULTS.get("nc-batched"), RESULTS.get("nc-as-given")
    if fast and given:
        lines.append(f"nc: scanning the fast copy is {given['seconds'] / fast['seconds']:.2f}x faster than the model as given")
    for form in ("as-given", "fast"):
        for size in (32, 320):
            if f"floor-{form}-{size}" in RESULTS:
                lines.append(f"model ({form}) forward+backward alone at batch {size}: "
                             f"{RESULTS[f'floor-{form}-{size}']['images_per_s']:.0f} images/s")
    return lines


@pytest.fixture(scope="module", autouse=True)
def _summary(request):
    """Prints the summary after the last benchmark of this file (outside output capture)."""
    yield
    lines = pytest_terminal_summary_lines()
    if not lines:
        return
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print("\n---------------- scanner summary ----------------")
        for line in lines:
            print(line)
