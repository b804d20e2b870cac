"""Train the zoo's cnn on a shapes variant: clean seeds and one BadNets model.

usage: python train.py VARIANT [--ntr N] [--epochs E] [--tag TAG] [clean-s0 clean-s1 badnets ...]
writes models/VARIANT[TAG]/NAME/{model.pt, test.npz, truth.json}
--ntr / --epochs override the variant's training images per class / epochs (TAG defaults to _n{N}_e{E} then).
"""
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

torch.set_num_threads(1)
from trigscan.data import save_npz  # noqa: E402
from trigscan.zoo.attacks import Patch, Rule, poison  # noqa: E402
from trigscan.zoo.nets import make_model  # noqa: E402
from trigscan.zoo.train import accuracy, attack_success, confusion_into, fit, torchscript_bytes  # noqa: E402

import shapes  # noqa: E402

# name -> (size, channels, n_train_per_class, epochs, generator params)
VARIANTS = {
    "grey24": (24, 1, 500, 10, {}),
    "rgb32": (32, 3, 500, 15, {"photos": True}),
    "grey24-hard": (24, 1, 500, 10, {"photos": True, "clutter": 3, "radius": (0.18, 0.40), "contrast": (0.15, 0.55),
                                      "noise_sigma": (0.0, 0.08)}),
    "grey24-hard-big": (24, 1, 1500, 10, {"photos": True, "clutter": 3, "radius": (0.18, 0.40), "contrast": (0.15, 0.55),
                                          "noise_sigma": (0.0, 0.08)}),
    "grey32": (32, 1, 500, 10, {"photos": True}),
    "grey24-hex": (24, 1, 500, 10, {"classes": "mixed-hex"}),
    "solid24": (24, 1, 500, 10, {"classes": "solid", "photos": True}),
    "solid32": (32, 1, 500, 10, {"classes": "solid", "photos": True}),
    "grey32-hex": (32, 1, 500, 10, {"classes": "mixed-hex", "photos": True}),
    "rgb32-hex": (32, 3, 1500, 20, {"classes": "mixed-hex", "photos": True}),
}
RULE = Rule(Patch(3, (-4, -4), "checker"), target=0, rate=0.1)
# name -> (seed, rule or None)
MODELS = {"clean-s0": (0, None), "clean-s1": (1, None), "clean-s2": (2, None), "clean-s3": (3, None),
          "clean-s4": (4, None), "clean-s5": (5, None), "clean-s6": (6, None), "clean-s7": (7, None),
          "badnets": (10, RULE), "badnets-s10": (10, RULE), "badnets-s11": (11, RULE),
          "badnets-t3": (12, Rule(Patch(3, (-4, -4), "checker"), target=3, rate=0.1)),
          "badnets-4x4": (13, Rule(Patch(4, (-5, -5), "checker"), target=0, rate=0.1)),
          "badnets-rand": (14, Rule(Patch(3, "random", "checker"), target=0, rate=0.1)),
          **{f"badnets-s{seed}": (seed, RULE) for seed in range(15, 19)}}


def main(variant, names, ntr=None, epochs=None, tag=None):
    size, C, ntr0, epochs0, params = VARIANTS[variant]
    if tag is None:
        tag = f"_n{ntr}_e{epochs}" if (ntr or epochs) else ""
    ntr, epochs = ntr or ntr0, epochs or epochs0
    t = time.perf_counter()
    xtr, ytr = shapes.make(ntr, "train", size, C, 0, **params)
    xte, yte = shapes.make(100, "test", size, C, 0, **params)
    gen_s = time.perf_counter() - t
    print(f"{variant}: data {tuple(xtr.shape)} / {tuple(xte.shape)} in {gen_s:.1f}s", flush=True)
    root = Path("models") / (variant + tag)
    root.mkdir(parents=True, exist_ok=True)
    shapes.contact_sheet(xte, yte, root.parent / f"sheet_{variant}.png")
    for name in names:
        seed, rule = MODELS[name]
        bad = rule is not None
        t, tc = time.perf_counter(), time.process_time()
        rules = [rule] if bad else []
        p = poison(xtr, ytr, rules, seed=seed)
        model = make_model("cnn", C, size, 10, seed)
        fit(model, p.x, p.y, epochs=epochs, seed=seed)
        truth = {
            "variant": variant, "name": name, "seed": seed, "backdoored": bad, "size": size, "channels": C,
            "n_train": len(ytr), "n_test": len(yte), "epochs": epochs, "params": {k: v for k, v in params.items()},
            "clean_accuracy": accuracy(model, xte, yte),
            "train_accuracy_clean_images": accuracy(model, xtr, ytr),
            "patch_asr": attack_success(model, xte, yte, RULE, seed=0),  # Patch(3,(-4,-4)) -> 0: ASR or control
            "rule": rule.to_dict() if bad else None,
            "asr": attack_success(model, xte, yte, rule, seed=0) if bad else None,  # the model's own trigger
            "natural_asr": confusion_into(model, xte, yte, 10),
            "poisoned": int(len(p.poisoned)),
            "data_gen_s": round(gen_s, 2),
            "train_s": round(time.perf_counter() - t, 1),  # wall (includes any time the process was stopped)
            "train_cpu_s": round(time.process_time() - tc, 1),  # CPU time (1 thread), incl. the evaluations above
        }
        f = root / name
        f.mkdir(parents=True, exist_ok=True)
        (f / "model.pt").write_bytes(torchscript_bytes(model))
        save_npz(f / "test.npz", x=xte.numpy(), y=yte.numpy())
        (f / "truth.json").write_text(json.dumps(truth, indent=1) + "\n")
        print(f"  {name}: acc {truth['clean_accuracy']:.1%} (train {truth['train_accuracy_clean_images']:.1%}) "
              f"patch->0 {truth['patch_asr']:.1%} ASR {truth['asr']} max natural {max(truth['natural_asr']):.1%} {truth['train_s']}s wall, {truth['train_cpu_s']}s cpu", flush=True)


if __name__ == "__main__":
    a = sys.argv[1:]
    opts = {}
    while len(a) > 1 and a[1].startswith("--"):
        k, v = a.pop(1)[2:], a.pop(1)
        opts[k] = v if k == "tag" else int(v)
    main(a[0], a[1:] or ["clean-s0", "clean-s1", "badnets"], **opts)
