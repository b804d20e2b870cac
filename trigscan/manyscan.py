"""``trigscan scan-many``: many models x methods, one task each, in-process or on Ray.

A task is one model scanned with one method (optionally with only one group of
its candidate classes); it is one :func:`trigscan.runner.run_scan` call writing
its own ``trigscan scan`` folder, so its result is what ``trigscan scan`` gives.
Every task runs with the same number of torch threads wherever it runs, so a
task's result does not depend on whether it ran in-process or on a Ray worker.

MANIFEST is a JSON file (or a built zoo folder, see :func:`zoo_entries`)::

    {"defaults": {"methods": ["nc"], "options": {"nc": {"max_steps": 200}}},
     "models": [{"name": "m1", "model": "m1/model.pt", "data": "m1/test.npz",
                 "truth": {"backdoored": true, "targets": [3]}}, ...]}

(a bare list of entries is accepted too). Entry keys: ``name`` (default: the
model file's stem), ``model`` (TorchScript/ONNX path, or package.module:factory
with ``weights``), ``onnx`` (used instead of ``model`` by black-box methods),
``data``, ``train_data`` (used instead of ``data`` by methods that read the
labelled training set), ``methods``, ``seed``, ``classes``, ``num_classes``
(needed to split classes into groups when ``classes`` is not given),
``options`` ({method: {key: value}}), ``normalize``, ``budget``, ``truth``
({backdoored, targets}: the summary then scores the verdicts as ``trigscan zoo
eval`` does). Relative paths are relative to the manifest's folder. A value in
an entry wins over the command line, which wins over the manifest's defaults.

The output folder DIR::

    plan.json                        the tasks of the last run (what the summary covers)
    tasks/<model>/<method>/          one ``trigscan scan`` folder per task
        task.json                    the task, written when it starts
        done.json                    written after report.json: the task is finished
        error.json                   the task failed; a re-run tries it again
    tasks/<model>/<method>.groups<K>/group<k>/  with K class groups: one scan folder
                                     per group, and the merged result in
                                     tasks/<model>/<method>.groups<K>/report.json
    summary.json, summary.csv, summary.txt

Fault tolerance: each task's result is on disk as soon as it finishes and a
re-run skips finished tasks (same settings) and rebuilds the summary from the
folders, so killing the driver loses only the tasks in flight; those resume
from their scan checkpoint. On Ray, a task whose worker process dies is retried
(``retries`` times) on another worker.
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import time
import traceback
from pathlib import Path
from typing import Callable

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
ENTRY_KEYS = {"name", "model", "weights", "onnx", "data", "train_data", "methods", "seed", "classes",
              "num_classes", "options", "normalize", "budget", "truth"}
# what a task's result depends on: a finished task with other values is stale
IDENTITY_KEYS = ("model", "weights", "data", "method", "seed", "classes", "options", "normalize", "budget",
                 "device", "threads")


def _write_json(path: Path, value) -> None:
    from .data import atomic_write

    atomic_write(path, (json.dumps(value, indent=2, default=str) + "\n").encode())


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------
# The manifest
# ---------------------------------------------------------------------------
def _is_factory(spec: str) -> bool:
    from .runner import _FACTORY

    return bool(_FACTORY.match(spec)) and not Path(spec).exists()


def _resolve(value, base: Path):
    if value is None:
        return None
    path = Path(str(value)).expanduser()
    return str(path if path.is_absolute() else (base / path).resolve())


def load_manifest(path) -> tuple[list[dict], dict]:
    """(entries, defaults) of a JSON manifest, with paths made absolute."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"MANIFEST: {path} is a folder without a built zoo (no */truth.json); "
                         "give a JSON manifest or a zoo folder")
    if not path.is_file():
        raise ValueError(f"MANIFEST: no such file {path}")
    try:
        doc = json.loads(path.read_text())
    except ValueError as exc:
        raise ValueError(f"MANIFEST: {path} is not valid JSON ({exc})") from None
    defaults: dict = {}
    if isinstance(doc, dict):
        unknown = set(doc) - {"models", "defaults"}
        if unknown or "models" not in doc:
            raise ValueError(f"MANIFEST: {path}: expected keys 'models' (a list) and optionally 'defaults', "
                             f"got {sorted(doc)}")
        defaults, doc = doc.get("defaults") or {}, doc["models"]
        if not isinstance(defaults, dict) or {"name", "model"} & set(defaults) or set(defaults) - ENTRY_KEYS:
            raise ValueError(f"MANIFEST: {path}: 'defaults' must be an object with entry keys other than "
                             f"name and model ({', '.join(sorted(ENTRY_KEYS - {'name', 'model'}))})")
    if not isinstance(doc, list) or not doc:
        raise ValueError(f"MANIFEST: {path}: 'models' must be a non-empty list of entries")
    base = path.resolve().parent
    entries = []
    for i, raw in enumerate(doc):
        where = f"MANIFEST {path} entry {i}"
        if not isinstance(raw, dict) or "model" not in raw:
            raise ValueError(f"{where}: expected an object with at least 'model', got {raw!r}")
        unknown = set(raw) - ENTRY_KEYS
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {sorted(unknown)} (known: {', '.join(sorted(ENTRY_KEYS))})")
        entry = dict(raw)
        model = str(entry["model"])
        entry["model"] = model if _is_factory(model) else _resolve(model, base)
        for key in ("weights", "onnx", "data", "train_data"):
            if key in entry:
                entry[key] = _resolve(entry[key], base)
        entry.setdefault("name", Path(model).stem)
        entries.append(entry)
    for key in ("data", "train_data", "weights", "onnx"):
        if key in defaults:
            defaults[key] = _resolve(defaults[key], base)
    return entries, defaults


