"""Checkpoint and resume: a scan killed with SIGKILL and run again with the
same arguments continues from its last completed step and returns exactly the
result of a scan that was never interrupted (same seed); checkpoints of other
scans and damaged files are refused with a clear error.

The killed scans run in child processes; the reference and resumed scans run
here (all on one thread, so that every run does the same float arithmetic),
except for the CLI test, where every run is a `trigscan scan` process. The
model is a small random-weight TorchScript CNN: resuming is about reproducing
the arithmetic, not about detection, and the options are chosen so that rows
stop at different steps (early stop, L-RED's pi reached, never reached), some
before and some after the interruption.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import trigscan
from trigscan import checkpoint as ck
from trigscan.checkpoint import Checkpoint, CheckpointMismatch

ROOT = Path(__file__).resolve().parents[1]

# method -> options: few steps, rows finishing at different times
CASES = {
    "nc": {"max_steps": 40, "patience": 2, "early_stop_patience": 3},
    "nc-loop": {"max_steps": 40, "patience": 2, "early_stop_patience": 3, "batched": False},
    "lred": {"max_steps": 40, "images_per_class": 3, "delta": 0.05},
}


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 36, 5)

    def forward(self, x):
        return self.fc(F.max_pool2d(F.relu(self.conv(x)), 2).flatten(1))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A TorchScript model file (5 classes, 1x12x12) and 20 images with labels."""
    root = tmp_path_factory.mktemp("resume")
    g = torch.Generator().manual_seed(1)
    x = torch.rand(20, 1, 12, 12, generator=g)
    y = torch.arange(20) % 5
    torch.jit.trace(Net(), x[:2]).save(str(root / "model.pt"))
    torch.save({"x": x, "y": y}, root / "data.pt")
    return root


# ---------------------------------------------------------------------------
# The child: a scan with slow steps, to be killed
# ---------------------------------------------------------------------------
CHILD = r"""
import json, sys, time
import torch
torch.set_num_threads(1)
import trigscan
from trigscan import checkpoint as ck

args = json.loads(sys.argv[1])
data = torch.load(args["data"], weights_only=True)
original = ck.Checkpoint.save

def slow_save(self, state, **kw):
    time.sleep(0.1)  # a slow step, so that the parent kills the scan mid-way
    return original(self, state, **kw)

ck.Checkpoint.save = slow_save
trigscan.scan(trigscan.load_model(args["model"]), data["x"], data["y"], method=args["method"],
              seed=args["seed"], checkpoint=args["checkpoint"], progress=False, **args["options"])
"""


def child_args(inputs, case, checkpoint, seed=2):
    return ["-c", CHILD, json.dumps({
        "model": str(inputs / "model.pt"), "data": str(inputs / "data.pt"), "method": case.split("-")[0],
        "options": CASES[case], "seed": seed, "checkpoint": str(checkpoint)})]


def child_env():
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "OMP_NUM_THREADS": "1"}


def scan_here(inputs, case, checkpoint=None, seed=2) -> dict:
    """The child's scan in this process, on one thread as the child (the same
    float arithmetic); returns the result and the steps of the states saved."""
    saved = []
    original = ck.Checkpoint.save

    def recording_save(self, state, **kw):
        saved.append(state.get("step", (state.get("run") or {}).get("step")))
        return original(self, state, **kw)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    ck.Checkpoint.save = recording_save
    try:
        data = torch.load(inputs / "data.pt", weights_only=True)
        result = trigscan.scan(trigscan.load_model(inputs / "model.pt"), data["x"], data["y"],
                               method=case.split("-")[0], seed=seed, checkpoint=checkpoint,
                               progress=False, **CASES[case])
    finally:
        ck.Checkpoint.save = original
        torch.set_num_threads(threads)
    return {"per_class": [c.to_dict() for c in result.per_class],
            "triggers": [c.trigger for c in result.per_class],
            "anomaly": result.anomaly.to_dict(), "backdoored": result.backdoored,
            "targets": result.targets, "saved": saved}


