"""One ``trigscan scan`` as a Python function: load the model and the data, run
the methods, write the report folder. The command line and schedulers that run
many scans (one task per model) both call :func:`run_scan`.

Bad input (missing or unreadable files, refused pickles, wrong shapes, unknown
methods or options, classes out of range, a folder holding another scan) raises
``ValueError`` with a message that names the argument; the CLI turns it into
exit code 2.

The output folder DIR (layout and report.json schema: docs/report.md):

    report.json, report.html, summary.png
    images/<method>/<row>_{mask,pattern,stamped}.png
    triggers/<method>.npz             the triggers as arrays (no pickle)
    results/<method>.json             one finished method (read back on a re-run)
    checkpoints/<method>.pt           the running method's state (resumable methods)

Resume: running the same scan again with the same DIR reads the finished
methods back from ``results/`` instead of scanning again, and hands the
unfinished one its checkpoint, so a killed scan continues where it stopped. A
DIR written by a different scan (other model, data, seed, classes, options...)
is refused, never mixed in.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import re
import time
import types
import typing
import zipfile
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

SCHEMA_VERSION = 1
_FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


# ---------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------
@dataclasses.dataclass
class LoadedModel:
    """A model ready to scan: a WhiteBoxModel, or a QueryModel (black-box)."""

    model: Any
    access: str  # "white" or "black"
    kind: str  # "torchscript", "onnx", "factory"
    info: dict  # the report's "model" entry

    def for_method(self, scanner_cls, input_shape, budget: int | None):
        """The view of the model a method gets: the white-box module, or a query
        interface with its own query budget (counted per method)."""
        from .models import QueryModel, as_query_model

        if scanner_cls.access == "white":
            if self.access != "white":
                raise ValueError(f"method: {scanner_cls.name!r} needs gradients (white-box), but "
                                 f"{self.info['path']} is a query-only {self.kind.upper()} model; "
                                 "use a black-box method (b3d, b3d-ss) or a TorchScript model")
            return self.model
        if self.access == "black":
            m = self.model
            return QueryModel(m.fn, m.num_classes, m.input_shape, batch_size=m.batch_size, budget=budget,
                              outputs=m.outputs)
        if input_shape is None:
            raise ValueError(f"--data: {scanner_cls.name!r} on a white-box model needs images to learn "
                             "the input shape; pass --data (b3d-ss then still scans with noise)")
        return as_query_model(self.model, input_shape=tuple(input_shape), budget=budget)


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _pickle_kind(path: Path) -> str | None:
    """What kind of pickle `path` is, or None when it is not one."""
    with open(path, "rb") as f:
        head = f.read(2)
    if len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "a Python pickle"
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
        if any(n.endswith("data.pkl") for n in names) and not any("/code/" in n for n in names):
            return "a torch.save archive (a pickled Python object)"
    return None


def _refuse_pickle(path: Path, what: str) -> None:
    kind = _pickle_kind(path)
    if kind:
        raise ValueError(
            f"{what}: {path} is {kind}; trigscan never unpickles model files because unpickling can run "
            "arbitrary code. Export the model with torch.jit.save (TorchScript) or to ONNX, or pass "
            "package.module:factory with --weights holding a state_dict")


def _parse_normalize(normalize, channels: int | None = None):
    """(mean, std) from a pair of numbers or sequences; None passes through."""
    if normalize is None:
        return None
    if isinstance(normalize, str):
        parts = [p for p in normalize.replace(" ", "").split(",") if p]
        try:
            values = [float(p) for p in parts]
        except ValueError:
            raise ValueError(f"--normalize: expected numbers MEAN,STD (or C means then C stds), got {normalize!r}") from None
        if len(values) < 2 or len(values) % 2:
            raise ValueError(f"--normalize: expected MEAN,STD (or C means then C stds), got {normalize!r}")
        half = len(values) // 2
        normalize = (values[:half], values[half:])
    try:
        mean, std = normalize
    except (TypeError, ValueError):
        raise ValueError(f"normalize: expected (mean, std), got {normalize!r}") from None
    mean = [float(v) for v in (mean if isinstance(mean, (list, tuple)) else [mean])]
    std = [float(v) for v in (std if isinstance(std, (list, tuple)) else [std])]
    if len(mean) != len(std):
        raise ValueError(f"--normalize: {len(mean)} mean(s) but {len(std)} std(s)")
    if any(not s > 0 for s in std):
        raise ValueError(f"--normalize: std must be > 0, got {std}")
    return mean, std


def load_model(spec, *, weights=None, device: str = "cpu", normalize=None) -> LoadedModel:
    """Open MODEL: a TorchScript file (white-box), an ONNX file (query-only,
    ONNX Runtime on the CPU) or ``package.module:factory`` with a state_dict in
    `weights` (read with ``torch.load(weights_only=True)``)."""
    from .models import WhiteBoxModel, load_onnx, load_torchscript

    spec = str(spec)
    norm = _parse_normalize(normalize)
    mean, std = norm if norm else (None, None)
    norm_info = None if norm is None else {"mean": mean, "std": std}
    path = Path(spec)
    if not path.exists() and _FACTORY.match(spec):
        module = _load_factory(spec, weights)
        info = {"path": spec, "sha256": sha256_file(weights), "access": "white", "format": "factory",
                "weights": str(weights), "normalize": norm_info}
        return LoadedModel(WhiteBoxModel(module, mean, std).to(device), "white", "factory", info)
    if weights is not None:
        raise ValueError("--weights: only used with MODEL given as package.module:factory")
    if not path.exists():
        raise ValueError(f"MODEL: no such file {path} (expected a TorchScript or ONNX file, "
                         "or package.module:factory with --weights)")
    if not path.is_file():
        raise ValueError(f"MODEL: {path} is not a file")
    _refuse_pickle(path, "MODEL")
    info = {"path": str(path), "sha256": sha256_file(path), "normalize": norm_info}
    if path.suffix.lower() == ".onnx":
        if device != "cpu":
            raise ValueError(f"--device {device}: ONNX models run on the CPU (ONNX Runtime); use --device cpu")
        model = load_onnx(path)
        if norm is not None:
            model.fn = _normalized(model.fn, mean, std)
        info.update(access="black", format="onnx")
        return LoadedModel(model, "black", "onnx", info)
    module = load_torchscript(path)
    info.update(access="white", format="torchscript")
    return LoadedModel(WhiteBoxModel(module, mean, std).to(device), "white", "torchscript", info)


def _normalized(fn, mean, std):
    from .models import _as_channel_tensor

    def run(x):
        c = x.shape[1]
        return fn((x - _as_channel_tensor(mean, "mean", c)) / _as_channel_tensor(std, "std", c))

    return run


def _load_factory(spec: str, weights) -> torch.nn.Module:
    if weights is None:
        raise ValueError(f"--weights: MODEL {spec} is a factory; pass --weights FILE with its state_dict")
    weights = Path(weights)
    if not weights.is_file():
        raise ValueError(f"--weights: no such file {weights}")
    module_name, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"MODEL: cannot find {spec} ({type(exc).__name__}: {exc})") from None
    try:
        module = factory()
    except Exception as exc:
        raise ValueError(f"MODEL: {spec}() raised {type(exc).__name__}: {exc}") from None
    if not isinstance(module, torch.nn.Module):
        raise ValueError(f"MODEL: {spec}() returned {type(module).__name__}, not a torch.nn.Module")
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(
            f"--weights: {weights} cannot be read as tensors only ({str(exc).splitlines()[0]}); "
            "trigscan loads weights with torch.load(weights_only=True) and never unpickles other "
            "objects, because unpickling can run arbitrary code: save model.state_dict()") from None
    if isinstance(state, dict) and set(state) == {"state_dict"}:
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"--weights: {weights} is not a state_dict (a dict of tensors)")
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"--weights: {weights} does not fit {spec}(): {str(exc).splitlines()[0]} "
                         f"{' '.join(str(exc).split())[:300]}") from None
    return module


# ---------------------------------------------------------------------------
# The data
# ---------------------------------------------------------------------------
def load_data(path) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    """DATA: an .npz with ``x`` [N, C, H, W] (float in [0, 1] or uint8) and
    optional ``y`` [N], or a folder with one subfolder of images per class."""
    from .data import load_image_folder, read_npz
    from .data.files import check_images, check_labels

    path = Path(path)
    if not path.exists():
        raise ValueError(f"--data: no such file or folder {path}")
    if path.is_dir():
        x, y, classes = load_image_folder(path)
        info = {"path": str(path), "sha256": _folder_digest(path), "format": "folder", "classes": classes}
    else:
        arrays = read_npz(path)
        if "x" not in arrays:
            raise ValueError(f"--data: {path} has no array 'x' (found {sorted(arrays) or 'none'})")
        x = check_images(arrays["x"], f"--data {path}")
        y = check_labels(arrays["y"], len(x), f"--data {path}") if "y" in arrays else None
        info = {"path": str(path), "sha256": sha256_file(path), "format": "npz"}
    info.update(n=int(x.shape[0]), shape=list(x.shape[1:]), labels=y is not None)
    return x, y, info


def _folder_digest(root: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(root)).encode() + b"\0" + bytes.fromhex(sha256_file(f)))
    return h.hexdigest()


# ---------------------------------------------------------------------------
# Method options
# ---------------------------------------------------------------------------
def _config_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls.Config)


def _coerce(value, hint, where: str):
    """`value` as type `hint` (strings from the command line are parsed first)."""
    if isinstance(value, str):
        text = value
        try:
            value = json.loads(text)
        except ValueError:
            value = {"none": None, "true": True, "false": False}.get(text.lower(), text)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, where)
            except ValueError:
                pass
        raise ValueError(f"{where}: expected {_type_name(hint)}, got {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or (args and args[-1] is not Ellipsis and len(value) != len(args)):
            raise ValueError(f"{where}: expected {_type_name(hint)} (a JSON list), got {value!r}")
        items = [args[0]] * len(value) if args and args[-1] is Ellipsis else list(args) or [Any] * len(value)
        return tuple(_coerce(v, t, where) for v, t in zip(value, items))
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    elif hint is Any:
        return value
    else:
        return value  # other annotations: the scanner's own checks apply
    raise ValueError(f"{where}: expected {_type_name(hint)}, got {value!r}")


def _type_name(hint) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def resolve_options(methods: Sequence[str], options) -> dict[str, dict]:
    """Per-method options, type-checked against each method's Config.

    options: None, a dict ``{method: {key: value}}``, or a list of
    ``KEY=VALUE`` / ``METHOD.KEY=VALUE`` strings (the CLI's ``--option``; a
    plain KEY goes to every method that has that option). Values may be
    strings (parsed as JSON, else taken as text) or Python values.
    """
    from . import scanners

    classes = {m: scanners.get(m) for m in methods}
    hints = {m: _config_types(c) for m, c in classes.items()}
    resolved: dict[str, dict] = {m: {} for m in methods}

    def put(method, key, value, where):
        if key not in hints[method]:
            raise ValueError(f"{where}: method {method!r} has no option {key!r} "
                             f"(its options: {', '.join(sorted(hints[method]))})")
        resolved[method][key] = _coerce(value, hints[method][key], f"{where} ({method}.{key})")

    if options is None:
        pass
    elif isinstance(options, dict):
        for method, values in options.items():
            if method not in resolved:
                raise ValueError(f"options: method {method!r} is not among the methods {list(methods)}")
            for key, value in values.items():
                put(method, key, value, f"options[{method!r}][{key!r}]")
    else:
        for pair in options:
            key, sep, raw = str(pair).partition("=")
            where = f"--option {pair}"
            if not sep or not key:
                raise ValueError(f"{where}: expected KEY=VALUE or METHOD.KEY=VALUE")
            method, dot, name = key.partition(".")
            if dot and method in resolved:
                put(method, name, raw, where)
                continue
            if dot and not any(key in hints[m] for m in methods):
                raise ValueError(f"{where}: method {method!r} is not among --method {list(methods)}")
            takers = [m for m in methods if key in hints[m]]
            if not takers:
                raise ValueError(f"{where}: no chosen method has an option {key!r} (options: "
                                 + "; ".join(f"{m}: {', '.join(sorted(hints[m]))}" for m in methods) + ")")
            for m in takers:
                put(m, key, raw, where)
    for method, cls in classes.items():  # the scanner's own range checks, before any work
        try:
            cls(**resolved[method])
        except TypeError as exc:
            raise ValueError(f"options of {method}: {exc}") from None
        except ValueError as exc:
            raise ValueError(f"option of {method}: {exc}") from None
    return resolved


# ---------------------------------------------------------------------------
# The scan
# ---------------------------------------------------------------------------
def _identity(model_info, data_info, seed, classes, device, budget) -> dict:
    from . import __version__

    return {"schema_version": SCHEMA_VERSION, "trigscan_version": __version__,
            "model_sha256": model_info["sha256"], "normalize": model_info["normalize"],
            "data_sha256": None if data_info is None else data_info["sha256"],
            "seed": seed, "classes": classes, "device": device, "budget": budget}


def _plain(value):
    from .report import to_json

    return json.loads(to_json(value))


def run_scan(model, data, methods: Sequence[str], out_dir, *, weights=None, seed: int = 0,
             classes: Sequence[int] | None = None, device: str = "cpu", budget: int | None = None,
             normalize=None, options=None, progress: bool | None = None,
             log: Callable[[dict], None] | None = None) -> dict:
    """Run one scan and write `out_dir`; returns the report (report.json's content).

    model: path of a TorchScript (.pt) or ONNX (.onnx) file, or
        "package.module:factory" with `weights` (a state_dict file).
    data: path of an .npz (x, optional y) or an image folder; None for methods
        that need no data (b3d-ss).
    methods: scanner names (``trigscan.scanners.available()``), run in order on
        the same loaded model and data.
    seed, classes (candidate targets, default all), device ("cpu"/"cuda"),
    budget (query budget per black-box method), normalize ((mean, std) or the
        text "MEAN,STD"): as ``trigscan scan``.
    options: per-method options, see :func:`resolve_options`.
    progress: draw progress bars on stderr (None: when stderr is a terminal).
    log: called with event dicts ({"event": "method_start" | "method_done" |
        "method_reused" | "bar_start" | "bar" | "bar_end" | "report", ...});
        bar events are those of ``trigscan.progress``.

    Re-running with the same arguments and `out_dir` resumes (see the module
    docstring). Raises ValueError on bad input.
    """
    from . import progress as progress_events
    from . import report as report_mod
    from . import scanners
    from .checkpoint import CheckpointMismatch

    started = time.perf_counter()
    emit = log or (lambda event: None)
    methods = [str(m).lower() for m in methods]
    if not methods:
        raise ValueError("--method: give at least one method")
    duplicates = sorted({m for m in methods if methods.count(m) > 1})
    if duplicates:
        raise ValueError(f"--method: {', '.join(duplicates)} given more than once")
    for m in methods:
        scanners.get(m)  # unknown names fail here, naming the known ones
    if device not in ("cpu", "cuda") and not str(device).startswith("cuda:"):
        raise ValueError(f"--device: expected cpu or cuda, got {device!r}")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device is visible")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"--seed: expected an integer >= 0, got {seed!r}")
    if budget is not None and (not isinstance(budget, int) or budget < 1):
        raise ValueError(f"--budget: expected a number of queries >= 1, got {budget!r}")
    resolved = resolve_options(methods, options)

    loaded = load_model(model, weights=weights, device=device, normalize=normalize)
    x = y = data_info = None
    needs_data = [m for m in methods if m != "b3d-ss"]
    if data is not None:
        x, y, data_info = load_data(data)
    elif needs_data:
        raise ValueError(f"--data: method(s) {', '.join(needs_data)} need images; pass --data "
                         "(an .npz or an image folder); only b3d-ss scans without data")
    num_classes, input_shape = _probe(loaded, x)
    loaded.info.update(num_classes=num_classes, input_shape=input_shape)
    if classes is not None:
        classes = [int(c) for c in classes]
        bad = [c for c in classes if not 0 <= c < num_classes]
        if bad:
            raise ValueError(f"--classes: {bad} out of range; the model has {num_classes} classes "
                             f"(0..{num_classes - 1})")
    if y is not None and len(y) and int(y.max()) >= num_classes:
        raise ValueError(f"--data: labels go up to {int(y.max())}, but the model has {num_classes} classes")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    identity = _identity(loaded.info, data_info, seed, classes, device, budget)
    entries = []
    for method in methods:
        cls = scanners.get(method)
        config = dataclasses.asdict(cls(**resolved[method]).config)
        key = _plain({**identity, "method": method, "config": config})
        saved = report_mod.read_method(out, method)
        if saved is not None:
            if saved.get("identity") != key:
                differ = sorted(k for k in set(key) | set(saved.get("identity") or {})
                                if key.get(k) != (saved.get("identity") or {}).get(k))
                raise ValueError(f"--out: {out} holds a finished {method} scan of a different setting "
                                 f"(differs in {', '.join(differ)}); use another --out or delete "
                                 f"{report_mod.method_file(out, method)}")
            entries.append(saved["entry"])
            emit({"event": "method_reused", "method": method, "backdoored": saved["entry"]["backdoored"],
                  "targets": saved["entry"]["targets"]})
            continue
        emit({"event": "method_start", "method": method})
        scanner = cls(**resolved[method])
        view = loaded.for_method(cls, input_shape, budget)
        checkpoint = report_mod.checkpoint_file(out, method) if cls.resumable else None
        images, labels = (None, None) if scanners.scan_data(cls) == "none" else (x, y)
        tagged = (lambda e, m=method: emit({**e, "method": m}))
        try:
            with progress_events.listen(tagged):
                result = scanner.scan(view, images, labels, seed=seed, classes=classes,
                                      progress=progress, checkpoint=checkpoint)
        except CheckpointMismatch as exc:
            raise ValueError(f"--out: {exc}") from None
        example = x if x is not None else _noise_like(input_shape, seed)
        entry = report_mod.method_entry(out, result, example, y)
        report_mod.save_method(out, method, key, entry, result)
        if checkpoint is not None:
            checkpoint.unlink(missing_ok=True)  # results/<method>.json now stands for the finished scan
        entries.append(entry)
        emit({"event": "method_done", "method": method, "backdoored": entry["backdoored"],
              "targets": entry["targets"], "elapsed_s": entry["elapsed_s"]})

    from . import __version__

    report = {
        "schema_version": SCHEMA_VERSION,
        "trigscan_version": __version__,
        "model": loaded.info,
        "data": data_info or {"path": None, "sha256": None, "n": 0},
        "scan": {"methods": methods, "seed": seed, "classes": classes, "device": device, "budget": budget},
        "backdoored": any(e["backdoored"] for e in entries),
        "targets": sorted({t for e in entries for t in e["targets"]}),
        "results": entries,
        "files": {"html": "report.html", "summary": "summary.png"},
        "elapsed_s": time.perf_counter() - started,
    }
    report_mod.write_report(out, report)
    emit({"event": "report", "path": str(out / "report.json"), "backdoored": report["backdoored"],
          "targets": report["targets"]})
    return report


def _probe(loaded: LoadedModel, x) -> tuple[int, list[int] | None]:
    """The model's class count, checked on two of the images when there are any."""
    from .models import ModelError

    if loaded.access == "black":
        shape = list(loaded.model.input_shape)
        if x is not None and list(x.shape[1:]) != shape:
            raise ValueError(f"--data: images are {list(x.shape[1:])} (C, H, W) but the model takes {shape}")
        return loaded.model.num_classes, shape
    if x is None:
        raise ValueError("--data: a white-box model needs images to learn its input shape; pass --data")
    try:
        return loaded.model.probe(x), list(x.shape[1:])
    except ModelError as exc:
        # a TorchScript error carries the model's code and traceback; its last line says what failed
        cause = exc.__cause__ or exc
        reason = [line for line in str(cause).splitlines() if line.strip()][-1:] or [type(cause).__name__]
        raise ValueError(f"--data: the model does not accept these images, shape {list(x.shape[1:])} "
                         f"(C, H, W): {reason[0].strip()}") from None


def _noise_like(shape, seed: int) -> torch.Tensor:
    from .data import noise

    return noise(1, tuple(shape), seed=seed)