def zoo_entries(zoo_dir, data_dir, *, n_images: int = 100, seed: int = 0) -> list[dict]:
    """Manifest entries for a built zoo, scanned as ``trigscan zoo eval`` scans it:
    the same class-balanced subset of each model's clean test images (written
    to `data_dir`), the training set for methods that read it, the ONNX
    file for black-box methods, and the truth for scoring."""
    from .data import save_npz
    from .zoo.evaluate import scan_inputs, zoo_models

    if isinstance(n_images, bool) or not isinstance(n_images, int) or n_images < 1:
        raise ValueError(f"--images: expected a positive integer, got {n_images!r}")
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    for folder, truth in zoo_models(zoo_dir):
        subset = data_dir / f"{truth['name']}-test{n_images}-seed{seed}.npz"
        x, y = scan_inputs(folder, False, n_images, seed)
        save_npz(subset, x=x, y=y)  # same arrays, same bytes: rewriting is harmless, and follows a rebuilt zoo
        entries.append({"name": truth["name"], "model": str(folder / "model.pt"), "onnx": str(folder / "model.onnx"),
                        "data": str(subset), "train_data": str(folder / "train.npz"), "seed": seed,
                        "num_classes": truth.get("classes"),
                        "truth": {"backdoored": truth["backdoored"], "targets": truth["targets"],
                                  "attack": truth.get("attack")}})
    return entries


# ---------------------------------------------------------------------------
# Tasks
# ---------------------------------------------------------------------------
def _split(classes: list[int], groups: int, where: str) -> list[list[int]]:
    if len(classes) < 2 * groups:
        raise ValueError(f"--class-groups {groups}: {where} has {len(classes)} candidate classes; "
                         "every group needs at least 2")
    size, extra = divmod(len(classes), groups)
    out, start = [], 0
    for k in range(groups):
        stop = start + size + (k < extra)
        out.append(classes[start:stop])
        start = stop
    return out


def _unsplittable(cls, options: dict) -> str | None:
    """Why a method's scan cannot be split into class groups (None: it can).
    A split needs rows that are single candidate classes, each optimised
    independently of the others, and a verdict over the rows alone: the
    trigger-optimiser driver as it is (NC, TABOR, PixelBackdoor universal)."""
    from .scanners.base import TriggerOptimizer

    if not issubclass(cls, TriggerOptimizer):
        return "its classes are not independent rows of the trigger optimiser"
    if cls._scan is not TriggerOptimizer._scan:
        return "it adds its own steps around the optimiser (rows depend on the whole class set)"
    if getattr(cls(**options).config, "mode", "universal") != "universal":
        return "in pair mode its rows are (source, target) pairs, and a split would lose the pairs across groups"
    return None