def saved_step(path: Path) -> tuple[int, bool]:
    """(steps completed, complete) of the run in a checkpoint file (the loop
    index of the run in progress; row-by-row runs also count finished rows)."""
    state = torch.load(path, weights_only=True)["state"]
    if "run" in state:  # the white-box driver
        run = state["run"]
        return (len(state["done"]), 0 if run is None else run["step"]), bool(state.get("complete"))
    return (0, state["step"]), bool(state.get("complete"))


def kill_mid_scan(inputs, case, checkpoint, after=(0, 8), timeout=300.0):
    """Start the scan slowed down, SIGKILL it once the checkpoint holds `after`
    (finished rows, steps) or more; returns the progress the file holds after the kill."""
    proc = subprocess.Popen([sys.executable, *child_args(inputs, case, checkpoint)],
                            env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    try:
        while True:
            assert proc.poll() is None, "the scan ended before it could be killed: " + proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no checkpoint progress before the timeout"
            if checkpoint.exists() and saved_step(checkpoint)[0] >= after:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.02)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    progress, complete = saved_step(checkpoint)
    assert not complete and progress >= after
    return progress


def assert_same_result(a: dict, b: dict):
    assert a["per_class"] == b["per_class"]  # statistic, asr, converged, steps, stop reason: exact
    assert a["anomaly"] == b["anomaly"] and a["backdoored"] == b["backdoored"] and a["targets"] == b["targets"]
    assert len(a["triggers"]) == len(b["triggers"])
    for ta, tb in zip(a["triggers"], b["triggers"]):
        assert ta.keys() == tb.keys()
        for key in ta:
            assert torch.equal(ta[key], tb[key]), key


@pytest.mark.parametrize("case", list(CASES))
def test_sigkilled_scan_resumes_to_the_uninterrupted_result(inputs, tmp_path, case):
    """Killed in a child process, resumed here: the resumed scan continues the
    killed process's arithmetic and ends bitwise where an uninterrupted scan ends."""
    reference = scan_here(inputs, case)
    steps = [row["steps"] for row in reference["per_class"]]
    # the scan must have rows that stop at different steps, after the kill
    assert len(set(steps)) > 2 and max(steps) > 12, steps

    checkpoint = tmp_path / "ckpt" / f"{case}.pt"
    after = (1, 3) if case == "nc-loop" else (0, 8)  # the row-by-row run: inside its second row
    progress = kill_mid_scan(inputs, case, checkpoint, after=after)

    resumed = scan_here(inputs, case, checkpoint)
    # it continued after the saved step (not from the start; the kill is
    # several steps before the end of any row) ...
    assert resumed["saved"][0] == progress[1] + 1, (resumed["saved"][:3], progress)
    # ... and ended where the uninterrupted scan ended
    assert_same_result(resumed, reference)
    assert saved_step(checkpoint)[1], "the finished scan leaves its checkpoint marked complete"

    again = scan_here(inputs, case, checkpoint)
    assert again["saved"] == []  # complete: nothing optimised, nothing saved
    assert_same_result(again, reference)


# ---------------------------------------------------------------------------
# In-process interruption (an exception instead of a kill) for every resumable method
# ---------------------------------------------------------------------------
class Interrupt(Exception):
    pass


# case -> (options, the save that is interrupted): L-RED after some rows reached pi
IN_PROCESS = {
    "nc": ({"max_steps": 12, "patience": 2, "early_stop_patience": 2}, 5),
    "tabor": ({"max_steps": 12, "patience": 2}, 5),
    "pixel": ({"max_steps": 12, "patience": 2}, 5),
    "pixel-pair": ({"max_steps": 3, "mode": "pair", "batched": False}, 8),
    "lred": (CASES["lred"], 25),
    "ured": (CASES["lred"], 25),
}


