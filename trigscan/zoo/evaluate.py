"""Running registered scanners over a built zoo and scoring them against the truth.

A verdict is *correct* when a clean model is called clean, or a backdoored one
is flagged with at least one of its true target classes among those found.
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ..data import balanced_subset, read_npz
from ..models import load_torchscript as _load_any_torchscript
from .attacks import Patch, trigger_from_dict


def zoo_models(directory) -> list[tuple[Path, dict]]:
    """(folder, truth) of every complete model, in ``zoo.json`` order when there is one."""
    root = Path(directory)
    if not root.is_dir():
        raise ValueError(f"{root}: not a folder (build a zoo first: trigscan zoo build {root})")
    found = {p.parent.name: p.parent for p in root.glob("*/truth.json")}
    order = sorted(found)
    index = root / "zoo.json"
    if index.is_file():
        listed = [m["name"] for m in json.loads(index.read_text())["models"] if m["name"] in found]
        order = listed + [n for n in order if n not in listed]
    if not order:
        raise ValueError(f"{root}: holds no built models (no */truth.json)")
    return [(found[n], json.loads((found[n] / "truth.json").read_text())) for n in order]


def scan_inputs(folder: Path, training_set: bool, n_images: int, seed: int):
    """Scan images and labels: a fixed, class-balanced subset of the clean test set
    (with its labels), or the whole (poisoned) training set with its labels for
    scanners that inspect the training set (``uses_training_set``)."""
    arrays = read_npz(folder / ("train.npz" if training_set else "test.npz"))
    x, y = torch.from_numpy(arrays["x"]), torch.from_numpy(arrays["y"])
    if training_set:
        return x, y
    idx = torch.from_numpy(balanced_subset(y.numpy(), n_images, seed))
    return x[idx], y[idx]


def inputs_for(cls, folder: Path, n_images: int, seed: int):
    """(images, labels) a scanner class gets from a zoo model (``scanners.scan_data``):
    the clean test subset, the training set, or (None, None) for one that makes its own."""
    from .. import scanners

    data = scanners.scan_data(cls)
    if data == "none":
        return None, None
    return scan_inputs(folder, data == "training", n_images, seed)


def load_torchscript(path) -> torch.jit.ScriptModule:
    """A zoo model for white-box use (TorchScript, never a pickle), in eval mode."""
    return _load_any_torchscript(path).eval()


def open_model(folder: Path, access: str, method: str):
    if access == "white":
        return load_torchscript(folder / "model.pt")
    if access == "black":
        import trigscan

        loader = getattr(trigscan, "load_model", None)
        if loader is None:
            raise RuntimeError(
                f"method {method!r} is black-box and needs trigscan.load_model to open {folder / 'model.onnx'}, "
                "which this version of trigscan does not provide yet"
            )
        return loader(str(folder / "model.onnx"))
    raise ValueError(f"method {method!r}: access must be 'white' or 'black', got {access!r}")


def _stat_summary(result, targets: list[int]) -> dict:
    stats = [c.statistic for c in result.per_class]
    by_target: dict[int, list[float]] = {}
    for c in result.per_class:
        if c.target in targets:
            by_target.setdefault(c.target, []).append(c.statistic)
    return {
        "median": statistics.median(stats) if stats else None,
        "min": min(stats) if stats else None,
        "max": max(stats) if stats else None,
        "true_targets": {str(t): v for t, v in sorted(by_target.items())},
    }


def trigger_footprint(trigger: dict) -> torch.Tensor | None:
    """Where a recovered trigger acts, as an [H, W] map >= 0: its mask (summed over
    channels), or the size of the pixel change it makes (PixelBackdoor's positive −
    negative, L-RED's perturbation); None for a trigger of another kind."""
    if "mask" in trigger:
        return trigger["mask"].sum(0)
    if "positive" in trigger:
        return (trigger["positive"] - trigger["negative"]).abs().sum(0)
    if "perturbation" in trigger:
        return trigger["perturbation"].abs().sum(0)
    return None


def trigger_overlap(result, truth: dict) -> dict:
    """Does the recovered trigger sit on the true one? For every fixed-position patch
    backdoor of the model: the share of its target class's trigger footprint on the
    patch (1 = all of it) and whether its largest value is reached on the patch.
    Label-pair scans: the first row of the target."""
    h, w = truth["input_shape"][1:]
    overlap = {}
    for rule in truth.get("rules", []):
        trigger = trigger_from_dict(rule["trigger"])
        region = trigger.region(h, w) if isinstance(trigger, Patch) else None
        row = next((c for c in result.per_class if c.target == rule["target"]), None)
        footprint = trigger_footprint(row.trigger) if region is not None and row else None
        if footprint is None:
            continue
        on_patch = torch.zeros(h, w, dtype=torch.bool)
        on_patch[region] = True
        total = float(footprint.sum())
        overlap[str(rule["target"])] = {
            "share": float(footprint[on_patch].sum()) / total if total > 0 else 0.0,
            "peak_on_patch": total > 0 and bool(footprint[on_patch].max() >= footprint.max()),
        }
    return overlap


def evaluate(directory, methods: list[str], *, options: dict | None = None, n_images: int = 100,
             seed: int = 0, only=None, quiet: bool = False) -> dict:
    """Scan every zoo model (or the ``only`` names) with every method; returns the report
    (rows and per-method summary).

    ``options`` maps a method name to keyword arguments for its constructor.
    """
    from tqdm import tqdm

    from .. import scanners

    if not methods:
        raise ValueError("methods: give at least one scanner name")
    if isinstance(n_images, bool) or not isinstance(n_images, int) or n_images < 1:
        raise ValueError(f"n_images: expected a positive integer, got {n_images!r}")
    options = options or {}
    unknown = set(options) - set(methods)
    if unknown:
        raise ValueError(f"options: given for method(s) not evaluated: {sorted(unknown)}")
    models = zoo_models(directory)
    if only is not None:
        wanted = set(only)
        unknown = wanted - {t["name"] for _, t in models}
        if unknown:
            raise ValueError(f"only: model(s) {sorted(unknown)} are not built in {directory}")
        models = [(f, t) for f, t in models if t["name"] in wanted]
    built = []
    for m in methods:
        cls = scanners.get(m)
        try:
            built.append((m, cls, cls(**options.get(m, {}))))
        except TypeError as exc:
            raise ValueError(f"method {m!r}: bad options {options.get(m, {})}: {exc}") from None

    rows, summary = [], {}
    bar = tqdm(total=len(methods) * len(models), desc="zoo eval", unit="scan", file=sys.stderr,
               disable=quiet or not sys.stderr.isatty())
    for m, cls, scanner in built:
        start = time.perf_counter()
        mine = []
        for folder, truth in models:
            row = {"method": m, "model": truth["name"], "attack": truth["attack"], "backdoored": truth["backdoored"],
                   "targets": truth["targets"], "verdict": None, "found": [], "correct": False, "error": None}
            t0 = time.perf_counter()
            try:
                images, labels = inputs_for(cls, folder, n_images, seed)
                model = open_model(folder, getattr(cls, "access", "white"), m)
                result = scanner.scan(model, images, labels, seed=seed)
                row["verdict"] = bool(result.backdoored)
                row["found"] = [int(t) for t in result.targets]
                if truth["backdoored"]:
                    row["correct"] = row["verdict"] and bool(set(row["found"]) & set(truth["targets"]))
                else:
                    row["correct"] = not row["verdict"]
                row["statistic"] = _stat_summary(result, truth["targets"])
                row["trigger_overlap"] = trigger_overlap(result, truth)
                row["result"] = result.to_dict()
            except Exception as exc:  # one failing scan must not lose the others
                row["error"] = f"{type(exc).__name__}: {exc}"
            row["elapsed_s"] = round(time.perf_counter() - t0, 3)
            mine.append(row)
            bar.update(1)
        bad = [r for r in mine if r["backdoored"]]
        clean = [r for r in mine if not r["backdoored"]]
        overlaps = [v for r in bad for v in r.get("trigger_overlap", {}).values()]
        summary[m] = {
            "models": len(mine),
            "accuracy": sum(r["correct"] for r in mine) / len(mine),
            "backdoored": len(bad),
            "detected_with_target": sum(r["correct"] for r in bad),
            "clean": len(clean),
            "false_positives": sum(bool(r["verdict"]) for r in clean),
            "errors": sum(r["error"] is not None for r in mine),
            "wall_s": round(time.perf_counter() - start, 2),
            "patch_triggers": len(overlaps),
            "patch_overlap_median": statistics.median(v["share"] for v in overlaps) if overlaps else None,
            "patch_peak_on_patch": sum(v["peak_on_patch"] for v in overlaps),
        }
        rows += mine
    bar.close()
    return {"zoo": str(directory), "methods": methods, "n_images": n_images, "seed": seed,
            "options": options, "only": only, "rows": rows, "summary": summary}


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4g}"


