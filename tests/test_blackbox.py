"""B3D / B3D-SS through query-only models: query accounting, budgets,
reproducibility, and the black-box boundary."""
import pytest
import torch

import trigscan
from trigscan.data import read_npz
from trigscan.models import QueryModel

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


def test_wrong_image_shape_for_the_onnx_model_is_a_clear_error(onnx_model_and_images):
    path, _ = onnx_model_and_images
    with pytest.raises(ValueError, match="images: the model takes \\[B, 1, 24, 24\\]"):
        trigscan.scan(trigscan.load_model(path), torch.rand(4, 1, 16, 16), method="b3d",
                      **tiny("b3d"))


def test_a_model_returning_too_few_classes_is_rejected(onnx_model_and_images):
    _, x = onnx_model_and_images
    model = QueryModel(lambda b: torch.rand(b.shape[0], 5), 10, (1, 24, 24), outputs="logits",
                       retries=0)
    with pytest.raises(trigscan.models.ModelError, match="5 classes"):
        trigscan.scan(model, x, method="b3d", **tiny("b3d"))