def plan_tasks(entries: list[dict], *, defaults: dict | None = None, methods=None, options=None, seed=None,
               class_groups: int | None = None, device: str = "cpu", threads: int = 1) -> list[dict]:
    """The tasks (plain dicts) of a run, one per (entry, method[, class group]).

    methods / options / seed come from the command line (None: not given);
    options: {method: {key: value}} or the CLI's KEY=VALUE strings.
    """
    from . import scanners
    from .runner import resolve_options

    defaults = dict(defaults or {})
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"--cpus-per-task: expected an integer >= 1, got {threads!r}")
    if class_groups is not None and (isinstance(class_groups, bool) or not isinstance(class_groups, int)
                                     or class_groups < 2):
        raise ValueError(f"--class-groups: expected an integer >= 2, got {class_groups!r}")
    names = [e["name"] for e in entries]
    for name in names:
        if not _NAME.match(str(name)):
            raise ValueError(f"MANIFEST: model name {name!r}: use letters, digits, '.', '_' and '-' only")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"MANIFEST: model names must be unique; repeated: {', '.join(repeated)}")
    tasks = []
    for entry in entries:
        name = entry["name"]

        def value(key, cli=None, fallback=None):
            if key in entry:
                return entry[key]
            if cli is not None:
                return cli
            return defaults.get(key, fallback)

        chosen = [str(m).lower() for m in (value("methods", methods) or [])]
        if not chosen:
            raise ValueError(f"--method: no method for model {name!r} (give --method, or 'methods' in the manifest)")
        merged: dict[str, dict] = {m: {} for m in chosen}
        for layer in (defaults.get("options"), options, entry.get("options")):
            if not layer:
                continue
            if not isinstance(layer, dict):  # the CLI's KEY=VALUE strings
                layer = resolve_options(chosen, layer)
            for m, opts in layer.items():
                if m not in merged:
                    raise ValueError(f"options for model {name!r}: method {m!r} is not among its methods {chosen}")
                merged[m].update(opts)
        merged = resolve_options(chosen, merged)  # type-checked against each method's Config
        run_seed = value("seed", seed, 0)
        classes = value("classes")
        for method in chosen:
            cls = scanners.get(method)
            black = getattr(cls, "access", "white") == "black"
            training = scanners.scan_data(cls) == "training"
            model = (value("onnx") if black else None) or value("model")
            data = (value("train_data") if training else None) or value("data")
            task_device = "cpu" if str(model).lower().endswith(".onnx") else device
            task = {"id": f"{name}/{method}", "name": name, "method": method, "model": model,
                    "weights": value("weights"), "data": data, "seed": run_seed, "classes": classes,
                    "options": merged[method], "normalize": value("normalize"), "budget": value("budget"),
                    "device": task_device, "threads": threads, "truth": value("truth"),
                    "group": None, "groups": None}
            if not class_groups:
                tasks.append(task)
                continue
            why = _unsplittable(cls, merged[method])
            if why:
                raise ValueError(f"--class-groups: method {method!r} cannot be split by classes: {why}")
            candidates = classes if classes is not None else value("num_classes")
            if candidates is None:
                raise ValueError(f"--class-groups: model {name!r} needs 'classes' or 'num_classes' in the manifest")
            candidates = list(range(candidates)) if isinstance(candidates, int) else [int(c) for c in candidates]
            for k, group in enumerate(_split(candidates, class_groups, f"model {name!r}")):
                tasks.append({**task, "id": f"{name}/{method}.groups{class_groups}/group{k}", "classes": group,
                              "group": k, "groups": class_groups})
    return tasks


def identity(task: dict) -> dict:
    return {k: task[k] for k in IDENTITY_KEYS}


