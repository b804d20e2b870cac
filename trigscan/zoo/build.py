"""Building a zoo: clean and backdoored models with their ground truth.

Layout::

    DIR/zoo.json                 index: every model's truth, build time, command
    DIR/<name>/model.pt          TorchScript (white-box)
    DIR/<name>/model.onnx        ONNX (black-box)
    DIR/<name>/train.npz         the training set as trained on: x, y, y_true,
                                 poisoned (indices), rule_of, cover
    DIR/<name>/test.npz          clean test images: x, y
    DIR/<name>/truth.json        written last: its presence marks the model complete

Every random choice flows from the model's ``seed``; training runs on one
thread (tiny convolutions gain nothing from more, and a fixed thread count
fixes the order of float reductions), so a rebuild gives byte-identical data
files and identical weights.  Models are built in parallel processes instead.
"""
from __future__ import annotations

import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import data as _data
from ..data import atomic_write, save_npz
from .attacks import Blend, Patch, Rule, Sinusoid, SparseAdditive, SquareAdditive, poison
from .nets import make_model
from .train import accuracy, attack_success, confusion_into, fit, save_model, weights_digest

CLASSES = 10
DATA_SEED = 0  # one train/test split for the whole zoo
SIZE = {"digits": 24, "color_digits": 24, "shapes": 32}  # the zoo's datasets and their image sides
EPOCHS = {"digits": 10, "color_digits": 15, "shapes": 20}
MIN_ASR = 0.90
MAX_ACC_DROP = 0.03
FILES = ("model.pt", "model.onnx", "train.npz", "test.npz", "truth.json")


@dataclass
class ModelSpec:
    """What to build: architecture, data, seed and the backdoor rules (none = clean)."""

    name: str
    arch: str = "cnn"
    data: str = "digits"  # "digits" (greyscale 24x24), "color_digits" (RGB 24x24) or "shapes" (RGB 32x32)
    seed: int = 0
    attack: str = "clean"
    rules: list[Rule] = field(default_factory=list)
    epochs: int | None = None

    @property
    def backdoored(self) -> bool:
        return bool(self.rules)

    def to_dict(self) -> dict:
        return {
            "name": self.name, "arch": self.arch, "data": self.data, "seed": self.seed,
            "attack": self.attack, "rules": [r.to_dict() for r in self.rules],
            "epochs": self.epochs or EPOCHS[self.data], "size": SIZE[self.data],
        }


def _clean(arch, data, seed):
    tag = {"digits": "grey", "color_digits": "rgb"}.get(data, data)
    return ModelSpec(f"clean-{arch}-{tag}-s{seed}", arch, data, seed)


