"""B3D / B3D-SS through query-only models: query accounting, budgets,
reproducibility, resume, and the black-box boundary."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import trigscan
from trigscan.data import read_npz
from trigscan.models import QueryModel, load_onnx

TINY = dict(k=4, batch_size=4, max_steps=3, synthetic_samples=8)


def tiny(method):
    options = dict(TINY)
    if method == "b3d":
        options.pop("synthetic_samples")
    return options


@pytest.fixture(scope="module")
def onnx_model_and_images(quick_zoo):
    root, _ = quick_zoo
    folder = root / "badnets-cnn-grey"
    test = read_npz(folder / "test.npz")
    return folder / "model.onnx", torch.as_tensor(test["x"])[:16]


class CountingOracle:
    def __init__(self, model):
        self.model, self.received = model, 0

    def __call__(self, x):
        self.received += x.shape[0]
        return self.model.fn(x)


def counted(path):
    inner = trigscan.load_model(path)
    oracle = CountingOracle(inner)
    return QueryModel(oracle, inner.num_classes, inner.input_shape, outputs="logits"), oracle


def test_query_losses_are_the_cross_entropy_of_the_query_images():
    # the target's logit sits 60-70 below the other's: p_t ~ 1e-27, which a floor
    # on the probabilities (say 1e-12) would flatten into one constant loss
    from trigscan import ops
    from trigscan.scanners.b3d import B3D

    def logits(x):
        brightness = x.flatten(1).mean(dim=1)
        return torch.stack([torch.zeros_like(brightness), -60 - 10 * brightness], dim=1)

    g = torch.Generator().manual_seed(3)
    x = torch.rand(5, 1, 4, 4, generator=g)
    theta_m, theta_p = torch.randn(2, 1, 4, 4, generator=g), torch.randn(2, 1, 4, 4, generator=g)
    targets = torch.tensor([1, 0])
    model = QueryModel(logits, 2, (1, 4, 4), outputs="logits")
    scanner = B3D(k=3, batch_size=5, max_batch_images=24)  # 2 images per chunk: three chunks
    losses = scanner._query_losses(model, x, theta_m, theta_p, targets, 7, 2)
    batch = ops.nes_sample_stamp(x, theta_m, theta_p, 3, scanner.config.sigma, 7, 2, False)  # [T, 2k, N, ...]
    log_p = torch.log_softmax(logits(batch.reshape(-1, 1, 4, 4)).double(), dim=1).view(2, 6, 5, 2)
    expected = -log_p.gather(3, targets.view(2, 1, 1, 1).expand(2, 6, 5, 1)).squeeze(3).mean(dim=2)
    torch.testing.assert_close(losses, expected.float())
    assert losses[0].min() > 60 and losses[0].std() > 0.1  # the signal is kept
    assert model.queries == 2 * 6 * 5


def test_reported_queries_equal_what_the_model_received(onnx_model_and_images):
    path, x = onnx_model_and_images
    model, oracle = counted(path)
    result = trigscan.scan(model, x, method="b3d", classes=[0, 1, 2], **tiny("b3d"))
    assert result.queries == oracle.received > 0
    assert sum(c.queries for c in result.per_class) == oracle.received
    # 3 steps x 3 classes x (2k sampled rows + 1 mean-trigger row) x 4 images
    assert oracle.received == 3 * 3 * (2 * TINY["k"] + 1) * TINY["batch_size"]


def test_joint_sampling_halves_the_queries(onnx_model_and_images):
    path, x = onnx_model_and_images
    model, oracle = counted(path)
    trigscan.scan(model, x, method="b3d", classes=[0, 1], joint=True, **tiny("b3d"))
    assert oracle.received == 3 * 2 * (TINY["k"] + 1) * TINY["batch_size"]


def test_same_seed_same_result_other_seed_other_result(onnx_model_and_images):
    path, x = onnx_model_and_images
    runs = [trigscan.scan(trigscan.load_model(path), x, method="b3d", seed=seed, classes=[0, 1, 2],
                          **tiny("b3d")) for seed in (5, 5, 6)]
    stats = [[c.trigger["mask"] for c in r.per_class] for r in runs]
    assert all(torch.equal(a, b) for a, b in zip(stats[0], stats[1]))
    assert not all(torch.equal(a, b) for a, b in zip(stats[0], stats[2]))


def test_budget_gives_a_partial_result_without_exceeding_it(onnx_model_and_images):
    path, x = onnx_model_and_images
    model, oracle = counted(path)
    model.budget = 200  # a full run would need 3 steps x 108 queries
    result = trigscan.scan(model, x, method="b3d", classes=[0, 1, 2], **tiny("b3d"))
    assert result.partial and oracle.received <= 200 and result.queries == oracle.received
    assert any("budget" in note for note in result.notes)
    assert all(c.stop_reason.startswith("budget") for c in result.per_class)


def test_b3d_ss_needs_no_images(onnx_model_and_images):
    path, _ = onnx_model_and_images
    result = trigscan.scan(trigscan.load_model(path), None, method="b3d-ss", classes=[0, 1, 2],
                           **tiny("b3d-ss"))
    assert len(result.per_class) == 3 and result.queries > 0
    with pytest.raises(ValueError, match="images: B3D-SS scans with synthetic noise"):
        trigscan.scan(trigscan.load_model(path), torch.rand(4, 1, 24, 24), method="b3d-ss")


@pytest.mark.parametrize("shape", [(1, 16, 16), (3, 24, 24)])
def test_wrong_image_shape_for_the_onnx_model_is_a_clear_error(onnx_model_and_images, shape):
    path, _ = onnx_model_and_images
    with pytest.raises(ValueError, match="images: the model takes \\[B, 1, 24, 24\\]"):
        trigscan.scan(trigscan.load_model(path), torch.rand(4, *shape), method="b3d",
                      **tiny("b3d"))


def test_declared_probabilities_that_do_not_sum_to_one_are_rejected(onnx_model_and_images):
    _, x = onnx_model_and_images
    model = QueryModel(lambda b: torch.rand(b.shape[0], 10) + 0.5, 10, (1, 24, 24),
                       outputs="probabilities", retries=0)
    with pytest.raises(trigscan.models.ModelError, match="declared to return probabilities"):
        trigscan.scan(model, x, method="b3d", **tiny("b3d"))


@pytest.mark.parametrize("option, value", [("k", 0), ("sigma", 0.0), ("init_mask", 1.0),
                                           ("batched", False), ("max_batch_images", 0),
                                           ("synthetic_samples", 0)])
def test_bad_options_name_the_option(option, value):
    method = "b3d-ss" if option == "synthetic_samples" else "b3d"
    with pytest.raises(ValueError, match=f"^{option}: "):
        trigscan.scanners.get(method)(**{option: value})


def test_the_baseline_needs_two_samples():
    with pytest.raises(ValueError, match="^baseline: needs k >= 2"):
        trigscan.scanners.get("b3d")(baseline=True, k=1)
    trigscan.scanners.get("b3d")(baseline=True, k=2)


def test_a_model_returning_too_few_classes_is_rejected(onnx_model_and_images):
    _, x = onnx_model_and_images
    model = QueryModel(lambda b: torch.rand(b.shape[0], 5), 10, (1, 24, 24), outputs="logits",
                       retries=0)
    with pytest.raises(trigscan.models.ModelError, match="5 classes"):
        trigscan.scan(model, x, method="b3d", **tiny("b3d"))


# ---------------------------------------------------------------------------
# Resume: a B3D scan killed with SIGKILL continues bitwise where it stopped
# ---------------------------------------------------------------------------
RESUME = dict(k=4, batch_size=4, max_steps=12, patience=2)
PER_ITERATION = 3 * (2 * RESUME["k"] + 1) * RESUME["batch_size"]  # 3 classes

CHILD = r"""
import json, sys, time
import torch
torch.set_num_threads(1)
import trigscan
from trigscan import checkpoint as ck
from trigscan.data import read_npz
from trigscan.models import QueryModel