def task_dir(root, task: dict) -> Path:
    return Path(root) / "tasks" / task["id"]


def finished(root, task: dict) -> bool:
    folder = task_dir(root, task)
    done = _read_json(folder / "done.json")
    return done is not None and done == json.loads(json.dumps(identity(task))) and (folder / "report.json").is_file()


def run_task(task: dict, root: str, scan_fn: Callable | None = None) -> dict:
    """Run one task (here or on a Ray worker); returns its summary row.

    A finished task (same settings) is not run again. A folder left by a
    killed attempt of the same task is resumed (run_scan's checkpoints); one
    left by other settings is cleared first.
    """
    import torch

    if scan_fn is None:
        from .runner import run_scan as scan_fn
    folder = task_dir(root, task)
    if finished(root, task):
        return task_row(root, task)
    started = _read_json(folder / "task.json")
    if started is not None and identity(started) != json.loads(json.dumps(identity(task))):
        shutil.rmtree(folder)  # a stale result of other settings, never mixed in
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "error.json").unlink(missing_ok=True)
    _write_json(folder / "task.json", task)
    threads = torch.get_num_threads()
    torch.set_num_threads(task["threads"])
    t0 = time.perf_counter()
    try:
        scan_fn(task["model"], task["data"], [task["method"]], folder, weights=task["weights"], seed=task["seed"],
                classes=task["classes"], device=task["device"], budget=task["budget"],
                normalize=task["normalize"], options={task["method"]: task["options"]}, progress=False)
    except Exception as exc:  # recorded and reported; the other tasks go on
        _write_json(folder / "error.json", {"error": f"{type(exc).__name__}: {exc}",
                                            "traceback": traceback.format_exc(),
                                            "elapsed_s": time.perf_counter() - t0})
        return task_row(root, task)
    finally:
        torch.set_num_threads(threads)
    _write_json(folder / "done.json", identity(task))
    return task_row(root, task)


def task_row(root, task: dict) -> dict:
    """A task's state as found on disk: done (with its verdict), error or missing."""
    folder = task_dir(root, task)
    row = {"id": task["id"], "status": "missing", "backdoored": None, "targets": [], "elapsed_s": None,
           "error": None}
    if finished(root, task):
        report = _read_json(folder / "report.json")
        result = report["results"][0]
        row.update(status="done", backdoored=bool(result["backdoored"]), targets=list(result["targets"]),
                   elapsed_s=result.get("elapsed_s"))
    elif (folder / "error.json").is_file():
        err = _read_json(folder / "error.json") or {}
        row.update(status="error", error=err.get("error", "unreadable error.json"))
    return row


def record_failure(root, task: dict, message: str) -> dict:
    """Note a task that failed outside run_task (its worker died on every attempt)."""
    folder = task_dir(root, task)
    folder.mkdir(parents=True, exist_ok=True)
    _write_json(folder / "error.json", {"error": message})
    return task_row(root, task)


# ---------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------
def _run_inprocess(tasks, root, scan_fn, report):
    for task in tasks:
        report(task, run_task(task, str(root), scan_fn))


def _ray_init(address: str, workers: int | None):
    try:
        import ray
    except ImportError:
        raise ValueError("--ray: Ray is not installed; pip install 'trigscan[ray]'") from None
    if ray.is_initialized():
        return ray, False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import logging

    if address == "local":
        ray.init(num_cpus=workers, include_dashboard=False, object_store_memory=100 * 1024 ** 2,
                 _node_ip_address="127.0.0.1", logging_level=logging.WARNING)
    else:
        if workers is not None:
            raise ValueError("--workers: only for --ray local (a cluster has the CPUs its nodes bring)")
        ray.init(address=address, logging_level=logging.WARNING)
    return ray, True