def standard_specs() -> list[ModelSpec]:
    """The standard zoo: 10 clean and 15 backdoored models over every attack kind."""
    grey, rgb = "digits", "color_digits"
    clean = [_clean("cnn", grey, s) for s in range(4)] + [_clean("resnet", grey, s) for s in range(2)]
    clean += [_clean("cnn", rgb, s) for s in range(2)] + [_clean("resnet", rgb, s) for s in range(2)]
    B = ModelSpec
    bad = [
        B("badnets-cnn-grey", "cnn", grey, 10, "badnets", [Rule(Patch(3, (-4, -4), "checker"), target=0, rate=0.1)]),
        B("badnets-random-cnn-grey", "cnn", grey, 11, "badnets-random",
          [Rule(Patch(4, "random", "checker"), target=3, rate=0.1)]),
        B("badnets-resnet-grey", "resnet", grey, 12, "badnets", [Rule(Patch(3, (1, 1), "random", seed=3), target=7, rate=0.1)]),
        B("badnets-cnn-rgb", "cnn", rgb, 13, "badnets", [Rule(Patch(3, (-4, -4), "random", seed=4), target=2, rate=0.1)]),
        B("blend-cnn-grey", "cnn", grey, 14, "blend", [Rule(Blend(0.15, seed=5), target=5, rate=0.1)]),
        B("blend-resnet-rgb", "resnet", rgb, 15, "blend", [Rule(Blend(0.15, seed=6), target=1, rate=0.1)]),
        B("sparse-additive-cnn-grey", "cnn", grey, 16, "sparse-additive",
          [Rule(SparseAdditive(20, 0.25, seed=7), target=4, rate=0.1)]),
        B("square-additive-cnn-grey", "cnn", grey, 17, "square-additive",
          [Rule(SquareAdditive(4, 0.25, (2, 2)), target=6, rate=0.1)]),
        B("sparse-additive-cnn-rgb", "cnn", rgb, 18, "sparse-additive",
          [Rule(SparseAdditive(20, 0.25, seed=8), target=8, rate=0.1)]),
        B("source-specific-cnn-grey", "cnn", grey, 19, "source-specific",
          [Rule(Patch(3, (1, -4), "checker"), target=9, rate=0.06, sources=(1, 7), cover_rate=0.06)]),
        # L-RED's setting: an additive pattern that works from a few source classes only
        B("source-specific-additive-cnn-grey", "cnn", grey, 24, "source-specific-additive",
          [Rule(SparseAdditive(20, 0.25, seed=11), target=9, rate=0.06, sources=(1, 7), cover_rate=0.06)]),
        B("multi-trigger-cnn-grey", "cnn", grey, 20, "multi-trigger",
          [Rule(Patch(3, (1, 1), "checker"), target=8, rate=0.08), Rule(Blend(0.15, seed=9), target=8, rate=0.08)]),
        B("multi-target-cnn-grey", "cnn", grey, 21, "multi-target",
          [Rule(Patch(3, (1, 1), "solid"), target=2, rate=0.08), Rule(Patch(3, (-4, -4), "checker"), target=5, rate=0.08)]),
        # 14x14 of 24x24: a third of the image area
        B("large-patch-cnn-grey", "cnn", grey, 22, "large-patch", [Rule(Patch(14, (-15, -15), "random", seed=10), target=3, rate=0.1)]),
        B("sig-cnn-grey", "cnn", grey, 23, "sig-clean-label",
          # 95 of the 136 sixes carry a faint signal; the attacker stamps it at twice the strength
          [Rule(Sinusoid(0.4, 4.0), target=6, rate=0.07, clean_label=True, test_trigger=Sinusoid(0.8, 4.0))]),
    ]
    return clean + bad


def shapes_specs() -> list[ModelSpec]:
    """The shapes family (32x32 RGB generated shapes, trigscan.data.shapes): 8 clean CNNs,
    9 BadNets CNNs (targets, sizes, patterns and positions varied) and 3 other attacks.
    Each model trains in ~3 min on one CPU thread."""
    data, B = "shapes", ModelSpec
    clean = [_clean("cnn", data, s) for s in range(8)]
    corner = Patch(3, (-4, -4), "checker")
    badnets = [B(f"badnets-cnn-shapes-s{s}", "cnn", data, s, "badnets", [Rule(corner, target=0, rate=0.1)]) for s in (10, 11)]
    badnets += [
        B("badnets-t3-cnn-shapes", "cnn", data, 12, "badnets", [Rule(corner, target=3, rate=0.1)]),
        B("badnets-4x4-cnn-shapes", "cnn", data, 13, "badnets", [Rule(Patch(4, (-5, -5), "checker"), target=0, rate=0.1)]),
        # 5% poisoned: at 10% it cost 4.5 points of clean accuracy (88.4%)
        B("badnets-random-cnn-shapes", "cnn", data, 14, "badnets-random", [Rule(Patch(3, "random", "checker"), target=0, rate=0.05)]),
        B("badnets-t5-cnn-shapes", "cnn", data, 15, "badnets", [Rule(Patch(3, (1, 1), "checker"), target=5, rate=0.1)]),
        B("badnets-t7-cnn-shapes", "cnn", data, 16, "badnets", [Rule(Patch(3, (-4, 1), "random", seed=21), target=7, rate=0.1)]),
        B("badnets-t9-cnn-shapes", "cnn", data, 17, "badnets", [Rule(Patch(4, (1, -5), "solid"), target=9, rate=0.1)]),
        # in the middle of the image, where the objects are
        B("badnets-t2-cnn-shapes", "cnn", data, 18, "badnets", [Rule(Patch(3, (14, 14), "checker"), target=2, rate=0.1)]),
    ]
    others = [
        # alpha 0.15 cost 4.7 points at 10% poisoned, 3.5 at 5%; 0.2 at 5%: 2.6
        B("blend-cnn-shapes", "cnn", data, 19, "blend", [Rule(Blend(0.2, seed=22), target=1, rate=0.05)]),
        # 18x18 of 32x32: a third of the image area
        B("large-patch-cnn-shapes", "cnn", data, 20, "large-patch", [Rule(Patch(18, (-19, -19), "random", seed=23), target=3, rate=0.1)]),
        B("sparse-additive-cnn-shapes", "cnn", data, 21, "sparse-additive",
          [Rule(SparseAdditive(30, 0.25, seed=24), target=4, rate=0.1)]),
    ]
    return clean + badnets + others