def format_report(report: dict) -> str:
    """The evaluation as a text table: one line per (method, model), then one per method."""
    lines = [f"{'method':<8} {'model':<26} {'truth':<12} {'verdict':<12} {'ok':<3} {'stat@target':<14} {'median':<9} "
             f"{'time':>7}  trigger on the true patch"]
    for r in report["rows"]:
        truth = "bd->" + ",".join(map(str, r["targets"])) if r["backdoored"] else "clean"
        if r["error"]:
            lines.append(f"{r['method']:<8} {r['model']:<26} {truth:<12} ERROR: {r['error']}")
            continue
        verdict = "bd->" + ",".join(map(str, r["found"])) if r["verdict"] else "clean"
        st = r["statistic"]
        at = ";".join(f"{t}:{_fmt(min(v))}" for t, v in st["true_targets"].items()) or "-"
        on_patch = "; ".join(f"{t}: {v['share']:.0%}" + ("" if v["peak_on_patch"] else ", peak off")
                             for t, v in r.get("trigger_overlap", {}).items())
        lines.append(f"{r['method']:<8} {r['model']:<26} {truth:<12} {verdict:<12} {'yes' if r['correct'] else 'NO':<3} "
                     f"{at:<14} {_fmt(st['median']):<9} {r['elapsed_s']:6.1f}s  {on_patch or '-'}")
    lines.append("")
    for m, s in report["summary"].items():
        lines.append(
            f"{m}: accuracy {s['accuracy']:.1%} ({s['models']} models); backdoored detected with a true target "
            f"{s['detected_with_target']}/{s['backdoored']}; false positives {s['false_positives']}/{s['clean']}; "
            f"errors {s['errors']}; wall {s['wall_s']:.1f}s"
        )
        if s.get("patch_triggers"):
            lines.append(f"  trigger on the true patch ({s['patch_triggers']} fixed-position patch backdoors): "
                         f"median share {s['patch_overlap_median']:.0%}, peak on the patch "
                         f"{s['patch_peak_on_patch']}/{s['patch_triggers']}")
    return "\n".join(lines)


def to_json(report: dict) -> str:
    def default(o):
        if isinstance(o, (np.generic,)):
            return o.item()
        if isinstance(o, torch.Tensor):
            return o.tolist()
        return str(o)

    return json.dumps(report, indent=2, default=default) + "\n"