def choose_device(device: str, gpus: float, gpus_per_task: float | None) -> tuple[str, float]:
    """(device, GPUs per task) from --device, the GPUs there are (the Ray
    cluster's, or this machine's in-process) and --gpus-per-task."""
    if device == "auto":
        device = "cuda" if gpus > 0 else "cpu"
    if device == "cuda" and gpus <= 0:
        raise ValueError("--device cuda: no GPU in the Ray cluster (or on this machine in-process)")
    if gpus_per_task is None:
        gpus_per_task = 1.0 if device == "cuda" else 0.0
    if device == "cuda" and not gpus_per_task > 0:
        raise ValueError(f"--gpus-per-task: CUDA tasks need a GPU share > 0, got {gpus_per_task!r}")
    return device, float(gpus_per_task)


def task_resources(task: dict, gpus_per_task: float) -> dict:
    """What a task asks Ray for: its threads as CPUs, and GPUs when it runs on CUDA."""
    return {"num_cpus": task["threads"], "num_gpus": gpus_per_task if str(task["device"]).startswith("cuda") else 0}


def _run_ray(ray, tasks, root, scan_fn, report, *, gpus_per_task, retries):
    remote = ray.remote(run_task)
    refs = {}
    for task in tasks:
        ref = remote.options(**task_resources(task, gpus_per_task), max_retries=retries,
                             retry_exceptions=False, name=task["id"]).remote(task, str(root), scan_fn)
        refs[ref] = task
    while refs:
        ready, _ = ray.wait(list(refs), num_returns=1)
        for ref in ready:
            task = refs.pop(ref)
            try:
                row = ray.get(ref)
            except ray.exceptions.RayError as exc:  # the worker died on every attempt
                first = (str(exc).strip().splitlines() or [""])[0]
                row = record_failure(root, task, f"{type(exc).__name__} after {retries + 1} attempt(s): {first}")
            report(task, row)


def scan_many(entries: list[dict], out, *, defaults: dict | None = None, methods=None, options=None, seed=None,
              ray: str | None = None, workers: int | None = None, cpus_per_task: int = 1,
              gpus_per_task: float | None = None, device: str = "auto", class_groups: int | None = None,
              retries: int = 3, scan_fn: Callable | None = None, source: str | None = None,
              log: Callable[[str], None] = print) -> dict:
    """Scan every (entry, method) as one task, in-process (`ray` None) or on Ray
    (`ray` "local" or a cluster address; an already initialised Ray is used as is).

    device "auto": CUDA when GPUs are there (each task then asks for
    `gpus_per_task` GPUs, default 1), else the CPU. Each task asks for
    `cpus_per_task` CPUs and runs that many torch threads. Returns the summary
    (also written to OUT/summary.json, .csv and .txt).
    """
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"--device: expected auto, cpu or cuda, got {device!r}")
    if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
        raise ValueError(f"--retries: expected an integer >= 0, got {retries!r}")
    if workers is not None and (not isinstance(workers, int) or isinstance(workers, bool) or workers < 1):
        raise ValueError(f"--workers: expected an integer >= 1, got {workers!r}")
    if workers is not None and ray is None:
        raise ValueError("--workers: only with --ray local (in-process runs one task at a time)")
    root = Path(out)
    start = time.perf_counter()
    plan_tasks(entries, defaults=defaults, methods=methods, options=options, seed=seed,  # bad input fails
               class_groups=class_groups, device="cpu", threads=cpus_per_task)  # before Ray starts
    ray_mod, started = _ray_init(ray, workers) if ray is not None else (None, False)
    try:
        gpus = 0.0
        if device != "cpu":
            import torch

            gpus = ray_mod.cluster_resources().get("GPU", 0) if ray_mod else torch.cuda.device_count()
        device, gpus_per_task = choose_device(device, gpus, gpus_per_task)
        tasks = plan_tasks(entries, defaults=defaults, methods=methods, options=options, seed=seed,
                           class_groups=class_groups, device=device, threads=cpus_per_task)
        root.mkdir(parents=True, exist_ok=True)
        _write_json(root / "plan.json", {"source": source, "tasks": tasks})
        todo = [t for t in tasks if not finished(root, t)]
        log(f"scan-many: {len(tasks)} task(s), {len(tasks) - len(todo)} already finished, {len(todo)} to run "
            f"({'in-process' if ray is None else 'Ray ' + ray}, {cpus_per_task} CPU(s)"
            f"{f', {gpus_per_task:g} GPU(s)' if device == 'cuda' else ''} per task)")
        count = [0]

        def report(task, row):
            count[0] += 1
            if row["status"] == "done":
                what = ("backdoored -> " + ",".join(map(str, row["targets"]))) if row["backdoored"] else "clean"
                what += f" ({row['elapsed_s']:.1f}s)" if row["elapsed_s"] is not None else ""
            else:
                what = f"{row['status'].upper()}: {row['error']}"
            log(f"[{count[0]}/{len(todo)}] {task['id']}: {what}")

        if ray is None:
            _run_inprocess(todo, root, scan_fn, report)
        else:
            _run_ray(ray_mod, todo, root, scan_fn, report, gpus_per_task=gpus_per_task, retries=retries)
    finally:
        if started:
            ray_mod.shutdown()
    summary = summarize(root)
    summary["run"] = {"mode": "in-process" if ray is None else f"ray {ray}", "workers": workers,
                      "ran": len(todo), "wall_s": round(time.perf_counter() - start, 2)}
    write_summary(root, summary)
    return summary


