"""The ``trigscan`` command line: argument parsing and printing only.

Each subcommand is an ``add_<name>(subparsers)`` function that declares its
arguments and sets ``func`` to the function that runs it (returning the exit
code), so new subcommands (``scan``, ``demo``, ``info``) slot in beside these.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _run_zoo_build(args) -> int:
    from .zoo.build import FAMILIES, build_zoo, format_summary, quick_specs

    specs = quick_specs() if args.quick else FAMILIES[args.family]()
    index = build_zoo(args.dir, specs, only=args.only, jobs=args.jobs, force=args.force, command="trigscan " + " ".join(args.argv),
                      log=(lambda line: None) if args.quiet else print, quiet=args.quiet)
    print(format_summary(index))
    if index["failures"]:
        print(f"zoo build: {len(index['failures'])} model(s) failed their checks (see above)", file=sys.stderr)
        return 1
    return 0


def _parse_options(pairs: list[str], methods: list[str]) -> dict:
    """``KEY=VALUE`` (every method) or ``METHOD.KEY=VALUE``; values are JSON when they parse, else strings."""
    options: dict = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--option: expected KEY=VALUE or METHOD.KEY=VALUE, got {pair!r}")
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        method, dot, name = key.partition(".")
        targets = [method] if dot else methods
        if dot and method not in methods:
            raise ValueError(f"--option {pair!r}: method {method!r} is not among --method {methods}")
        for m in targets:
            options.setdefault(m, {})[name if dot else key] = value
    return options


def _run_zoo_eval(args) -> int:
    from pathlib import Path

    from .data import atomic_write
    from .zoo.evaluate import evaluate, format_report, to_json

    methods = [m.lower() for m in args.method]
    report = evaluate(args.dir, methods, options=_parse_options(args.option, methods), n_images=args.images,
                      seed=args.seed, only=args.only, quiet=args.quiet)
    print(format_report(report))
    out = Path(args.out) if args.out else Path(args.dir) / "eval.json"
    atomic_write(out, to_json(report).encode())
    print(f"written: {out}")
    errors = sum(s["errors"] for s in report["summary"].values())
    return 1 if errors else 0


def add_zoo(subparsers) -> None:
    from .zoo.build import FAMILIES

    zoo = subparsers.add_parser("zoo", help="build a model zoo and evaluate scanners on it")
    sub = zoo.add_subparsers(dest="zoo_command", required=True, metavar="{build,eval}")

    b = sub.add_parser("build", help="train clean and backdoored models into DIR")
    b.add_argument("dir", metavar="DIR")
    b.add_argument("--family", choices=sorted(FAMILIES), default="standard",
                   help="standard: 25 models on the embedded digits (24x24, ~2 min on 2 cores); "
                        "shapes: 20 models on generated 32x32 RGB shapes (~30 min)")
    b.add_argument("--quick", action="store_true", help="a handful of standard models (for tests)")
    b.add_argument("--only", nargs="+", metavar="NAME", help="build only these models")
    b.add_argument("--force", action="store_true", help="rebuild models that are already complete")
    b.add_argument("--jobs", type=int, default=2, help="models built in parallel processes (default 2)")
    b.add_argument("--quiet", action="store_true", help="no progress bar, no per-model lines")
    b.set_defaults(func=_run_zoo_build)

    e = sub.add_parser("eval", help="run scanners over the models in DIR and score them")
    e.add_argument("dir", metavar="DIR")
    e.add_argument("--method", action="append", required=True, metavar="M", help="scanner name (repeatable)")
    e.add_argument("--option", action="append", default=[], metavar="[M.]KEY=VALUE",
                   help="scanner constructor option, JSON value (repeatable)")
    e.add_argument("--images", type=int, default=100, help="clean test images per scan (default 100)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--only", nargs="+", metavar="NAME", help="scan only these models")
    e.add_argument("--out", help="JSON report path (default DIR/eval.json)")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.set_defaults(func=_run_zoo_eval)


EXIT_CLEAN, EXIT_ERROR, EXIT_BAD_INPUT, EXIT_BACKDOORED = 0, 1, 2, 10


def _class_list(text: str) -> list[int]:
    try:
        return [int(c) for c in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected class indices (e.g. 0 3 7 or 0,3,7), got {text!r}") from None


def _run_scan(args) -> int:
    from .runner import run_scan

    jsonl = args.log == "jsonl"
    human = not (jsonl or args.quiet)

    def log(event: dict) -> None:
        if jsonl:
            print(json.dumps(event), flush=True)
        elif human and event["event"] == "method_reused":
            print(f"{event['method']}: finished earlier, read back from {args.out}", file=sys.stderr)
        elif human and event["event"] == "method_done":
            print(f"{event['method']}: {_verdict_text(event)} ({event['elapsed_s']:.1f} s)", file=sys.stderr)

    classes = None if args.classes is None else [c for group in args.classes for c in group]
    report = run_scan(args.model, args.data, args.method, args.out, weights=args.weights, seed=args.seed,
                      classes=classes, device=args.device, budget=args.budget, normalize=args.normalize,
                      options=args.option, progress=False if not human else None, log=log)
    if not jsonl:
        print(format_table(report))
        print(f"report: {Path(args.out) / 'report.html'} (and report.json)")
    return EXIT_BACKDOORED if report["backdoored"] else EXIT_CLEAN


def _verdict_text(entry: dict) -> str:
    return f"BACKDOORED, target(s) {', '.join(map(str, entry['targets']))}" if entry["backdoored"] else "clean"


def format_table(report: dict) -> str:
    """The final table: one line per method."""
    rows = [("method", "verdict", "targets", "test", "time")]
    for e in report["results"]:
        a = e["anomaly"]
        if a["kind"] == "gamma":
            test = f"p = {a['p_value']:.2g} (flag < {a['threshold']:g})"
        else:
            finite = [v for v in a["values"] if isinstance(v, (int, float))]
            top = max(finite) if finite else float("nan")
            test = f"max anomaly index {top:.2f} (flag > {a['threshold']:g})"
        targets = ", ".join(map(str, e["targets"])) or "-"
        rows.append((e["method"], "BACKDOORED" if e["backdoored"] else "clean", targets, test,
                     f"{e['elapsed_s']:.1f} s" + (" (partial)" if e.get("partial") else "")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    notes = [f"note ({e['method']}): {n}" for e in report["results"] for n in e.get("notes", [])]
    return "\n".join(["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows] + notes)


def add_scan(subparsers, common) -> None:
    s = subparsers.add_parser(
        "scan", parents=[common], help="scan a model for backdoors and write a report",
        description="Scan MODEL with one or more methods and write DIR/report.json, report.html and "
                    "trigger images. Exit code: 0 clean, 10 backdoored (any method), 2 bad input, "
                    "1 other errors. Re-running the same command with the same --out resumes.")
    s.add_argument("model", metavar="MODEL",
                   help="TorchScript file (white-box), ONNX file (black-box, ONNX Runtime), or "
                        "package.module:factory with --weights")
    s.add_argument("--data", metavar="DATA", help=".npz with x [N,C,H,W] (and y) or a folder of class "
                                                   "subfolders; not needed for b3d-ss")
    s.add_argument("--method", action="append", required=True, metavar="M",
                   help="scanner (repeatable): " + ", ".join(_method_names()))
    s.add_argument("--out", default="trigscan-report", metavar="DIR",
                   help="report folder (default ./trigscan-report); the same DIR resumes")
    s.add_argument("--weights", metavar="FILE", help="state_dict for MODEL=package.module:factory "
                                                     "(read with torch.load(weights_only=True))")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--classes", type=_class_list, nargs="+", metavar="C",
                   help="candidate target classes (default all)")
    s.add_argument("--device", default="cpu", help="cpu or cuda (white-box models)")
    s.add_argument("--budget", type=int, metavar="N", help="query budget per black-box method (images sent)")
    s.add_argument("--normalize", metavar="MEAN,STD",
                   help="normalisation the model expects on [0,1] images: MEAN,STD or C means then C stds")
    s.add_argument("--option", action="append", default=[], metavar="[M.]KEY=VALUE",
                   help="method option, checked against the method's Config (repeatable), "
                        "e.g. --option max_steps=200 --option lred.images_per_class=4")
    s.add_argument("--quiet", action="store_true", help="no progress bars; only the final table")
    s.add_argument("--log", choices=("text", "jsonl"), default="text",
                   help="jsonl: one JSON event per line on stdout (progress, results), nothing else")
    s.set_defaults(func=_run_scan)


def _method_names() -> list[str]:
    from . import scanners

    return scanners.available()


def _run_demo(args) -> int:
    from .demo import run_demo

    summary = run_demo(args.cache, seed=args.seed, jobs=args.jobs)
    wrong = [f"{model}/{method}" for model, m in summary["models"].items()
             for method, r in m["results"].items() if r["in_scope"] and not r["right"]]
    if wrong:
        print(f"demo: verdicts that do not match the truth: {', '.join(wrong)}", file=sys.stderr)
        return EXIT_ERROR
    return 0


def add_demo(subparsers, common) -> None:
    d = subparsers.add_parser("demo", parents=[common], help="scan two backdoored models and a clean one built from embedded data")
    d.add_argument("--cache", help="where the demo models are built once and reused "
                                   "(default $TRIGSCAN_CACHE or ~/.cache/trigscan/demo)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--jobs", type=int, default=2, choices=(1, 2),
                   help="2 (default): two models at a time in parallel processes; 1: in this process, with progress bars")
    d.set_defaults(func=_run_demo)


def _run_info(args) -> int:
    from . import build_info, scanners

    info = build_info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"trigscan {__import__('trigscan').__version__}, torch {info['torch_runtime']}, "
          f"{info['threads']} threads")
    if not info["loaded"]:
        print(f"extension: NOT LOADED ({info['load_error']})")
        return 1
    cuda = (f"compiled for {info.get('cuda_arch_list')} (CUDA {info.get('cuda_version')})"
            if info.get("cuda_compiled") else "not compiled")
    print(f"CUDA kernels: {cuda}; GPU visible: {__import__('torch').cuda.is_available()}")
    for op, keys in info["ops"].items():
        print(f"  trigscan::{op:26s} {' '.join(keys)}")
    print(f"scanners: {', '.join(scanners.available())}")
    return 0


def add_info(subparsers, common) -> None:
    i = subparsers.add_parser("info", parents=[common], help="what was built: CUDA or not, ops and their kernels, scanners")
    i.add_argument("--json", action="store_true", help="print build_info() as JSON")
    i.set_defaults(func=_run_info)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .manyscan import add_scan_many

    parser = argparse.ArgumentParser(prog="trigscan", description="Backdoor scanning for image classifiers.")
    parser.add_argument("--version", action="version", version=f"trigscan {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    # accepted after the subcommand too (SUPPRESS: absent there, the top-level value stays)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the traceback of an error")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_scan(subparsers, common)
    add_scan_many(subparsers, common)
    add_demo(subparsers, common)
    add_info(subparsers, common)
    add_zoo(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 clean (or success), 10 backdoored, 2 bad input, 1 other errors, 130 interrupted."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded in zoo.json
    try:
        return args.func(args)
    except ValueError as exc:  # bad input: one clear line, no traceback
        if args.debug:
            raise
        print(f"trigscan: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("trigscan: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001  (any other failure: one line, traceback with --debug)
        if args.debug:
            raise
        print(f"trigscan: error: {type(exc).__name__}: {_one_line(exc)} (--debug shows the traceback)",
              file=sys.stderr)
        return EXIT_ERROR


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


if __name__ == "__main__":
    sys.exit(main())