args = json.loads(sys.argv[1])
inner = trigscan.load_model(args["model"])
received = [0]

def oracle(x):
    received[0] += x.shape[0]
    return inner.fn(x)

model = QueryModel(oracle, inner.num_classes, inner.input_shape, outputs="logits")
original = ck.Checkpoint.save

def save(self, state, **kw):
    time.sleep(args["delay"])  # slow iterations, so that the parent can kill the scan mid-way
    return original(self, state, **kw)

ck.Checkpoint.save = save
x = None if args["method"] == "b3d-ss" else torch.as_tensor(read_npz(args["data"])["x"])[:16]
result = trigscan.scan(model, x, method=args["method"], seed=3, classes=[0, 1, 2],
                       checkpoint=args["checkpoint"], progress=False, **args["options"])
torch.save({"per_class": [c.to_dict() for c in result.per_class],
            "triggers": [c.trigger for c in result.per_class], "anomaly": result.anomaly.values,
            "queries": result.queries, "received": received[0], "notes": result.notes}, args["out"])
"""


def run_child(folder, method, out, checkpoint=None, delay=0.0, kill_after_step=None):
    """Run one scan in a child process (one thread); with kill_after_step,
    SIGKILL it once its checkpoint holds at least that many iterations."""
    options = dict(RESUME, **({"synthetic_samples": 8} if method == "b3d-ss" else {}))
    args = {"model": str(folder / "model.onnx"), "data": str(folder / "test.npz"), "method": method,
            "options": options, "checkpoint": None if checkpoint is None else str(checkpoint),
            "out": str(out), "delay": delay}
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if kill_after_step is None:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        return torch.load(out, weights_only=True)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        if checkpoint.exists() and saved_state(checkpoint)["step"] >= kill_after_step:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the scan ended before it could be killed: " + proc.stderr.read()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return None


def saved_state(path):
    return torch.load(path, weights_only=True)["state"]


@pytest.mark.parametrize("method", ["b3d", "b3d-ss"])
def test_a_killed_scan_resumes_bitwise_with_the_right_query_count(onnx_model_and_images, tmp_path,
                                                                     method):
    path, _ = onnx_model_and_images
    folder = path.parent
    whole = run_child(folder, method, tmp_path / "whole.pt")
    assert whole["queries"] == whole["received"] == RESUME["max_steps"] * PER_ITERATION

    checkpoint = tmp_path / "scan.ckpt"
    run_child(folder, method, tmp_path / "killed.pt", checkpoint, delay=0.3, kill_after_step=4)
    state = saved_state(checkpoint)
    done = state["step"]
    assert 4 <= done < RESUME["max_steps"] and not state.get("complete")
    assert state["queries_used"] == done * PER_ITERATION

    resumed = run_child(folder, method, tmp_path / "resumed.pt", checkpoint)
    assert any(f"resumed at iteration {done}" in note for note in resumed["notes"])
    assert resumed["per_class"] == whole["per_class"] and resumed["anomaly"] == whole["anomaly"]
    for a, b in zip(resumed["triggers"], whole["triggers"]):
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    # queries before the kill (as saved) + the ones this run sent = the whole scan's
    assert resumed["received"] == whole["queries"] - done * PER_ITERATION
    assert resumed["queries"] == whole["queries"]
    assert saved_state(checkpoint)["complete"]

    again = run_child(folder, method, tmp_path / "again.pt", checkpoint)  # complete: no query
    assert again["received"] == 0 and again["queries"] == whole["queries"]
    assert again["per_class"] == whole["per_class"]


def test_a_scan_stopped_by_its_budget_continues_with_a_new_budget(onnx_model_and_images, tmp_path):
    path, x = onnx_model_and_images
    checkpoint = tmp_path / "scan.ckpt"
    options = dict(RESUME, max_steps=6)
    whole = trigscan.scan(trigscan.load_model(path), x, method="b3d", seed=1, classes=[0, 1, 2],
                          **options)
    first = load_onnx(path, budget=2 * PER_ITERATION + 50)  # stops in iteration 3
    part = trigscan.scan(first, x, method="b3d", seed=1, classes=[0, 1, 2], checkpoint=checkpoint,
                         **options)
    assert part.partial and saved_state(checkpoint)["step"] == 2
    model, oracle = counted(path)
    rest = trigscan.scan(model, x, method="b3d", seed=1, classes=[0, 1, 2], checkpoint=checkpoint,
                         **options)
    assert not rest.partial and oracle.received == 4 * PER_ITERATION
    assert rest.queries == whole.queries == 6 * PER_ITERATION
    assert [c.to_dict() for c in rest.per_class] == [c.to_dict() for c in whole.per_class]
