"""The ``trigscan`` command line: argument parsing and printing only.

Each subcommand is an ``add_<name>(subparsers)`` function that declares its
arguments and sets ``func`` to the function that runs it (returning the exit
code), so new subcommands (``scan``, ``demo``, ``info``) slot in beside these.
"""
from __future__ import annotations

import argparse
import json
import sys


def _run_zoo_build(args) -> int:
    from .zoo.build import build_zoo, format_summary, quick_specs, standard_specs

    specs = quick_specs() if args.quick else standard_specs()
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
                      seed=args.seed, quiet=args.quiet)
    print(format_report(report))
    out = Path(args.out) if args.out else Path(args.dir) / "eval.json"
    atomic_write(out, to_json(report).encode())
    print(f"written: {out}")
    errors = sum(s["errors"] for s in report["summary"].values())
    return 1 if errors else 0


def add_zoo(subparsers) -> None:
    zoo = subparsers.add_parser("zoo", help="build a model zoo and evaluate scanners on it")
    sub = zoo.add_subparsers(dest="zoo_command", required=True, metavar="{build,eval}")

    b = sub.add_parser("build", help="train clean and backdoored models into DIR")
    b.add_argument("dir", metavar="DIR")
    b.add_argument("--quick", action="store_true", help="a handful of models (for tests)")
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
    e.add_argument("--out", help="JSON report path (default DIR/eval.json)")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.set_defaults(func=_run_zoo_eval)


def _run_demo(args) -> int:
    from .demo import run_demo

    run_demo(args.cache, seed=args.seed)
    return 0


def add_demo(subparsers) -> None:
    d = subparsers.add_parser("demo", help="scan a backdoored and a clean model built from embedded data")
    d.add_argument("--cache", help="where the demo models are built once and reused "
                                   "(default $TRIGSCAN_CACHE or ~/.cache/trigscan/demo)")
    d.add_argument("--seed", type=int, default=0)
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


def add_info(subparsers) -> None:
    i = subparsers.add_parser("info", help="what was built: CUDA or not, ops and their kernels, scanners")
    i.add_argument("--json", action="store_true", help="print build_info() as JSON")
    i.set_defaults(func=_run_info)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="trigscan", description="Backdoor scanning for image classifiers.")
    parser.add_argument("--version", action="version", version=f"trigscan {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_demo(subparsers)
    add_info(subparsers)
    add_zoo(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded in zoo.json
    try:
        return args.func(args)
    except ValueError as exc:  # bad input: one clear line, no traceback
        print(f"trigscan: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