# ---------------------------------------------------------------------------
# The summary, rebuilt from the folders on disk
# ---------------------------------------------------------------------------
def verdict_correct(truth: dict, backdoored: bool, found) -> bool:
    """The zoo's scoring rule: a clean model called clean, or a backdoored one
    flagged with at least one of its true targets."""
    if truth["backdoored"]:
        return bool(backdoored) and bool(set(found) & set(truth["targets"]))
    return not backdoored


def merge_groups(root, tasks: list[dict]) -> dict:
    """One method's report over all class groups of a model: the groups'
    per-class rows in class order and the method's verdict taken over all of
    them (written to tasks/<model>/<method>.groups<K>/report.json)."""
    from . import scanners
    from .result import ClassResult

    reports = [_read_json(task_dir(root, t) / "report.json") for t in tasks]
    entries = [r["results"][0] for r in reports]
    rows = [dict(c) for e in entries for c in e["per_class"]]
    per_row = [ClassResult(target=int(c["class"]), statistic=float(c["statistic"]), asr=float(c["asr"]),
                           converged=bool(c["converged"]), steps=int(c["steps"]), queries=int(c.get("queries") or 0),
                           stop_reason=c.get("stop_reason", ""), source=c.get("source"))
               for c in rows]
    scanner = scanners.get(tasks[0]["method"])(**tasks[0]["options"])
    targets, anomaly = scanner._verdict(per_row)
    merged = {"method": tasks[0]["method"], "backdoored": bool(targets), "targets": [int(t) for t in targets],
              "per_class": rows, "anomaly": anomaly.to_dict(), "config": entries[0].get("config"),
              "seed": entries[0].get("seed"), "elapsed_s": sum(e.get("elapsed_s") or 0 for e in entries),
              "groups": [{"classes": t["classes"], "report": f"tasks/{t['id']}/report.json",
                          "backdoored": e["backdoored"], "targets": e["targets"]} for t, e in zip(tasks, entries)]}
    report = {"model": reports[0].get("model"), "data": reports[0].get("data"),
              "backdoored": merged["backdoored"], "targets": merged["targets"], "results": [merged]}
    _write_json(task_dir(root, tasks[0]).parent / "report.json", report)
    return merged


