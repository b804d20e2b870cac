"""Model adapters: white-box wrapping, query-only models, ONNX loading, and
the errors a bad or untrusted model gets."""
import os
import pickle
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import trigscan
from trigscan.models import (BudgetExhausted, ModelError, QueryModel, WhiteBoxModel,
                             as_query_model, load_onnx)


def tiny_net(classes=10, channels=1):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(channels, 4, 3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, classes)).eval()


class Counting:
    """A query-only oracle that counts every image it receives."""

    def __init__(self, net, fail_first=0, outputs="logits"):
        self.net, self.received, self.calls, self.fail_first = net, 0, 0, fail_first
        self.outputs = outputs

    def __call__(self, x):
        self.calls += 1
        self.received += x.shape[0]
        if self.calls <= self.fail_first:
            raise ConnectionError("transient")
        with torch.no_grad():
            out = self.net(x)
        return torch.softmax(out, 1).numpy() if self.outputs == "probabilities" else out


def test_query_model_counts_every_image_and_batches():
    oracle = Counting(tiny_net())
    model = QueryModel(oracle, 10, (1, 8, 8), batch_size=7, outputs="logits")
    probs = model(torch.rand(20, 1, 8, 8))
    assert probs.shape == (20, 10)
    torch.testing.assert_close(probs.sum(1), torch.ones(20))
    assert model.queries == oracle.received == 20
    assert oracle.calls == 3  # 7 + 7 + 6


def test_budget_stops_before_sending_the_batch_that_would_exceed_it():
    oracle = Counting(tiny_net())
    model = QueryModel(oracle, 10, (1, 8, 8), batch_size=8, budget=20, outputs="logits")
    model(torch.rand(16, 1, 8, 8))
    with pytest.raises(BudgetExhausted):
        model(torch.rand(8, 1, 8, 8))
    assert model.queries == oracle.received == 16


def test_transient_errors_are_retried_and_counted():
    oracle = Counting(tiny_net(), fail_first=2)
    model = QueryModel(oracle, 10, (1, 8, 8), outputs="logits", retries=3, backoff=0.0)
    model(torch.rand(5, 1, 8, 8))
    assert oracle.calls == 3 and model.queries == oracle.received == 15


def test_persistent_errors_fail_clearly_after_retries():
    oracle = Counting(tiny_net(), fail_first=100)
    model = QueryModel(oracle, 10, (1, 8, 8), outputs="logits", retries=2, backoff=0.0)
    with pytest.raises(ModelError, match="failed after 2 retries.*ConnectionError"):
        model(torch.rand(3, 1, 8, 8))
    assert oracle.calls == 3


@pytest.mark.parametrize("bad_output, message", [
    (lambda x: torch.rand(x.shape[0], 7), "7 classes"),
    (lambda x: torch.full((x.shape[0], 10), float("nan")), "NaN"),
    (lambda x: torch.rand(x.shape[0]), "shape"),
    (lambda x: "cat", "not class scores"),
])
def test_garbage_outputs_are_rejected(bad_output, message):
    model = QueryModel(bad_output, 10, (1, 8, 8), outputs="logits", retries=0)
    with pytest.raises(ModelError, match=message):
        model(torch.rand(2, 1, 8, 8))


def test_declared_probabilities_must_be_probabilities():
    model = QueryModel(Counting(tiny_net(), outputs="logits"), 10, (1, 8, 8),
                       outputs="probabilities")
    with pytest.raises(ModelError, match="declared to return probabilities"):
        model(torch.rand(4, 1, 8, 8))
    ok = QueryModel(Counting(tiny_net(), outputs="probabilities"), 10, (1, 8, 8),
                    outputs="probabilities")
    assert ok(torch.rand(4, 1, 8, 8)).shape == (4, 10)


def test_auto_outputs_detects_logits_and_probabilities():
    net = tiny_net()
    x = torch.rand(4, 1, 8, 8)
    expected = torch.softmax(net(x), 1).detach()
    for outputs in ("logits", "probabilities"):
        model = QueryModel(Counting(net, outputs=outputs), 10, (1, 8, 8), outputs="auto")
        torch.testing.assert_close(model(x), expected)


def test_log_probabilities_keep_what_float32_probabilities_round_to_zero():
    # a margin of 120: exp(-120) is below float32's smallest subnormal
    logits = torch.tensor([[120.0, 0.0, -5.0], [1.0, 2.0, 3.0]])
    model = QueryModel(lambda x: logits[:x.shape[0]], 3, (1, 2, 2), outputs="logits")
    x = torch.rand(2, 1, 2, 2)
    assert model(x)[0, 1] == 0
    torch.testing.assert_close(model.log_probabilities(x), torch.log_softmax(logits.double(), 1).float())
    assert model.queries == 4  # a query is a query, whichever form the answer takes

    probs = torch.tensor([[1.0, 0.0, 0.0], [0.2, 0.3, 0.5]])
    model = QueryModel(lambda x: probs[:x.shape[0]], 3, (1, 2, 2), outputs="probabilities")
    log_p = model.log_probabilities(x)
    assert log_p[0, 1] == pytest.approx(np.log(np.finfo(np.float32).tiny))  # a 0 answer: floored
    torch.testing.assert_close(log_p[1], probs[1].log())