@pytest.mark.parametrize("case", list(IN_PROCESS))
def test_interrupted_scan_resumes_bitwise(inputs, tmp_path, monkeypatch, case):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = trigscan.load_model(inputs / "model.pt")
        data = torch.load(inputs / "data.pt", weights_only=True)
        method, (options, interrupted) = case.split("-")[0], IN_PROCESS[case]

        def scan(**kw):
            return trigscan.scan(model, data["x"], data["y"], method=method, seed=3, progress=False,
                                 **options, **kw)

        reference = scan()
        scan(checkpoint=tmp_path / "uninterrupted.pt")
        path = tmp_path / "c.pt"
        original, calls = ck.Checkpoint.save, []

        def failing_save(self, state, **kw):
            calls.append(1)
            if len(calls) == interrupted:
                raise Interrupt
            return original(self, state, **kw)

        monkeypatch.setattr(ck.Checkpoint, "save", failing_save)
        with pytest.raises(Interrupt):
            scan(checkpoint=path)
        monkeypatch.setattr(ck.Checkpoint, "save", original)
        assert path.exists() and not saved_step(path)[1]
        resumed = scan(checkpoint=path)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(resumed.per_class, reference.per_class):
        assert a.to_dict() == b.to_dict()
        for key in b.trigger:
            assert torch.equal(a.trigger[key], b.trigger[key])
    assert resumed.anomaly.to_dict() == reference.anomaly.to_dict()
    assert resumed.targets == reference.targets
    # the whole final state too (e.g. L-RED's source weights of rows done before the interruption)
    assert_same_state(torch.load(path, weights_only=True), torch.load(tmp_path / "uninterrupted.pt", weights_only=True))


