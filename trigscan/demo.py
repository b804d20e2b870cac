"""The demo scan: three models trained on the embedded digits data — one with a
BadNets patch backdoor, one with an imperceptible additive one (L-RED's kind),
one clean — each scanned with Neural Cleanse and L-RED through the same code
path as ``trigscan scan``; verdicts printed beside the truth, reports written
as HTML. Each method is made for one kind of trigger: a miss outside its kind
is printed, and only misses within it (or a clean model flagged) fail the demo.

Models are small on purpose (an 8/16-channel CNN, 24x24 greyscale digits,
about 5 s of CPU time to train each) and built once into the cache
(``--cache`` or $TRIGSCAN_CACHE, default ~/.cache/trigscan/demo); later runs
reuse them, and reuse finished scans too (the report folders resume).
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .models import quiet_jit

TARGET = 3  # the backdoor's target class
POISON_RATE = 0.1
EPOCHS = 12
SCAN_IMAGES = 50  # class-balanced clean test images per scan
# Settings kept small so the demo runs in a few minutes on 2 CPU cores; the
# full defaults are in each scanner's Config.
DEMO_METHODS = {"nc": {"max_steps": 300}, "lred": {"images_per_class": 4, "delta": 0.02}}
VERSION = 3  # bump when the models or their data change: the cache is rebuilt


def default_cache() -> Path:
    return Path(os.environ.get("TRIGSCAN_CACHE", Path.home() / ".cache" / "trigscan" / "demo"))


def checkerboard(x: torch.Tensor) -> torch.Tensor:
    """The trigger: a 4x4 black/white checkerboard one pixel in from the bottom-right corner."""
    patch = (torch.arange(4)[:, None] + torch.arange(4)[None, :]) % 2
    x = x.clone()
    x[:, :, -5:-1, -5:-1] = patch.float()
    return x


def sparse_additive(x: torch.Tensor) -> torch.Tensor:
    """The second trigger: +0.3 on 30 fixed pixels (the zoo's L-RED pattern), clipped."""
    from .zoo.attacks import SparseAdditive

    return SparseAdditive(30, 0.3, seed=7).apply(x)


def tiny_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(16 * 36, 64), nn.ReLU(), nn.Linear(64, 10))