def test_wrong_image_shape_names_the_argument():
    model = QueryModel(Counting(tiny_net()), 10, (1, 8, 8), outputs="logits")
    with pytest.raises(ValueError, match="images: the model takes"):
        model(torch.rand(2, 3, 8, 8))


@pytest.mark.parametrize("kwargs, name", [
    (dict(num_classes=1), "num_classes"), (dict(outputs="scores"), "outputs"),
    (dict(batch_size=0), "batch_size"), (dict(budget=0), "budget"),
    (dict(input_shape=(8, 8)), "input_shape"),
])
def test_query_model_arguments_are_validated(kwargs, name):
    args = dict(fn=lambda x: x, num_classes=10, input_shape=(1, 8, 8))
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        QueryModel(**args)


def test_white_box_normalisation_is_applied_inside_the_adapter():
    net = tiny_net(channels=3)
    net[0] = nn.Conv2d(3, 4, 3)
    mean, std = [0.1, 0.2, 0.3], [0.5, 0.25, 2.0]
    wrapped = WhiteBoxModel(net, mean, std)
    x = torch.rand(2, 3, 8, 8)
    expected = net((x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1))
    torch.testing.assert_close(wrapped(x), expected)
    with pytest.raises(ValueError, match="std"):
        WhiteBoxModel(net, mean, [1.0, 0.0, 1.0])


def test_white_box_model_that_raises_is_reported():
    wrapped = WhiteBoxModel(tiny_net())
    with pytest.raises(ModelError, match="model raised RuntimeError on a batch of shape"):
        wrapped(torch.rand(2, 3, 8, 8))  # wrong channel count for the conv


def test_torchscript_round_trip_and_pickles_are_refused(tmp_path):
    net = tiny_net()
    path = tmp_path / "m.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(net), str(path))
    loaded = trigscan.load_model(path)
    x = torch.rand(3, 1, 8, 8)
    torch.testing.assert_close(loaded(x), net(x))

    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"weights": np.zeros(3)}))
    with pytest.raises(ValueError, match="not a TorchScript archive.*Pickled models are refused"):
        trigscan.load_model(evil)
    with pytest.raises(FileNotFoundError, match="no such file"):
        trigscan.load_model(tmp_path / "missing.pt")


def export_onnx(net, path, shape):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.zeros(1, *shape),), str(path), input_names=["x"],
                          output_names=["logits"], dynamic_axes={"x": {0: "n"}}, dynamo=False)


def test_onnx_model_is_query_only_and_matches_torch(tmp_path):
    net = tiny_net()
    path = tmp_path / "m.onnx"
    export_onnx(net, path, (1, 8, 8))
    model = trigscan.load_model(path)
    assert isinstance(model, QueryModel) and model.input_shape == (1, 8, 8)
    assert model.num_classes == 10
    x = torch.rand(5, 1, 8, 8)
    torch.testing.assert_close(model(x), torch.softmax(net(x), 1).detach(), atol=1e-5, rtol=1e-4)
    assert model.queries == 5
    with pytest.raises(ValueError, match="images: the model takes \\[B, 1, 8, 8\\]"):
        model(torch.rand(2, 1, 9, 9))


def test_corrupted_onnx_is_a_clear_error(tmp_path):
    path = tmp_path / "broken.onnx"
    path.write_bytes(b"\x08\x07garbage that is not a protobuf graph")
    with pytest.raises(ValueError, match="not a valid ONNX model"):
        load_onnx(path)


def test_nn_module_can_be_queried_as_a_black_box():
    net = tiny_net()
    model = as_query_model(net, input_shape=(1, 8, 8))
    x = torch.rand(3, 1, 8, 8)
    torch.testing.assert_close(model(x), torch.softmax(net(x), 1).detach())
    with pytest.raises(ValueError, match="input_shape"):
        as_query_model(net)
    with pytest.raises(TypeError, match="model"):
        as_query_model("not a model")