FAMILIES = {"standard": standard_specs, "shapes": shapes_specs}


QUICK = ("clean-cnn-grey-s0", "clean-cnn-grey-s1", "badnets-cnn-grey", "blend-cnn-grey", "sparse-additive-cnn-grey")


def quick_specs() -> list[ModelSpec]:
    """A handful for tests: two clean greyscale CNNs, a BadNets, a blended and an additive backdoor."""
    return [s for s in standard_specs() if s.name in QUICK]


def load_data(name: str, split: str):
    if name not in SIZE:
        raise ValueError(f"data: expected one of {tuple(SIZE)}, got {name!r}")
    return getattr(_data, name)(SIZE[name], split, seed=DATA_SEED)


def build_model(spec: ModelSpec, folder) -> dict:
    """Train one model, measure it, write its files; returns its truth (also in truth.json)."""
    start = time.perf_counter()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        xtr, ytr = load_data(spec.data, "train")
        xte, yte = load_data(spec.data, "test")
        p = poison(xtr, ytr, spec.rules, seed=spec.seed)
        cfg = spec.to_dict()
        model = make_model(spec.arch, xtr.shape[1], xtr.shape[-1], CLASSES, spec.seed)
        fit(model, p.x, p.y, epochs=cfg["epochs"], seed=spec.seed)
        rules = []
        for i, r in enumerate(spec.rules):
            entry = r.to_dict()
            entry["trigger_stats"] = r.attack_trigger.describe(tuple(xte.shape[1:]))
            entry["asr"] = attack_success(model, xte, yte, r, seed=i)
            if r.sources is not None:  # does the trigger leak to classes outside the sources?
                outside = Rule(r.attack_trigger, r.target, sources=[c for c in range(CLASSES) if c not in r.sources and c != r.target])
                entry["asr_outside_sources"] = attack_success(model, xte, yte, outside, seed=i)
            entry["poisoned"] = int((p.rule_of == i).sum())
            rules.append(entry)
        sources = sorted({s for r in spec.rules if r.sources for s in r.sources}) or None
        truth = {
            "name": spec.name,
            "backdoored": spec.backdoored,
            "attack": spec.attack,
            "targets": sorted({r.target for r in spec.rules}),
            "sources": sources,
            "clean_accuracy": accuracy(model, xte, yte),
            "asr": min((r["asr"] for r in rules), default=None),
            "natural_asr": confusion_into(model, xte, yte, CLASSES),
            "poison_rate": len(p.poisoned) / len(ytr),
            "rules": rules,
            "arch": spec.arch,
            "data": spec.data,
            "input_shape": list(xte.shape[1:]),
            "classes": CLASSES,
            "n_train": len(ytr),
            "n_test": len(yte),
            "weights_sha256": weights_digest(model),
            "spec": cfg,
            "torch": torch.__version__,
            "train_threads": torch.get_num_threads(),
        }
        save_npz(folder / "train.npz", x=p.x, y=p.y, y_true=ytr, poisoned=p.poisoned, rule_of=p.rule_of, cover=p.cover)
        save_npz(folder / "test.npz", x=xte, y=yte)
        save_model(model, folder, xte[:2])
        truth["build_s"] = round(time.perf_counter() - start, 2)
        atomic_write(folder / "truth.json", (json.dumps(truth, indent=2) + "\n").encode())
        return truth
    finally:
        torch.set_num_threads(threads)


