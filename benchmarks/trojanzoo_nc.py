"""Neural Cleanse side by side: TrojanZoo's implementation against trigscan's (issue 8).

One command prints both sides, the ratio and the model floor::

    python benchmarks/trojanzoo_nc.py --model /tmp/zoo_std/badnets-cnn-grey --epochs 30 --repeats 2

Run it with trigscan's Python (the system one). TrojanZoo lives in its own
virtual environment, never in trigscan's dependencies::

    python -m venv /opt/tzenv
    /opt/tzenv/bin/pip install torch==2.14.1 torchvision trojanzoo "matplotlib<3.9"

The driver runs every measurement in a fresh subprocess:

- ``--side export`` (trigscan's Python): the scan images,
  ``trigscan.zoo.evaluate.scan_inputs(folder, False, 100, 0)``, written once to
  ``/tmp/tz_data/<model>.npz`` (x float32 [N,1,H,W] in [0, 1], y int64, and the
  sha256 of x) so that TrojanZoo's environment never imports trigscan;
- ``--side trigscan`` (trigscan's Python): ``trigscan.scan(model, x, y,
  method="nc", seed=0, max_steps=E, early_stop_patience=None)``;
- ``--side tz`` (``/opt/tzenv/bin/python``): TrojanZoo's own
  ``trojanvision.defenses.NeuralCleanse.detect()`` on the same TorchScript model
  and the same images, ``defense_remask_epoch=E``;
- ``--side floor`` (both Pythons): the model's own forward + backward (gradient
  to the input, as a scan needs) at batch 32 (and 100, 320), median (and best)
  of many rounds, as ``benchmarks/bench_scanners.py::bench_model_floor``.

Both scans run with ``torch.set_num_threads(--threads)`` (default 2); wall time
is ``time.perf_counter`` and CPU time ``time.process_time`` (user + sys of all
threads of the process), both around the scan call only (imports and model
loading excluded; the whole subprocess is reported too). The driver records
``/proc/loadavg`` before and after every run. Images processed = (epochs run,
summed over the classes) x N images, each one stamped forward + backward once
per epoch; images/s = that / wall time of the scan.

How TrojanZoo is driven (trojanzoo 2.0.3, read from its installed source), and
every adaptation made to run it on our model and data:

1. Dataset: a subclass of ``trojanvision.datasets.ImageSet`` whose
   ``_get_org_dataset`` returns the exported 100 images (with their labels) as
   a ``trojanzoo.utils.data.TensorListDataset`` for both 'train' and 'valid';
   no folder, no ``download`` (nothing is fetched). ``data_shape`` [1, 24, 24],
   ``num_classes`` 10, no normalisation (our models take [0, 1] pixels).
   NC optimises on ``dataset.loader['train']`` (its default): shuffled every
   epoch (TrojanZoo's default for 'train'; seeded through ``torch.manual_seed``),
   ``num_workers=0`` (TrojanZoo's config default).
2. Batch size: 32 (``--tz-batch-size``), equal to trigscan's NC and to the
   official NC code. TrojanZoo's own config default for a dataset it does not
   know is 128, i.e. all 100 images in one batch, one Adam step per epoch
   instead of four; ``--tz-batch-size 128`` runs that.
3. Model: our TorchScript module (``torch.jit.load``, never unpickled), held
   by a one-line ``nn.Module`` wrapper (``forward`` calls it: TrojanZoo calls
   ``requires_grad_`` on the model, which a ScriptModule refuses), passed as
   the ``model=`` instance of ``trojanvision.models.ImageModel`` (its
   ``Model.__init__`` accepts an ``nn.Module`` instance), with
   ``modify_first_layer_channel=False`` (the module has no ``features`` to
   rewrite) and no ``pretrained``/``official`` loading.
4. Attack object: ``BackdoorDefense`` needs an attack; we give it a
   ``trojanvision.attacks.BadNet`` with TrojanZoo's default
   ``trojanvision.marks.Watermark`` (its bundled ``square_white.png``, 3x3 at
   the top-left) and ``target_class`` = the zoo truth's first target (0 for
   clean models), and construct the defense with ``original=True`` so that it
   does not try to load a TrojanZoo attack checkpoint. NC's ``detect()``
   replaces that mark by a full-image zero mark before optimising, so the
   placeholder only affects what ``detect()`` prints as "Jaccard index"
   (overlap with the placeholder, not with our trigger: meaningless here).
5. ``defense_remask_epoch`` = E (``--epochs``); every other NC option at
   TrojanZoo's default (``defense_remask_lr`` 0.1, ``cost`` 1e-3 from the
   start, ``nc_cost_multiplier`` 1.5, ``nc_patience`` 10, ``nc_asr_threshold``
   0.99, ``nc_early_stop_threshold`` 0.99; Adam betas (0.5, 0.9), cosine LR
   schedule over E epochs, ``randn`` initialisation, TrojanZoo's own early
   stop left on). ``folder_path`` = ``/tmp/tz_nc/<model>`` (where ``detect()``
   saves its ``.npz``).
6. Instrumentation only, no change to the algorithm: ``check_early_stop`` and
   ``get_mark_loss_list`` are wrapped on the instance to count the epochs each
   class ran and to keep the masks, losses and ASRs ``detect()`` computes (it
   prints them but returns nothing).
7. Verdict: TrojanZoo's ``detect()`` prints the MAD indices of the mask norms
   (``trojanzoo.utils.metric.normalize_mad``: ``|x - median| / MAD / 1.4826``,
   torch's lower median for an even count) but flags nothing. We apply NC's
   rule to those indices: a class is flagged when its index > 2 and its mask
   norm is below the median. trigscan's verdict is its own (``mad_test``,
   true median).
8. ``trojanvision.environ.create(device='cpu', seed=S)`` sets TrojanZoo's
   environment (CPU, seed), then ``torch.manual_seed(S)`` right before
   ``detect()``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

TZ_PYTHON = "/opt/tzenv/bin/python"
DATA_DIR = Path("/tmp/tz_data")
RESULT = "RESULT "


def loadavg_triplet() -> list[float]:
    return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]


def emit(payload: dict) -> None:
    print(RESULT + json.dumps(payload), flush=True)


def set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


# ---------------------------------------------------------------------------
# sides run in subprocesses
# ---------------------------------------------------------------------------
def side_export(args) -> None:
    import numpy as np

    from trigscan.zoo.evaluate import scan_inputs

    x, y = scan_inputs(Path(args.model), False, args.n_images, 0)
    x = x.float().contiguous().numpy()
    y = y.long().numpy()
    digest = hashlib.sha256(x.tobytes()).hexdigest()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, x=x, y=y, sha256=np.array(digest))
    emit({"side": "export", "path": str(out), "n": int(x.shape[0]), "shape": list(x.shape),
          "sha256": digest})


def side_trigscan(args) -> None:
    import torch

    import trigscan
    from trigscan.zoo.evaluate import load_torchscript, scan_inputs

    set_threads(args.threads)
    folder = Path(args.model)
    model = load_torchscript(folder / "model.pt")
    x, y = scan_inputs(folder, False, args.n_images, 0)
    digest = hashlib.sha256(x.float().contiguous().numpy().tobytes()).hexdigest()
    wall0, cpu0 = time.perf_counter(), time.process_time()
    result = trigscan.scan(model, x, y, method="nc", seed=args.seed, max_steps=args.epochs,
                           early_stop_patience=None, progress=False)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    epochs = [c.steps for c in result.per_class]
    emit({"side": "trigscan", "torch": torch.__version__, "threads": torch.get_num_threads(),
          "trigscan": getattr(trigscan, "__version__", "?"), "sha256": digest, "n": int(x.shape[0]),
          "wall_s": wall, "cpu_s": cpu, "norms": result.statistics, "mad": list(result.anomaly.values),
          "flagged": list(result.targets), "backdoored": result.backdoored,
          "asr": [c.asr for c in result.per_class], "converged": [c.converged for c in result.per_class],
          "epochs": epochs, "images": sum(epochs) * int(x.shape[0]), "batch_size": result.config["batch_size"]})


def side_floor(args) -> None:
    import numpy as np
    import torch

    set_threads(args.threads)
    model = torch.jit.load(str(Path(args.model) / "model.pt"), map_location="cpu").eval()
    for p in model.parameters():
        p.requires_grad_(False)
    data = np.load(args.data)
    images = torch.from_numpy(data["x"])
    out = {}
    for batch_size in args.floor_batches:
        batch = images[torch.arange(batch_size) % images.shape[0]].clone().requires_grad_(True)
        target = torch.zeros(batch_size, dtype=torch.long)

        def step():
            batch.grad = None
            torch.nn.functional.cross_entropy(model(batch), target).backward()

        for _ in range(3):
            step()
        rounds = max(30, 3000 // batch_size)
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        median, best = statistics.median(times), min(times)
        out[str(batch_size)] = {"seconds": median, "images_per_s": batch_size / median, "rounds": rounds,
                                "best_seconds": best, "best_images_per_s": batch_size / best}
    emit({"side": "floor", "python": sys.executable, "torch": torch.__version__,
          "threads": torch.get_num_threads(), "floor": out})


def side_tz(args) -> None:
    import numpy as np
    import torch

    import trojanvision
    import trojanzoo
    import trojanvision.environ
    from trojanvision.attacks import BadNet
    from trojanvision.datasets import ImageSet
    from trojanvision.defenses import NeuralCleanse
    from trojanvision.marks import Watermark
    from trojanvision.models import ImageModel
    from trojanzoo.utils.data import TensorListDataset
    from trojanzoo.utils.metric import normalize_mad

    set_threads(args.threads)
    trojanvision.environ.create(device="cpu", seed=args.seed)
    set_threads(args.threads)
    folder = Path(args.model)
    truth = json.loads((folder / "truth.json").read_text())
    data = np.load(args.data)
    x = torch.from_numpy(data["x"]).float()
    y = torch.from_numpy(data["y"]).long()
    digest = hashlib.sha256(x.contiguous().numpy().tobytes()).hexdigest()
    if digest != str(data["sha256"]):
        raise SystemExit(f"{args.data}: images do not match their recorded sha256")
    n_classes = int(truth["classes"])
    shape = [int(v) for v in x.shape[1:]]

    class ZooImages(ImageSet):
        """Our exported scan images as a TrojanZoo image set (no files, no download)."""
        name = "trigscan_zoo"
        num_classes = n_classes
        data_shape = list(shape)
        valid_set = True

        def _get_org_dataset(self, mode, transform=None, **kwargs):
            return TensorListDataset(x, y.tolist())

    dataset = ZooImages(batch_size=args.tz_batch_size, valid_batch_size=100, num_workers=0)
    class Wrapped(torch.nn.Module):
        """Holds the TorchScript module: TrojanZoo calls requires_grad_ on the
        model, which a ScriptModule refuses (a plain Module sets it on the
        parameters)."""

        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, inputs):
            return self.net(inputs)

    module = Wrapped(torch.jit.load(str(folder / "model.pt"), map_location="cpu")).eval()
    model = ImageModel(name="zoomodel", model=module, dataset=dataset, modify_first_layer_channel=False)
    mark = Watermark(data_shape=shape)
    target = int(truth["targets"][0]) if truth.get("targets") else 0
    attack = BadNet(mark=mark, dataset=dataset, model=model, target_class=target)
    out_dir = Path("/tmp/tz_nc") / folder.name
    defense = NeuralCleanse(attack=attack, original=True, dataset=dataset, model=model,
                            folder_path=str(out_dir), defense_remask_epoch=args.epochs)

    # instrumentation only: count the epochs of every class, keep detect()'s lists
    epochs: list[int] = []
    kept: dict = {}
    check = defense.check_early_stop
    marks = defense.get_mark_loss_list
    optimize = defense.optimize_mark

    def counted_check(*a, **k):
        epochs[-1] += 1
        return check(*a, **k)

    def counted_optimize(*a, **k):
        epochs.append(0)
        return optimize(*a, **k)

    def keep_lists(*a, **k):
        kept["lists"] = marks(*a, **k)
        return kept["lists"]

    defense.check_early_stop = counted_check
    defense.optimize_mark = counted_optimize
    defense.get_mark_loss_list = keep_lists

    torch.manual_seed(args.seed)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    defense.detect()
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    mark_list, loss_list, asr_list = kept["lists"]
    norms = mark_list[:, -1].flatten(start_dim=1).norm(p=1, dim=1)
    mad = normalize_mad(norms)
    median = norms.median()
    flagged = [i for i in range(len(norms)) if float(mad[i]) > 2 and float(norms[i]) < float(median)]
    import torchvision
    emit({"side": "tz", "torch": torch.__version__, "torchvision": torchvision.__version__,
          "trojanzoo": getattr(trojanzoo, "__version__", "?"), "threads": torch.get_num_threads(),
          "sha256": digest, "n": int(x.shape[0]), "wall_s": wall, "cpu_s": cpu,
          "norms": norms.tolist(), "mad": mad.tolist(), "flagged": flagged, "backdoored": bool(flagged),
          "asr": [float(a) for a in asr_list], "loss": [float(v) for v in loss_list],
          "epochs": epochs, "images": sum(epochs) * int(x.shape[0]), "batch_size": args.tz_batch_size})


# ---------------------------------------------------------------------------
# the driver
# ---------------------------------------------------------------------------
def trigscan_python(args) -> str:
    if args.trigscan_python:
        return args.trigscan_python
    try:
        import trigscan  # noqa: F401

        return sys.executable
    except ImportError:
        found = shutil.which("python3") or shutil.which("python")
        if not found:
            raise SystemExit("give --trigscan-python (an interpreter that imports trigscan)")
        return found


def run(python: str, side: str, args, extra: list[str], log: Path) -> dict:
    cmd = [python, os.path.abspath(__file__), "--side", side, "--model", args.model,
           "--epochs", str(args.epochs), "--threads", str(args.threads), "--seed", str(args.seed),
           "--n-images", str(args.n_images), "--tz-batch-size", str(args.tz_batch_size), *extra]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONUNBUFFERED="1")
    before = loadavg_triplet()
    wall0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - wall0
    after = loadavg_triplet()
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(f"$ {' '.join(cmd)}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    if proc.returncode != 0:
        raise SystemExit(f"{side} failed (exit {proc.returncode}); see {log}\n{proc.stderr[-3000:]}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT)]
    if not lines:
        raise SystemExit(f"{side}: no result line; see {log}")
    result = json.loads(lines[-1][len(RESULT):])
    result.update(loadavg_before=before, loadavg_after=after, process_wall_s=wall, log=str(log))
    return result


def fmt(values, spec="6.1f") -> str:
    return "[" + " ".join(format(v, spec) for v in values) + "]"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--side", choices=["driver", "export", "trigscan", "tz", "floor"], default="driver")
    p.add_argument("--model", default="/tmp/zoo_std/badnets-cnn-grey", help="a zoo model folder")
    p.add_argument("--epochs", type=int, default=30, help="NC epochs (steps), equal for both sides")
    p.add_argument("--repeats", type=int, default=2, help="timed runs of each side (driver)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-images", type=int, default=100)
    p.add_argument("--tz-batch-size", type=int, default=32, help="TrojanZoo's loader batch size")
    p.add_argument("--tz-python", default=TZ_PYTHON)
    p.add_argument("--trigscan-python", default=None, help="default: this interpreter if it imports trigscan")
    p.add_argument("--floor-batches", type=int, nargs="+", default=[32, 100, 320])
    p.add_argument("--no-floor", action="store_true", help="driver: skip the model-floor measurement")
    p.add_argument("--data", default=None, help="exported images (.npz); default /tmp/tz_data/<model>.npz")
    p.add_argument("--out", default=None, help="export: where to write the .npz")
    p.add_argument("--json", default=None, help="driver: write every result to this file")
    args = p.parse_args(argv)
    name = Path(args.model).name
    args.data = args.data or str(DATA_DIR / f"{name}.npz")
    if args.side == "export":
        args.out = args.out or args.data
        return side_export(args)
    if args.side == "trigscan":
        return side_trigscan(args)
    if args.side == "tz":
        return side_tz(args)
    if args.side == "floor":
        return side_floor(args)

    ts_py = trigscan_python(args)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    logs = Path("/tmp/tz_runs") / f"{name}-{stamp}"
    exported = run(ts_py, "export", args, ["--out", args.data], logs / "export.log")
    print(f"images: {exported['path']} n={exported['n']} sha256={exported['sha256'][:16]}")
    runs = {"trigscan": [], "tz": []}
    for r in range(args.repeats):
        for side, python in (("trigscan", ts_py), ("tz", args.tz_python)):
            res = run(python, side, args, ["--data", args.data], logs / f"{side}-{r}.log")
            if res["sha256"] != exported["sha256"]:
                raise SystemExit(f"{side}: scanned other images than the export")
            runs[side].append(res)
            print(f"run {r} {side:8s}: wall {res['wall_s']:7.1f} s  cpu {res['cpu_s']:7.1f} s  "
                  f"epochs {sum(res['epochs'])}  {res['images'] / res['wall_s']:7.0f} images/s  "
                  f"flagged {res['flagged']}  load {res['loadavg_before']} -> {res['loadavg_after']}",
                  flush=True)
    floors = {}
    if not args.no_floor:
        for side, python in (("trigscan", ts_py), ("tz", args.tz_python)):
            floors[side] = run(python, "floor", args, ["--data", args.data], logs / f"floor-{side}.log")
    print()
    print(f"model {args.model}  epochs {args.epochs}  images {exported['n']}  threads {args.threads}")
    for side in ("trigscan", "tz"):
        last = runs[side][-1]
        label = "trigscan NC" if side == "trigscan" else f"TrojanZoo NC (batch {args.tz_batch_size})"
        print(f"\n{label}")
        print(f"  wall s   : {fmt([r['wall_s'] for r in runs[side]])}   cpu s: {fmt([r['cpu_s'] for r in runs[side]])}")
        print(f"  norms    : {fmt(last['norms'])}")
        print(f"  MAD index: {fmt(last['mad'], '6.2f')}")
        print(f"  flagged  : {last['flagged']}  epochs per class {last['epochs']}")
        same = all(r["flagged"] == last["flagged"] for r in runs[side])
        print(f"  same verdict in all runs: {same}")
    wall_ratio = [t["wall_s"] / s["wall_s"] for s, t in zip(runs["trigscan"], runs["tz"])]
    cpu_ratio = [t["cpu_s"] / s["cpu_s"] for s, t in zip(runs["trigscan"], runs["tz"])]
    print(f"\nTrojanZoo / trigscan, back-to-back pairs: wall {fmt(wall_ratio, '5.2f')}  cpu {fmt(cpu_ratio, '5.2f')}")
    if floors:
        for side, fl in floors.items():
            cells = "  ".join(f"batch {b}: {v['images_per_s']:.0f} (best round {v['best_images_per_s']:.0f})"
                              for b, v in fl["floor"].items())
            print(f"model floor ({side} env, torch {fl['torch']}), images/s, median of rounds: {cells}  "
                  f"load {fl['loadavg_before']} -> {fl['loadavg_after']}")
        floor32 = floors["trigscan"]["floor"].get("32", {}).get("images_per_s")
        if floor32:
            for side in ("trigscan", "tz"):
                ips = [r["images"] / r["wall_s"] for r in runs[side]]
                print(f"{side:8s} images/s {fmt(ips, '7.0f')} = {fmt([100 * v / floor32 for v in ips], '5.0f')} % "
                      "of the batch-32 floor")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "export": exported, "runs": runs,
                                               "floors": floors}, indent=1))
        print(f"results: {args.json}")
    print(f"logs: {logs}")


if __name__ == "__main__":
    main()