def scripted_bn_net(channels=3, classes=5):
    """Conv, batch-norm (non-trivial running statistics), ReLU, max-pool, linear: what freezing folds."""
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(channels, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Flatten(), nn.Linear(6 * 4 * 4, classes))
    net[1].running_mean.uniform_(-0.5, 0.5)
    net[1].running_var.uniform_(0.5, 2.0)
    net[1].weight.data.uniform_(0.5, 1.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.script(net.eval())


def test_fast_cpu_copy_agrees_in_values_and_input_gradients_and_leaves_the_module_alone():
    from trigscan.models import fast_cpu_copy

    module = scripted_bn_net()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    fast = fast_cpu_copy(module)
    x = torch.rand(7, 3, 8, 8, requires_grad=True)
    want = module(x)
    (g_want,) = torch.autograd.grad(want.logsumexp(1).sum(), x)
    got = fast(x)
    (g_got,) = torch.autograd.grad(got.logsumexp(1).sum(), x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_got, g_want, rtol=1e-4, atol=1e-5)
    assert list(fast.parameters()) == []  # frozen: the weights are constants now
    after = module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert module[0].weight.is_contiguous()  # the caller's module keeps its layout


def test_white_box_scans_a_fast_copy_of_torchscript_only_when_asked_and_on_the_cpu(monkeypatch):
    module = scripted_bn_net()
    x = torch.rand(4, 3, 8, 8)
    wrapped = WhiteBoxModel(module)
    wrapped.probe(x)
    fast, note = wrapped.for_scanning(x)
    assert fast is not wrapped and note is None and fast.num_classes == 5
    torch.testing.assert_close(fast(x), wrapped(x), rtol=1e-5, atol=1e-5)
    exact = WhiteBoxModel(module, optimize=False)
    assert exact.for_scanning(x) == (exact, None)
    monkeypatch.setenv("TRIGSCAN_FAST_COPY", "0")
    assert not WhiteBoxModel(module).optimize and WhiteBoxModel(module, optimize=True).optimize
    plain = WhiteBoxModel(tiny_net())  # an nn.Module is scanned as given
    assert plain.for_scanning(torch.rand(2, 1, 8, 8)) == (plain, None)
    with pytest.raises(TypeError, match="optimize"):
        WhiteBoxModel(module, optimize="yes")


@pytest.mark.parametrize("broken, message", [("raises", "frozen copy failed"), ("differs", "different scores")])
def test_a_fast_copy_that_fails_or_disagrees_is_not_used_and_the_result_says_so(monkeypatch, broken, message):
    import trigscan.models as models

    def bad_copy(module):
        if broken == "raises":
            raise RuntimeError("cannot freeze")
        return torch.jit.script(_Shifted(module))

    monkeypatch.setattr(models, "fast_cpu_copy", bad_copy)
    module = scripted_bn_net(channels=1)
    x = torch.rand(20, 1, 8, 8)
    wrapped = WhiteBoxModel(module)
    wrapped.probe(x)
    same, note = wrapped.for_scanning(x)
    assert same is wrapped and message in note
    result = trigscan.scan(module, x, torch.arange(20) % 5, method="nc", max_steps=2)
    assert any(message in n for n in result.notes)


class _Shifted(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x) + 1.0


def test_scans_keep_freed_memory_for_the_next_step_unless_told_not_to():
    """After a scan, a 12 MB block comes from the heap (no new mmap'd block), so
    the next step's activations reuse memory instead of faulting in fresh pages."""
    import subprocess
    import sys

    probe = """
import ctypes, sys, torch, trigscan
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL("libc.so.6"); libc.mallinfo2.restype = Info
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3))
trigscan.scan(net, torch.rand(6, 1, 8, 8), torch.arange(6) % 3, method="nc", max_steps=1)
before = libc.mallinfo2().hblks
block = torch.empty(3 << 20)  # 12 MiB
print(libc.mallinfo2().hblks - before)
"""
    def new_mmapped_blocks(env_value):
        env = dict(os.environ, TRIGSCAN_KEEP_FREED_MEMORY=env_value)
        out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        return int(out.stdout.split()[-1])

    assert new_mmapped_blocks("1") == 0
    assert new_mmapped_blocks("0") == 1  # glibc's default: a block this large is mmap'd


def test_scans_of_a_torchscript_model_use_its_fast_copy_and_repeat_bit_for_bit(monkeypatch):
    import trigscan.models as models

    copies = []

    def counting_copy(module):
        copies.append(module)
        return fast_copy(module)

    fast_copy = models.fast_cpu_copy
    monkeypatch.setattr(models, "fast_cpu_copy", counting_copy)
    module = scripted_bn_net(channels=1)
    torch.manual_seed(3)
    x, y = torch.rand(20, 1, 8, 8), torch.arange(20) % 5
    first = trigscan.scan(module, x, y, method="nc", max_steps=4)
    second = trigscan.scan(module, x, y, method="nc", max_steps=4)
    assert len(copies) == 2 and first.notes == second.notes
    assert not any("scanned as given" in n for n in first.notes)
    assert torch.equal(torch.tensor(first.statistics), torch.tensor(second.statistics))
    assert all(torch.equal(a.trigger["mask"], b.trigger["mask"]) for a, b in zip(first.per_class, second.per_class))