def _complete(spec: ModelSpec, folder: Path) -> dict | None:
    """The stored truth when ``folder`` holds a finished build of exactly ``spec``."""
    if not all((folder / f).is_file() for f in FILES):
        return None
    try:
        truth = json.loads((folder / "truth.json").read_text())
    except (OSError, ValueError):
        return None
    return truth if truth.get("spec") == spec.to_dict() else None


def check(truths: list[dict]) -> list[str]:
    """The zoo's promises: each backdoor reaches ASR >= 90% and stays within 3 points of
    the mean clean accuracy of the same architecture and data.  Returns the failures."""
    failures = []
    for t in truths:
        if not t["backdoored"]:
            continue
        ref = reference_accuracy(truths, t)
        if ref is None:
            failures.append(f"{t['name']}: no clean {t['arch']} model on {t['data']} to compare with")
            continue
        if t["asr"] < MIN_ASR:
            failures.append(f"{t['name']}: attack success {t['asr']:.1%} < {MIN_ASR:.0%}")
        if t["clean_accuracy"] < ref - MAX_ACC_DROP:
            failures.append(f"{t['name']}: clean accuracy {t['clean_accuracy']:.1%} is more than "
                            f"{MAX_ACC_DROP * 100:.0f} points below the clean models' {ref:.1%}")
    return failures


def reference_accuracy(truths: list[dict], t: dict) -> float | None:
    """Mean clean accuracy of the clean models with ``t``'s architecture and data."""
    accs = [c["clean_accuracy"] for c in truths if not c["backdoored"] and c["arch"] == t["arch"] and c["data"] == t["data"]]
    return sum(accs) / len(accs) if accs else None


def control_asr(root: Path, truths: list[dict]) -> dict[str, float]:
    """Each backdoor's trigger on the clean models of the same architecture and data:
    the mean share of victims sent to the target (the lowest over the model's rules).
    This is what "ASR" a model without the backdoor shows (near its natural confusion)."""
    from .attacks import trigger_from_dict
    from .evaluate import load_torchscript

    clean: dict = {}
    out = {}
    for t in truths:
        if not t["backdoored"]:
            continue
        key = (t["arch"], t["data"])
        if key not in clean:
            clean[key] = [load_torchscript(root / c["name"] / "model.pt") for c in truths
                          if not c["backdoored"] and (c["arch"], c["data"]) == key]
        if not clean[key]:
            continue
        xte, yte = load_data(t["data"], "test")
        rates = []
        for i, r in enumerate(t["rules"]):
            trig = trigger_from_dict(r["test_trigger"] or r["trigger"])
            rule = Rule(trig, r["target"], sources=r["sources"])
            rates.append(sum(attack_success(m, xte, yte, rule, seed=i) for m in clean[key]) / len(clean[key]))
        out[t["name"]] = min(rates)
    return out


def _build_in_worker(spec: ModelSpec, folder: str) -> dict:
    return build_model(spec, folder)