def assert_same_state(a, b, where="state"):
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same_state(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_min_interval_spaces_saves_but_always_writes_the_final_state(inputs, tmp_path, monkeypatch):
    model = trigscan.load_model(inputs / "model.pt")
    data = torch.load(inputs / "data.pt", weights_only=True)
    original, written = ck.Checkpoint.save, []

    def counting_save(self, state, **kw):
        wrote = original(self, state, **kw)
        written.append(wrote)
        return wrote

    monkeypatch.setattr(ck.Checkpoint, "save", counting_save)
    for interval, expected in ((0.0, 6 + 1), (3600.0, 2)):  # every step + final; first step + final
        written.clear()
        path = tmp_path / f"every-{interval}.pt"
        trigscan.scan(model, data["x"], data["y"], method="nc", max_steps=6, early_stop_patience=None,
                      progress=False, checkpoint=Checkpoint(path, min_interval=interval))
        assert sum(written) == expected and len(written) == 7
        assert saved_step(path)[1]
    with pytest.raises(ValueError, match="min_interval"):
        Checkpoint(tmp_path / "x.pt", min_interval=-1)


# ---------------------------------------------------------------------------
# Refusals: another scan's checkpoint, a damaged file
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def written(inputs, tmp_path_factory):
    """A checkpoint of a short NC scan (seed 1), interrupted after 3 steps."""
    path = tmp_path_factory.mktemp("written") / "nc.pt"
    model = trigscan.load_model(inputs / "model.pt")
    data = torch.load(inputs / "data.pt", weights_only=True)
    original = ck.Checkpoint.save
    calls = []

    def failing_save(self, state, **kw):
        calls.append(1)
        if len(calls) == 4:
            raise Interrupt
        return original(self, state, **kw)

    ck.Checkpoint.save = failing_save
    try:
        with pytest.raises(Interrupt):
            trigscan.scan(model, data["x"], data["y"], method="nc", seed=1, max_steps=20,
                          progress=False, checkpoint=path)
    finally:
        ck.Checkpoint.save = original
    return path, model, data


@pytest.mark.parametrize("change, differs", [
    ({"seed": 2}, "seed"),
    ({"max_steps": 21}, "config"),
    ({"classes": [0, 1, 2]}, "classes"),
    ({"method": "tabor"}, "method"),
    ({"data": "other"}, "data"),
    ({"model": "other"}, "model"),
])
def test_checkpoint_of_another_scan_is_refused(written, tmp_path, change, differs):
    path, model, data = written
    x = data["x"].flip(0) if change.get("data") else data["x"]
    if change.get("model"):
        model = torch.jit.trace(nn.Sequential(nn.Flatten(), nn.Linear(144, 5)), x[:2])
    kwargs = {"seed": 1, "max_steps": 20, **{k: v for k, v in change.items() if k not in ("data", "model")}}
    before = path.read_bytes()
    with pytest.raises(CheckpointMismatch, match=rf"checkpoint .*nc\.pt: written by a different scan "
                                                 rf"\(differs in [a-z, ]*{differs}"):
        trigscan.scan(model, x, data["y"], progress=False, checkpoint=path, **kwargs)
    assert path.read_bytes() == before  # refused, not overwritten


def test_the_same_scan_accepts_it(written, tmp_path):
    path, model, data = written
    copy = tmp_path / "nc.pt"
    copy.write_bytes(path.read_bytes())
    result = trigscan.scan(model, data["x"], data["y"], method="nc", seed=1, max_steps=20,
                           progress=False, checkpoint=copy)
    assert len(result.per_class) == 5 and saved_step(copy)[1]


def damaged(path: Path, tmp_path: Path, how: str) -> Path:
    out = tmp_path / "damaged.pt"
    raw = path.read_bytes()
    if how == "truncated":
        out.write_bytes(raw[: len(raw) // 2])
    elif how == "garbage":
        out.write_bytes(os.urandom(1000))
    elif how == "empty":
        out.write_bytes(b"")
    elif how == "pickle":
        import pickle

        out.write_bytes(pickle.dumps(Interrupt("not data")))  # an object: never unpickled
    elif how == "not-a-checkpoint":
        torch.save({"weights": torch.zeros(3)}, out)
    else:  # the fingerprint fits but the state lost a piece
        blob = torch.load(path, weights_only=True)
        del blob["state"]["run"]["optimizer"]
        torch.save(blob, out)
    return out


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's, on the pickle file it refuses
@pytest.mark.parametrize("how, message", [
    ("truncated", "unreadable"), ("garbage", "unreadable"), ("empty", "unreadable"),
    ("pickle", "unreadable"), ("not-a-checkpoint", "not a trigscan checkpoint"),
    ("state", "its state does not fit this scan .*optimizer"),
])
def test_damaged_checkpoint_is_refused(written, tmp_path, how, message):
    path, model, data = written
    bad = damaged(path, tmp_path, how)
    with pytest.raises(CheckpointMismatch, match=rf"checkpoint .*damaged\.pt: {message}.*delete it"):
        trigscan.scan(model, data["x"], data["y"], method="nc", seed=1, max_steps=20,
                      progress=False, checkpoint=bad)


def test_methods_that_cannot_resume_say_so(inputs, tmp_path):
    from trigscan import scanners

    waiting = [name for name in scanners.available() if not scanners.get(name).resumable]
    for name in ("nc", "tabor", "pixel", "lred", "ured"):
        assert scanners.get(name).resumable
    model = trigscan.load_model(inputs / "model.pt")
    data = torch.load(inputs / "data.pt", weights_only=True)
    for name in waiting:
        with pytest.raises(ValueError, match=f"checkpoint: method '{name}' cannot resume"):
            trigscan.scan(model, data["x"], data["y"], method=name, checkpoint=tmp_path / "x.pt")


# ---------------------------------------------------------------------------
# The command line: `trigscan scan` killed mid-scan and run again
# ---------------------------------------------------------------------------
# the real CLI entry point; the test slows its checkpoint saves (TRIGSCAN_TEST_SAVE_DELAY)
# and records the steps of the states it saves (TRIGSCAN_TEST_SAVED)
CLI = r"""
import json, os, sys, time
from trigscan import checkpoint as ck
from trigscan.cli import main

original = ck.Checkpoint.save
delay = float(os.environ.get("TRIGSCAN_TEST_SAVE_DELAY", "0"))

def save(self, state, **kw):
    time.sleep(delay)
    with open(os.environ["TRIGSCAN_TEST_SAVED"], "a") as f:
        f.write(json.dumps([self.path.name, state.get("step", (state.get("run") or {}).get("step"))]) + "\n")
    return original(self, state, **kw)

ck.Checkpoint.save = save
sys.exit(main(sys.argv[1:]))
"""


def without_elapsed(value):
    if isinstance(value, dict):
        return {k: without_elapsed(v) for k, v in value.items() if k != "elapsed_s"}
    if isinstance(value, list):
        return [without_elapsed(v) for v in value]
    return value


def test_cli_scan_killed_and_rerun_writes_the_same_report(inputs, tmp_path):
    """NC then L-RED in one command, killed inside L-RED; the same command run
    again reads NC's finished result back, resumes L-RED, and writes the
    report.json of the uninterrupted command (elapsed times aside)."""
    import numpy as np

    data = torch.load(inputs / "data.pt", weights_only=True)
    np.savez(tmp_path / "data.npz", x=data["x"].numpy(), y=data["y"].numpy())
    out = tmp_path / "out"
    command = [sys.executable, "-c", CLI, "scan", str(inputs / "model.pt"), "--data", str(tmp_path / "data.npz"),
               "--method", "nc", "--method", "lred", "--seed", "2", "--out", str(out), "--quiet"]
    for name, value in CASES["nc"].items():
        command += ["--option", f"nc.{name}={json.dumps(value)}"]
    for name, value in CASES["lred"].items():
        command += ["--option", f"lred.{name}={json.dumps(value)}"]

    def run(out_dir, saved, delay=0.0):
        env = {**child_env(), "TRIGSCAN_TEST_SAVED": str(saved), "TRIGSCAN_TEST_SAVE_DELAY": str(delay)}
        argv = command[:command.index("--out") + 1] + [str(out_dir)] + command[command.index("--out") + 2:]
        return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    proc = run(tmp_path / "whole", tmp_path / "whole.log")
    _, err = proc.communicate(timeout=600)
    assert proc.returncode in (0, 10), err[-3000:]
    whole = json.loads((tmp_path / "whole" / "report.json").read_text())

    proc = run(out, tmp_path / "killed.log", delay=0.1)
    checkpoint = out / "checkpoints" / "lred.pt"
    deadline = time.monotonic() + 300
    try:
        while not (checkpoint.exists() and saved_step(checkpoint)[0] >= (0, 8)):
            assert proc.poll() is None, "the scan ended before it could be killed: " + proc.stderr.read()[-2000:]
            assert time.monotonic() < deadline, "no L-RED checkpoint before the timeout"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL and not (out / "report.json").exists()
    progress, complete = saved_step(checkpoint)
    assert not complete

    proc = run(out, tmp_path / "resumed.log")
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == (10 if whole["backdoored"] else 0), err[-3000:]
    saves = [json.loads(line) for line in (tmp_path / "resumed.log").read_text().splitlines()]
    assert all(name == "lred.pt" for name, _ in saves)  # NC was not scanned again
    assert saves[0][1] == progress[1] + 1  # L-RED continued after its last saved step
    resumed = json.loads((out / "report.json").read_text())
    assert [r["method"] for r in resumed["results"]] == ["nc", "lred"]
    for key in ("model", "data", "scan", "backdoored", "targets", "results"):
        assert without_elapsed(resumed[key]) == without_elapsed(whole[key]), key
    assert without_elapsed(resumed) == without_elapsed(whole)
    for method in ("nc", "lred"):  # the triggers, bitwise
        with np.load(out / "triggers" / f"{method}.npz") as a, \
                np.load(tmp_path / "whole" / "triggers" / f"{method}.npz") as b:
            assert sorted(a.files) == sorted(b.files) and a.files
            for key in a.files:
                assert np.array_equal(a[key], b[key]), (method, key)