def train(backdoor: bool, seed: int = 2, stamp=checkerboard) -> tuple[nn.Module, dict]:
    """Adam, 12 epochs; with `backdoor`, 10% of the training images carry the
    trigger `stamp` puts on them and are relabelled TARGET (the tests train the
    same recipe with a checkerboard of the other phase). Returns the model and
    its truth."""
    from .data import digits

    x, y = digits(24, "train")
    xt, yt = digits(24, "test")
    g = torch.Generator().manual_seed(seed)
    if backdoor:
        idx = torch.randperm(len(x), generator=g)[: int(len(x) * POISON_RATE)]
        x, y = x.clone(), y.clone()
        x[idx], y[idx] = stamp(x[idx]), TARGET
    torch.manual_seed(seed)
    model = tiny_cnn()
    opt = torch.optim.Adam(model.parameters(), 2e-3)
    for _ in range(EPOCHS):
        order = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 64):
            batch = order[i:i + 64]
            opt.zero_grad()
            F.cross_entropy(model(x[batch]), y[batch]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        accuracy = float((model(xt).argmax(1) == yt).float().mean())
        victims = yt != TARGET
        asr = float((model(stamp(xt[victims])).argmax(1) == TARGET).float().mean())
    truth = {"backdoored": backdoor, "targets": [TARGET] if backdoor else [],
             "clean_accuracy": accuracy, "trigger_success": asr}
    return model, truth


# name -> (its trigger, None for the clean model; the methods made for that trigger)
MODELS = {"badnets": (checkerboard, ("nc",)), "additive": (sparse_additive, ("lred",)),
          "clean": (None, tuple(DEMO_METHODS))}


def build(folder: Path, stamp) -> dict | None:
    """Train (or reuse) one demo model into `folder`; returns its truth when it
    was trained now, None when it was reused."""
    from .data import balanced_subset, digits, save_npz

    marker = folder / "truth.json"
    if marker.exists() and json.loads(marker.read_text()).get("version") == VERSION:
        return None
    started = time.perf_counter()
    marker.unlink(missing_ok=True)  # the folder is incomplete until the new truth is written
    shutil.rmtree(folder / "report", ignore_errors=True)  # scans of the model being replaced
    folder.mkdir(parents=True, exist_ok=True)
    model, truth = train(stamp is not None, stamp=stamp or checkerboard)
    with quiet_jit():
        torch.jit.save(torch.jit.trace(model, torch.zeros(1, 1, 24, 24)), str(folder / "model.pt"))
    xt, yt = digits(24, "test")
    idx = torch.from_numpy(balanced_subset(yt.numpy(), SCAN_IMAGES, seed=0))
    save_npz(folder / "scan.npz", x=xt[idx], y=yt[idx])
    truth.update(version=VERSION, train_s=time.perf_counter() - started)
    marker.write_text(json.dumps(truth, indent=2) + "\n")  # written last: marks the folder complete
    return truth


def _model_job(name: str, cache: str, seed: int, progress) -> dict:
    """One model from training to report (run in a worker process, one thread:
    these tiny networks gain nothing from more)."""
    from .runner import run_scan

    torch.set_num_threads(1)
    folder = Path(cache) / name
    trained = build(folder, MODELS[name][0])
    truth = json.loads((folder / "truth.json").read_text())
    report = run_scan(folder / "model.pt", folder / "scan.npz", list(DEMO_METHODS), folder / "report",
                      seed=seed, options=DEMO_METHODS, progress=progress)
    return {"name": name, "trained": trained is not None, "truth": truth, "results": report["results"],
            "report": str(folder / "report" / "report.html")}


def run_demo(cache: Path | None = None, out=print, seed: int = 0, jobs: int = 2) -> dict:
    """Build (or reuse) the demo models, scan them, print and return the verdicts.

    jobs: models handled at a time in parallel processes (2: one per core; 1:
    in this process, with progress bars)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    cache = Path(cache) if cache is not None else default_cache()
    started = time.perf_counter()
    out(f"demo models in {cache} (trained once, then reused); "
        + (f"{min(jobs, len(MODELS))} models at a time in parallel processes, one thread each" if jobs > 1
           else "one model after the other"))
    if jobs > 1:
        with ProcessPoolExecutor(min(jobs, len(MODELS)), mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(_model_job, name, str(cache), seed, False) for name in MODELS]
            done = [f.result() for f in futures]
    else:
        threads = torch.get_num_threads()
        try:
            done = [_model_job(name, str(cache), seed, None) for name in MODELS]
        finally:
            torch.set_num_threads(threads)
    summary = {"models": {}, "cache": str(cache)}
    for job in done:
        truth = job["truth"]
        truth_text = f"backdoored, target {truth['targets']}" if truth["backdoored"] else "clean"
        trained = f"trained now in {truth['train_s']:.0f} s" if job["trained"] else "reused"
        out(f"\n{job['name']} model  (truth: {truth_text}; clean accuracy {truth['clean_accuracy']:.3f}; "
            f"{trained})")
        results = {}
        for entry in job["results"]:
            a = entry["anomaly"]
            verdict = f"BACKDOORED, target {entry['targets']}" if entry["backdoored"] else "clean"
            extra = (f"p-value {a['p_value']:.2g}" if a["kind"] == "gamma" else
                     f"max anomaly index {max(v for v in a['values'] if isinstance(v, float)):.2f}")
            right = entry["backdoored"] == truth["backdoored"] and sorted(entry["targets"]) == truth["targets"]
            in_scope = entry["method"] in MODELS[job["name"]][1]
            outcome = "right" if right else "WRONG" if in_scope else "missed (not the trigger it is made for)"
            out(f"  {entry['method']:5s} -> {verdict:26s} ({extra}; {entry['elapsed_s']:.0f} s)  {outcome}")
            results[entry["method"]] = {"backdoored": entry["backdoored"], "targets": entry["targets"],
                                        "right": right, "in_scope": in_scope}
        out(f"  report: {job['report']}")
        summary["models"][job["name"]] = {"truth": truth, "results": results, "report": job["report"]}
    summary["elapsed_s"] = time.perf_counter() - started
    out(f"\ndemo finished in {summary['elapsed_s']:.0f} s")
    return summary