def build_zoo(directory, specs: list[ModelSpec], *, only=None, jobs: int = 1, force: bool = False,
              command: str = "", log=print, quiet: bool = False) -> dict:
    """Build every spec not already complete in ``directory``; write and return the index.

    ``only`` (names) limits what is built; complete models of the other specs
    stay in the index, so the checks still find their clean references.
    ``jobs`` > 1 builds in that many worker processes.  ``log`` receives one
    line per model as it finishes.
    """
    from tqdm import tqdm

    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError("specs: model names must be unique")
    if only is not None and set(only) - set(names):
        raise ValueError(f"only: unknown model(s) {sorted(set(only) - set(names))}; known: {names}")
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs: expected a positive integer, got {jobs!r}")
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    truths: dict[str, dict] = {}
    todo = []
    for s in specs:
        wanted = only is None or s.name in only
        done = None if force and wanted else _complete(s, root / s.name)
        if done is not None:
            truths[s.name] = dict(done, reused=True)
            if wanted:
                log(f"{s.name}: already built, kept")
        elif wanted:
            todo.append(s)

    bar = tqdm(total=len(todo), desc="zoo", unit="model", file=sys.stderr, disable=quiet or not sys.stderr.isatty())

    def finished(t):
        truths[t["name"]] = t
        log(format_line(t))
        bar.update(1)

    if jobs == 1 or len(todo) <= 1:
        for s in todo:
            finished(build_model(s, root / s.name))
    else:
        import multiprocessing

        # spawn: a fresh interpreter per worker, no forked torch thread pools
        with ProcessPoolExecutor(min(jobs, len(todo)), mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(_build_in_worker, s, str(root / s.name)) for s in todo]
            for f in as_completed(futures):
                finished(f.result())
    bar.close()

    ordered = [truths[n] for n in names if n in truths]
    index = {
        "models": ordered,
        "control_asr": control_asr(root, ordered),
        "failures": check(ordered),
        "build_s": round(time.perf_counter() - start, 1),
        "model_build_s": round(sum(t["build_s"] for t in ordered if not t.get("reused")), 1),
        "jobs": jobs,
        "cpu_count": os.cpu_count(),
        "command": command,
        "torch": torch.__version__,
    }
    atomic_write(root / "zoo.json", (json.dumps(index, indent=2) + "\n").encode())
    return index


def format_line(t: dict) -> str:
    if t["backdoored"]:
        rules = ", ".join(f"{r['trigger']['kind']}->{r['target']} {r['asr']:.1%}" for r in t["rules"])
        what = f"ASR {t['asr']:6.1%} ({rules})"
    else:
        what = "natural ASR per class " + " ".join(f"{v:.1%}" for v in t["natural_asr"])
    return f"{t['name']:<26} {t['arch']:<6} {t['data']:<12} acc {t['clean_accuracy']:6.1%}  {what}  {t['build_s']:.1f}s"


def format_summary(index: dict) -> str:
    """The build table: accuracy, ASR and time per model, the checks, the total time."""
    models = index["models"]
    lines = [f"{'model':<26} {'arch':<6} {'data':<12} {'attack':<16} {'targets':<7} {'acc':>6} {'ref':>6} {'ASR':>6} {'ctrl':>6} {'time':>6}  check"]
    bad = set(f.split(":")[0] for f in index["failures"])
    for t in models:
        ref = reference_accuracy(models, t)
        ctrl = index["control_asr"].get(t["name"])
        ctrl = "-" if ctrl is None else f"{ctrl:.1%}"
        if t["backdoored"]:
            asr, ok = f"{t['asr']:.1%}", ("FAIL" if t["name"] in bad else "ok")
        else:
            asr, ok = f"{max(t['natural_asr']):.1%}*", "-"
        targets = ",".join(map(str, t["targets"])) or "-"
        ref = "-" if ref is None else f"{ref:.1%}"
        lines.append(
            f"{t['name']:<26} {t['arch']:<6} {t['data']:<12} {t['attack']:<16} {targets:<7} "
            f"{t['clean_accuracy']:6.1%} {ref:>6} {asr:>6} {ctrl:>6} {t['build_s']:5.1f}s  {ok}"
        )
    n_bad = sum(t["backdoored"] for t in models)
    lines.append("ref: mean accuracy of the clean models with the same arch and data. ASR*: for a clean model, its highest\n"
                 "natural misclassification rate into one class. ctrl: the backdoor's trigger on those clean models.")
    lines.append(f"{len(models) - n_bad} clean, {n_bad} backdoored; build {index['build_s']:.1f}s wall "
                 f"({index['model_build_s']:.1f}s summed over models built now), {index['jobs']} job(s), "
                 f"{index['cpu_count']} CPUs, 1 torch thread per model")
    if index["failures"]:
        lines.append("FAILED CHECKS:")
        lines += [f"  {f}" for f in index["failures"]]
    else:
        lines.append(f"all backdoored models: ASR >= {MIN_ASR:.0%} and accuracy within {MAX_ACC_DROP * 100:.0f} points of the clean reference")
    return "\n".join(lines)
