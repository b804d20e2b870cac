"""Benchmark session setup: 2 intra-op threads, machine description in the
header and in the --benchmark-json machine_info (read by report.py)."""
from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))

import torch  # noqa: E402

import variants  # noqa: E402

torch.set_num_threads(variants.THREADS)


def cpu_model():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def busy_fraction(interval=0.5):
    """Share of all CPUs busy over `interval` seconds (other processes included)."""
    def read():
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        return fields[3] + fields[4], sum(fields)
    try:
        idle0, total0 = read()
        time.sleep(interval)
        idle1, total1 = read()
        return 1.0 - (idle1 - idle0) / max(1, total1 - total0)
    except OSError:
        return float("nan")


def machine_line():
    return (f"CPU: {cpu_model()} ({os.cpu_count()} logical CPUs), "
            f"torch.get_num_threads() = {torch.get_num_threads()}, "
            f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}")


_busy_before = None


def pytest_report_header(config):
    global _busy_before
    _busy_before = busy_fraction()
    return [machine_line(),
            f"CPU busy before the run (other processes): {100 * _busy_before:.0f}%"]


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["trigscan"] = {
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "timer": str(config.getoption("benchmark_timer", default=None)),
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "busy_before": _busy_before,
        "busy_after": busy_fraction(),
        "loadavg": Path("/proc/loadavg").read_text().split()[:3],
    }


def pytest_configure(config):
    threads = config.getoption("--threads", default=variants.THREADS)
    torch.set_num_threads(threads)


def pytest_sessionstart(session):
    print(f"\n[benchmarks] torch.set_num_threads({session.config.getoption('--threads')}) -> "
          f"torch.get_num_threads() = {torch.get_num_threads()}")


def pytest_addoption(parser):
    parser.addoption("--threads", type=int, default=variants.THREADS,
                     help="torch.set_num_threads for the run (default %(default)s). With "
                          "--threads=1 --benchmark-timer=time.process_time the times are CPU "
                          "times, a cross-check that other processes barely disturb")
    parser.addoption("--idle-wait", type=float, default=0.0, metavar="SECONDS",
                     help="before each benchmark wait up to SECONDS for the other processes "
                          "to leave the CPUs idle (busy < 15%%); the machine may be shared")


import pytest  # noqa: E402


@pytest.fixture
def quiet(request):
    """Waits (up to --idle-wait seconds) for an idle machine; returns the busy
    fraction seen just before the benchmark, which report.py shows."""
    deadline = time.monotonic() + request.config.getoption("--idle-wait")
    busy = busy_fraction(0.3)
    while busy > 0.15 and time.monotonic() < deadline:
        time.sleep(1.0)
        busy = busy_fraction(0.3)
    return busy


def cpu_ticks():
    """(busy ticks of all CPUs, ticks used by this process) from /proc."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        return sum(fields) - fields[3] - fields[4], sum(fields), int(own[11]) + int(own[12])
    except (OSError, IndexError, ValueError):
        return 0, 0, 0


@pytest.fixture
def bench(benchmark, quiet):
    """benchmark.pedantic with fixed rounds. Records the busy fraction seen just
    before the run and the share of all CPU time that *other* processes used
    while it ran (others_busy; ~0 on a quiet machine, 0.5 = one core taken)."""
    def run(fn, rounds, warmup=2, **extra):
        benchmark.extra_info["busy_before"] = round(quiet, 3)
        benchmark.extra_info.update(extra)
        before = cpu_ticks()
        try:
            return _pedantic(fn, rounds, warmup)
        finally:
            busy, total, own = (a - b for a, b in zip(cpu_ticks(), before))
            benchmark.extra_info["others_busy"] = (round(max(0, busy - own) / total, 3)
                                                   if total > 0 else None)

    def _pedantic(fn, rounds, warmup):
        def step():
            fn()  # the results are dropped inside the timed call, as a scan step drops its
            # batch: otherwise the previous round's output stays alive during the next
            # round and fresh-allocating variants run with two outputs in the caches

        return benchmark.pedantic(step, rounds=rounds, warmup_rounds=warmup, iterations=1)
    run.benchmark = benchmark
    return run