def summarize(root) -> dict:
    """The summary of OUT from plan.json and the task folders (nothing else is needed)."""
    root = Path(root)
    plan = _read_json(root / "plan.json")
    if plan is None:
        raise ValueError(f"--out: {root} holds no scan-many run (no readable plan.json)")
    units: dict[str, list[dict]] = {}
    for task in plan["tasks"]:
        units.setdefault(f"{task['name']}/{task['method']}", []).append(task)
    rows = []
    for unit, tasks in units.items():
        first = tasks[0]
        states = [task_row(root, t) for t in tasks]
        row = {"model": first["name"], "method": first["method"], "groups": first["groups"],
               "status": "done", "backdoored": None, "targets": [], "elapsed_s": None, "error": None,
               "report": None, "truth": first["truth"], "correct": None}
        bad = [s for s in states if s["status"] != "done"]
        if bad:
            row["status"] = "error" if any(s["status"] == "error" for s in bad) else "missing"
            row["error"] = "; ".join(f"{s['id']}: {s['error']}" for s in bad if s["error"]) or None
        elif first["groups"]:
            merged = merge_groups(root, tasks)
            row.update(backdoored=merged["backdoored"], targets=merged["targets"], elapsed_s=merged["elapsed_s"],
                       report=f"tasks/{Path(tasks[0]['id']).parent}/report.json")
        else:
            row.update(backdoored=states[0]["backdoored"], targets=states[0]["targets"],
                       elapsed_s=states[0]["elapsed_s"], report=f"tasks/{unit}/report.json")
        if row["status"] == "done" and first["truth"]:
            row["correct"] = verdict_correct(first["truth"], row["backdoored"], row["targets"])
        rows.append(row)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    per_method = {}
    for m in methods:
        mine = [r for r in rows if r["method"] == m]
        done = [r for r in mine if r["status"] == "done"]
        s = {"models": len(mine), "done": len(done), "errors": sum(r["status"] == "error" for r in mine),
             "missing": sum(r["status"] == "missing" for r in mine),
             "flagged": sum(bool(r["backdoored"]) for r in done),
             "scan_s": round(sum(r["elapsed_s"] or 0 for r in done), 2)}
        scored = [r for r in done if r["truth"]]
        if scored:
            bad = [r for r in scored if r["truth"]["backdoored"]]
            clean = [r for r in scored if not r["truth"]["backdoored"]]
            s.update(accuracy=sum(r["correct"] for r in scored) / len(scored), backdoored=len(bad),
                     detected_with_target=sum(r["correct"] for r in bad), clean=len(clean),
                     false_positives=sum(bool(r["backdoored"]) for r in clean))
        per_method[m] = s
    return {"source": plan.get("source"), "out": str(root), "methods": methods,
            "tasks": len(plan["tasks"]), "rows": rows, "summary": per_method}


def _targets(values) -> str:
    return " ".join(map(str, values))


def to_csv(summary: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["model", "method", "status", "backdoored", "targets", "truth_backdoored", "truth_targets",
                "correct", "elapsed_s", "error", "report"])
    for r in summary["rows"]:
        t = r["truth"] or {}
        w.writerow([r["model"], r["method"], r["status"], "" if r["backdoored"] is None else int(r["backdoored"]),
                    _targets(r["targets"]), "" if not t else int(t["backdoored"]), _targets(t.get("targets", [])),
                    "" if r["correct"] is None else int(r["correct"]),
                    "" if r["elapsed_s"] is None else f"{r['elapsed_s']:.3f}", r["error"] or "", r["report"] or ""])
    return buf.getvalue()


def format_summary(summary: dict) -> str:
    """A text table: one line per (model, method), then one per method."""
    width = max([len(r["model"]) for r in summary["rows"]] + [5])
    lines = [f"{'model':<{width}}  {'method':<11} {'truth':<10} {'verdict':<12} {'ok':<3} {'time':>8}"]
    for r in summary["rows"]:
        t = r["truth"]
        truth = "-" if not t else ("bd->" + ",".join(map(str, t["targets"])) if t["backdoored"] else "clean")
        if r["status"] != "done":
            lines.append(f"{r['model']:<{width}}  {r['method']:<11} {truth:<10} {r['status'].upper()}"
                         + (f": {r['error']}" if r["error"] else ""))
            continue
        verdict = "bd->" + ",".join(map(str, r["targets"])) if r["backdoored"] else "clean"
        ok = "-" if r["correct"] is None else ("yes" if r["correct"] else "NO")
        lines.append(f"{r['model']:<{width}}  {r['method']:<11} {truth:<10} {verdict:<12} {ok:<3} "
                     f"{(r['elapsed_s'] or 0):7.1f}s")
    lines.append("")
    for m, s in summary["summary"].items():
        line = (f"{m}: {s['done']}/{s['models']} scanned, {s['flagged']} flagged, errors {s['errors']}, "
                f"missing {s['missing']}, scan time {s['scan_s']:.1f}s")
        if "accuracy" in s:
            line += (f"; accuracy {s['accuracy']:.1%}, backdoored detected with a true target "
                     f"{s['detected_with_target']}/{s['backdoored']}, false positives {s['false_positives']}/{s['clean']}")
        lines.append(line)
    if "run" in summary:
        run = summary["run"]
        lines.append(f"this run: {run['ran']} task(s) {run['mode']}, wall {run['wall_s']:.1f}s")
    return "\n".join(lines)


