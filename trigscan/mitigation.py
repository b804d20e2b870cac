"""Mitigation after a DTInspector scan: drop the training samples that the
learned patches expose, and retrain a zoo model without them.

For every flagged label z, each training sample labelled z is stamped with z's
patch; a sample that the patch moves off z is dropped. A poisoned sample
leaves z as soon as the patch breaks its trigger; a clean sample of z keeps
its label (the patch does not transfer to it; that is what flagged z).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from .models import as_white_box
from .result import ScanResult
from .scanners.base import check_images, check_labels, model_scores


def drop_indices(model, images, labels, result: ScanResult, *, confidence: float | None = None,
                 batch_size: int = 256) -> torch.Tensor:
    """Indices (sorted, long) of the training samples to drop.

    images: the training set the scan inspected, float [N, C, H, W] in [0, 1];
    labels: its training labels, or None to use the model's predictions;
    result: a DTInspector ScanResult (its flagged labels and their patches);
    confidence: None drops a sample when the patch changes its prediction (the
    paper); a value c in (0, 1] also drops it when the patch leaves the model's
    probability of its label below c (our option: catches poisoned samples
    whose trigger the patch weakens without flipping them).
    """
    if confidence is not None and not (isinstance(confidence, (int, float)) and 0 < confidence <= 1):
        raise ValueError(f"confidence: expected None or a value in (0, 1], got {confidence!r}")
    if not isinstance(result, ScanResult) or result.method != "dtinspector":
        raise ValueError(f"result: expected a DTInspector ScanResult, got "
                         f"{getattr(result, 'method', type(result).__name__)!r}")
    images = check_images(images)
    model = as_white_box(model)
    num_classes = model.probe(images)
    images = images.to(model.device)
    if labels is not None:
        labels = check_labels(labels, images.shape[0], num_classes).to(images.device)
    patches = {c.target: c.trigger for c in result.per_class}
    missing = [z for z in result.targets if "mask" not in patches.get(z, {})]
    if missing:
        raise ValueError(f"result: no learned patch for flagged label(s) {missing}")
    if not result.targets:
        return torch.zeros(0, dtype=torch.long)
    if labels is None:
        labels = model_scores(model, images, batch_size).argmax(1)
    with torch.no_grad():
        flagged = torch.tensor(result.targets, device=images.device)
        row = torch.zeros(num_classes, dtype=torch.long, device=images.device)
        row[flagged] = torch.arange(len(flagged), device=images.device)  # label -> its patch
        masks = torch.stack([patches[z]["mask"] for z in result.targets]).to(images.device)
        patterns = torch.stack([patches[z]["pattern"] for z in result.targets]).to(images.device)
        dropped = []
        for idx in torch.isin(labels, flagged).nonzero().flatten().split(batch_size):
            m, p = masks[row[labels[idx]]], patterns[row[labels[idx]]]
            stamped = (1 - m) * images[idx] + m * p
            probs = model(stamped).softmax(dim=1)
            moved = probs.argmax(1) != labels[idx]
            if confidence is not None:
                moved |= probs.gather(1, labels[idx, None]).squeeze(1) < confidence
            dropped.append(idx[moved])
    return torch.cat(dropped).sort().values.cpu() if dropped else torch.zeros(0, dtype=torch.long)


def attack_rates(model, folder: Path, truth: dict) -> list[float]:
    """ASR of every backdoor rule of a zoo model on its clean test set (as the zoo measures it)."""
    from .data import read_npz
    from .zoo.attacks import Rule, trigger_from_dict
    from .zoo.train import attack_success

    test = read_npz(folder / "test.npz")
    xte, yte = torch.from_numpy(test["x"]), torch.from_numpy(test["y"])
    return [attack_success(model, xte, yte, Rule(trigger_from_dict(r["trigger"]), r["target"], sources=r["sources"],
                                                 test_trigger=None if r["test_trigger"] is None
                                                 else trigger_from_dict(r["test_trigger"])), seed=i)
            for i, r in enumerate(truth["rules"])]


def mitigate_zoo_model(folder, *, seed: int = 0, result: ScanResult | None = None,
                       options: dict | None = None, confidence: float | None = None) -> dict:
    """Scan a zoo model with DTInspector (unless `result` is given), drop the
    exposed training samples, retrain the model from scratch on the rest with
    the zoo's own recipe (architecture, seed, epochs: ``trigscan.zoo.train.fit``)
    and report clean accuracy and ASR before and after.

    options: DTInspector's options; confidence: see ``drop_indices``.
    Returns a dict: flagged labels, dropped / poisoned counts and how many of the
    dropped were poisoned, accuracy and per-rule ASR of the original and the
    retrained model (``asr`` is the highest over the rules), and timings.
    """
    import trigscan

    from .data import read_npz
    from .zoo.evaluate import load_torchscript
    from .zoo.nets import make_model
    from .zoo.train import accuracy, fit

    folder = Path(folder)
    truth_file = folder / "truth.json"
    if not truth_file.is_file():
        raise ValueError(f"folder: {folder} is not a built zoo model (no truth.json)")
    truth = json.loads(truth_file.read_text())
    model = load_torchscript(folder / "model.pt")
    train, test = read_npz(folder / "train.npz"), read_npz(folder / "test.npz")
    x, y = torch.from_numpy(train["x"]), torch.from_numpy(train["y"])
    xte, yte = torch.from_numpy(test["x"]), torch.from_numpy(test["y"])
    started = time.perf_counter()
    if result is None:
        result = trigscan.scan(model, x, y, method="dtinspector", seed=seed, **(options or {}))
    scan_s = time.perf_counter() - started
    drop = drop_indices(model, x, y, result, confidence=confidence).numpy()
    poisoned = np.asarray(train["poisoned"], dtype=np.int64)
    hit = int(np.isin(drop, poisoned).sum())
    report = {
        "model": truth["name"], "backdoored": truth["backdoored"], "targets": truth["targets"],
        "flagged": list(result.targets), "confidence": confidence, "n_train": int(len(y)), "poisoned": int(len(poisoned)),
        "dropped": int(len(drop)), "dropped_poisoned": hit,
        "precision": hit / len(drop) if len(drop) else None,
        "recall": hit / len(poisoned) if len(poisoned) else None,
        "before": {"accuracy": accuracy(model, xte, yte)}, "after": None, "scan_s": round(scan_s, 1),
    }
    if truth["backdoored"]:
        rates = attack_rates(model, folder, truth)
        report["before"].update(asr=max(rates), asr_per_rule=rates)
    if not len(drop):
        report["note"] = "nothing dropped: no retraining"
        return report
    keep = torch.from_numpy(np.setdiff1d(np.arange(len(y)), drop))
    spec = truth["spec"]
    started = time.perf_counter()
    retrained = make_model(spec["arch"], x.shape[1], spec["size"], truth["classes"], spec["seed"])
    fit(retrained, x[keep], y[keep], epochs=spec["epochs"], seed=spec["seed"])
    report["retrain_s"] = round(time.perf_counter() - started, 1)
    report["after"] = {"accuracy": accuracy(retrained, xte, yte)}
    if truth["backdoored"]:
        rates = attack_rates(retrained, folder, truth)
        report["after"].update(asr=max(rates), asr_per_rule=rates)
    return report