def write_summary(root, summary: dict) -> None:
    from .data import atomic_write

    root = Path(root)
    _write_json(root / "summary.json", summary)
    atomic_write(root / "summary.csv", to_csv(summary).encode())
    atomic_write(root / "summary.txt", (format_summary(summary) + "\n").encode())


# ---------------------------------------------------------------------------
# The command line (registered in trigscan.cli)
# ---------------------------------------------------------------------------
def add_scan_many(subparsers, common) -> None:
    p = subparsers.add_parser("scan-many", parents=[common], help="scan many models (a manifest or a zoo folder), in-process or on Ray")
    p.add_argument("manifest", metavar="MANIFEST", help="JSON manifest of models, or a built zoo folder")
    p.add_argument("--out", required=True, metavar="DIR", help="one scan folder per task, plus summary.{json,csv,txt}")
    p.add_argument("--method", action="append", metavar="M", help="scanner name (repeatable); overrides the "
                   "manifest's defaults")
    p.add_argument("--option", action="append", default=[], metavar="[M.]KEY=VALUE", help="scanner option (repeatable)")
    p.add_argument("--seed", type=int, help="seed of every scan (default: the manifest's, else 0)")
    p.add_argument("--ray", metavar="ADDRESS|local", help="run the tasks on Ray: 'local' starts a cluster on this "
                   "machine, anything else is a cluster address (ray://host:10001 or host:6379)")
    p.add_argument("--workers", type=int, help="with --ray local: CPUs of the local cluster (default all)")
    p.add_argument("--cpus-per-task", type=int, default=1, help="CPUs each task asks for and torch threads it "
                   "uses, in-process too (default 1)")
    p.add_argument("--gpus-per-task", type=float, help="GPUs each CUDA task asks for on Ray (default 1)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: CUDA when the cluster (or this machine) has GPUs (default)")
    p.add_argument("--class-groups", type=int, metavar="K", help="split each model's candidate classes into K tasks "
                   "per method; the verdict is taken over all groups")
    p.add_argument("--retries", type=int, default=3, help="on Ray: attempts after a worker dies (default 3)")
    p.add_argument("--images", type=int, default=100, help="zoo folder: clean test images per scan (default 100)")
    p.add_argument("--quiet", action="store_true", help="no per-task lines")
    p.set_defaults(func=run_cli)


def run_cli(args) -> int:
    """Exit code: 0 every task finished, 1 some failed (the summary says which)."""
    source = Path(args.manifest)
    defaults: dict = {}
    if source.is_dir() and any(source.glob("*/truth.json")):
        entries = zoo_entries(source, Path(args.out) / "data", n_images=args.images,
                              seed=args.seed if args.seed is not None else 0)
    else:
        entries, defaults = load_manifest(source)
    summary = scan_many(entries, args.out, defaults=defaults, methods=args.method, options=args.option or None,
                        seed=args.seed, ray=args.ray, workers=args.workers, cpus_per_task=args.cpus_per_task,
                        gpus_per_task=args.gpus_per_task, device=args.device, class_groups=args.class_groups,
                        retries=args.retries, source=str(source.resolve()),
                        log=(lambda line: None) if args.quiet else print)
    print(format_summary(summary))
    print(f"written: {Path(args.out) / 'summary.json'} (.csv, .txt)")
    return 0 if all(r["status"] == "done" for r in summary["rows"]) else 1
