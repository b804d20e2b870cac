"""DTInspector and its mitigation: the confidence split, the verdict rules
(degenerate ratios included), the fallbacks, reproducibility, detection on the
quick zoo's BadNets model against a clean one, and the dropped samples.

The generic white-box contract (errors, class subsets, seeds) runs over
DTInspector too, in tests/test_scanners.py.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import trigscan
from trigscan import scanners
from trigscan.data import read_npz
from trigscan.mitigation import drop_indices
from trigscan.result import ClassResult
from trigscan.scanners.dtinspector import DTInspector, confidence_split, push_off_label

# detection settings of the quick-zoo tests (docs/dtinspector.md): the defaults
# but K = 25 and max_steps = 300, for time
FAST = {"k": 25, "max_steps": 300}


def zoo_training_set(quick_zoo, name):
    root, _ = quick_zoo
    train = read_npz(root / name / "train.npz")
    return (trigscan.load_model(root / name / "model.pt"), torch.as_tensor(train["x"]),
            torch.as_tensor(train["y"]), train["poisoned"])


# ---------------------------------------------------------------------------
# The confidence split
# ---------------------------------------------------------------------------
def test_split_takes_top_and_bottom_k_of_each_predicted_label():
    # label 0: 6 images, confidences 0.9 .. 0.51; label 1: 3 images; label 2: 1 image
    conf = torch.tensor([0.51, 0.9, 0.7, 0.53, 0.8, 0.6, 0.55, 0.95, 0.6, 0.99])
    pred = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 1, 2])
    probs = torch.zeros(10, 3)
    probs[torch.arange(10), pred] = conf
    probs[torch.arange(10), (pred + 1) % 3] = 1 - conf
    split = confidence_split(probs.double().log(), 2, [0, 1, 2])
    assert split.labels == [0, 1] and split.skipped == [2] and split.halved == [1]
    assert split.high[0].tolist() == [1, 4] and split.low[0].tolist() == [3, 0]  # top 2 / bottom 2
    assert split.high[1].tolist() == [7] and split.low[1].tolist() == [6]  # 3 images: halves of 1
    assert split.sizes == {0: 6, 1: 3, 2: 1}


def test_split_ranks_confidences_that_round_to_one():
    # logit margins 38..45: log_softmax is exactly 0.0 for all of them in float64,
    # yet the larger margin is the more confident image
    margins = torch.tensor([38.0, 45.0, 40.0, 44.0, 39.0, 42.0])
    logits = torch.stack([margins, torch.zeros(6), torch.full((6,), -3.0)], dim=1)
    assert (logits.double().log_softmax(dim=1)[:, 0] == 0).all()
    for scores in (logits, logits.double().log_softmax(dim=1)):  # either kind of score
        split = confidence_split(scores, 2, [0])
        assert split.high[0].tolist() == [1, 3] and split.low[0].tolist() == [4, 0]


# ---------------------------------------------------------------------------
# The patch's loss
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(1, 1, 2), (3, 5, 10), (2, 7, 4)])
def test_push_off_label_is_its_formula_values_and_gradients(shape):
    g = torch.Generator().manual_seed(sum(shape))
    logits = (torch.randn(shape, generator=g, dtype=torch.float64) * 4).requires_grad_()
    labels = torch.randint(0, shape[2], (shape[0],), generator=g)
    p_z = logits.softmax(dim=2)[torch.arange(shape[0]), :, labels]  # [R, B]
    for loss, reference in (("mse", p_z.square()), ("log", -torch.log1p(-p_z))):
        got = push_off_label(logits, labels, loss)
        torch.testing.assert_close(got, reference)
        weights = torch.rand(shape[:2], generator=g, dtype=torch.float64)
        torch.testing.assert_close(torch.autograd.grad((got * weights).sum(), logits)[0],
                                   torch.autograd.grad((reference * weights).sum(), logits, retain_graph=True)[0])


def test_log_loss_keeps_a_gradient_where_the_papers_mse_has_none():
    # margin 40 in float32: p_z rounds to 1, so p_z^2 has no gradient to follow
    logits = torch.tensor([[[40.0, 0.0, -2.0]]], requires_grad=True)
    labels = torch.tensor([0])
    mse_grad, = torch.autograd.grad(push_off_label(logits, labels, "mse").sum(), logits)
    log_value = push_off_label(logits, labels, "log")
    log_grad, = torch.autograd.grad(log_value.sum(), logits)
    assert mse_grad.abs().max() < 1e-15
    assert math.isfinite(log_value.item()) and log_value.item() == pytest.approx(40 - math.log1p(math.exp(-2)), rel=1e-6)
    assert log_grad[0, 0, 0].item() == pytest.approx(1.0, abs=1e-5)


# ---------------------------------------------------------------------------
# The verdict: the 0.9 rule, MAD low side > 3.5, degenerate ratios
# ---------------------------------------------------------------------------
def verdict(ratios, converged=None, **options):
    rows = [ClassResult(target=z, statistic=r, asr=1.0, steps=1,
                        converged=True if converged is None else converged[z])
            for z, r in enumerate(ratios)]
    return DTInspector(**options)._verdict(rows)


def test_every_ratio_above_0_9_is_clean_even_with_an_outlier():
    flagged, anomaly = verdict([1.0] * 9 + [0.92], min_mad=0)
    assert flagged == [] and anomaly.values[-1] == math.inf  # the paper's 95%-vs-100% case
    assert anomaly.details["rule"].startswith("all ratios")


def test_low_ratio_is_flagged_and_a_high_one_is_not():
    ratios = [0.92, 0.98, 0.90, 1.0, 0.95, 0.93, 0.99, 0.3, 0.96, 0.88]
    flagged, anomaly = verdict(ratios)
    assert flagged == [7] and anomaly.values[7] > 3.5 and anomaly.side == "low"
    ratios[7] = 0.8  # below the median, but within 3.5 MADs (index 2.4)
    assert verdict(ratios)[0] == []
    assert verdict([0.5, 0.52, 0.48, 0.51, 0.49, 1.0])[0] == []  # the high side never counts


def test_mad_is_floored_at_one_sample_of_the_low_set():
    # most ratios exactly 1: the plain MAD is 0 and 0.9 (5 of 50 samples) is an infinite outlier
    ratios = [1.0] * 6 + [0.9, 0.92, 1.0, 0.86]
    flagged, anomaly = verdict(ratios, min_mad=0)
    assert flagged == [6, 7, 9] and anomaly.values[6] == math.inf
    flagged, anomaly = verdict(ratios)  # floor 1/K = 0.02: index = deviation / (1.4826 * 0.02)
    assert anomaly.details["min_mad"] == 0.02
    assert anomaly.values[6] == pytest.approx(0.1 / (1.4826 * 0.02)) and flagged == [9]
    assert verdict(ratios, k=25)[0] == []  # floor 0.04


def test_degenerate_ratios_give_defined_results():
    for options in ({}, {"min_mad": 0}):
        flagged, anomaly = verdict([0.5] * 6, **options)  # all equal: MAD = 0
        assert flagged == [] and anomaly.values == [0.0] * 6
    flagged, anomaly = verdict([1.0] * 5 + [0.2], min_mad=0)  # MAD = 0 and one label apart
    assert flagged == [5] and anomaly.values[:5] == [0.0] * 5 and anomaly.values[5] == math.inf
    assert verdict([1.0] * 5 + [0.2])[0] == [5]  # with the floor: a finite index
    # a patch that never reached 95% flips counts for the median but is never flagged
    assert verdict([1.0] * 5 + [0.2], converged=[True] * 5 + [False])[0] == []
    flagged, anomaly = verdict([0.3])
    assert flagged == [] and anomaly.values == [0.0]
    assert not any(math.isnan(v) for v in verdict([0.0, 0.0, 0.0])[1].values)


@pytest.mark.parametrize("options, message", [({"k": 0}, "k"), ({"clean_ratio": 1.5}, "clean_ratio"),
                                              ({"asr_threshold": 0.0}, "asr_threshold"),
                                              ({"min_mad": -1}, "min_mad"), ({"loss": "ce"}, "loss")])
def test_invalid_options(options, message):
    with pytest.raises(ValueError, match=message):
        DTInspector(**options)


def test_defaults_are_the_papers():
    cfg = DTInspector().config
    assert (cfg.k, cfg.init_cost, cfg.cost_start_at_zero, cfg.asr_threshold, cfg.clean_ratio,
            cfg.anomaly_threshold, cfg.loss) == (50, 1e-4, False, 0.95, 0.9, 3.5, "mse")
    assert scanners.get("dtinspector") is DTInspector and DTInspector.uses_training_set


# ---------------------------------------------------------------------------
# Fallbacks and reproducibility on a small model
# ---------------------------------------------------------------------------
class Quadrants(nn.Module):
    """4 classes: the brightest quadrant of a 1x8x8 image (sharp logits)."""

    def forward(self, x):
        return 20 * nn.functional.avg_pool2d(x, 4).flatten(1)


@pytest.fixture(scope="module")
def quadrant_data():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(120, 1, 8, 8, generator=g) * 0.5
    y = torch.arange(120) % 4
    for q, (r, c) in enumerate([(0, 0), (0, 4), (4, 0), (4, 4)]):
        x[y == q, :, r:r + 4, c:c + 4] += 0.4
    return Quadrants(), x, y


def test_small_groups_are_halved_and_missing_labels_said(quadrant_data):
    model, x, y = quadrant_data
    keep = torch.cat([torch.nonzero(y != 2).flatten(), torch.nonzero(y == 2).flatten()[:1]])
    result = trigscan.scan(model, x[keep], y[keep], method="dtinspector", max_steps=20)
    assert [c.target for c in result.per_class] == [0, 1, 2, 3]
    assert result.anomaly.details["halved"] == [0, 1, 3]  # 30 images per label < 2K = 100
    assert result.anomaly.details["high_size"] == {"0": 15, "1": 15, "3": 15}
    assert result.anomaly.details["skipped"] == [2]
    skipped = result.per_class[2]
    assert not skipped.converged and skipped.statistic == 1.0 and "not inspected" in skipped.stop_reason
    assert result.anomaly.values[2] == 0.0 and 2 not in result.targets
    assert any("split in halves" in n for n in result.notes)
    assert any("labels [2] have fewer than 2 predicted images" in n for n in result.notes)
    assert all(math.isfinite(v) for v in result.statistics)


def test_without_labels_the_scan_is_the_same_and_says_so(quadrant_data):
    model, x, y = quadrant_data
    with_labels = trigscan.scan(model, x, y, method="dtinspector", max_steps=20, seed=4)
    without = trigscan.scan(model, x, method="dtinspector", max_steps=20, seed=4)
    assert without.statistics == with_labels.statistics
    assert any(n.startswith("no labels given") for n in without.notes)
    assert not any(n.startswith("no labels given") for n in with_labels.notes)


def test_same_seed_same_scan_bitwise(quadrant_data):
    model, x, y = quadrant_data
    a, b, c = (trigscan.scan(model, x, y, method="dtinspector", max_steps=20, seed=s) for s in (3, 3, 4))
    assert a.statistics == b.statistics and a.anomaly.values == b.anomaly.values
    for ca, cb, cc in zip(a.per_class, b.per_class, c.per_class):
        assert torch.equal(ca.trigger["mask"], cb.trigger["mask"])
        assert not torch.equal(ca.trigger["mask"], cc.trigger["mask"])  # the seed draws the start


class AlwaysZero(nn.Module):
    def forward(self, x):
        return torch.stack([x.flatten(1).sum(1) + 10] + [x.flatten(1).mean(1)] * 3, dim=1)


def test_a_model_that_predicts_one_label_gets_a_defined_clean_result(quadrant_data):
    _, x, y = quadrant_data
    result = trigscan.scan(AlwaysZero(), x, y, method="dtinspector", max_steps=5)
    assert not result.backdoored and [c.converged for c in result.per_class][1:] == [False] * 3
    assert result.anomaly.details["rule"].startswith("fewer than 2 labels")
    assert result.anomaly.values == [0.0] * 4


def test_drop_indices_stamps_each_flagged_labels_patch(quadrant_data):
    model, x, y = quadrant_data
    result = trigscan.scan(model, x, y, method="dtinspector", max_steps=2)
    result.targets = []
    assert drop_indices(model, x, y, result).numel() == 0
    # a patch that blacks out quadrant 0 moves every image of label 0, and no other
    # label is flagged: exactly the images of label 0 are dropped
    mask = torch.zeros(1, 8, 8)
    mask[:, :4, :4] = 1
    result.targets, result.per_class[0].trigger = [0], {"mask": mask, "pattern": torch.zeros(1, 8, 8)}
    expected = torch.nonzero(y == 0).flatten()
    assert torch.equal(drop_indices(model, x, y, result), expected)
    assert torch.equal(drop_indices(model, x, None, result), expected)  # predicted labels
    # a 2x2 corner of quadrant 0 blacked out: still predicted 0, but with p(0) < 0.995
    mask.zero_()
    mask[:, :2, :2] = 1
    assert drop_indices(model, x, y, result).numel() == 0
    assert torch.equal(drop_indices(model, x, y, result, confidence=0.995), expected)
    with pytest.raises(ValueError, match="confidence"):
        drop_indices(model, x, y, result, confidence=0)
    with pytest.raises(ValueError, match="labels: expected shape"):
        drop_indices(model, x, y[:3], result)
    nc_result = trigscan.scan(model, x[:8], y[:8], method="nc", max_steps=2)
    with pytest.raises(ValueError, match="result: expected a DTInspector ScanResult"):
        drop_indices(model, x, y, nc_result)


def test_zoo_eval_gives_the_training_set(quick_zoo):
    from trigscan.result import Anomaly, ScanResult
    from trigscan.zoo.evaluate import evaluate

    seen = []

    class Probe:
        access, needs_labels, uses_training_set = "white", False, True

        def scan(self, model, images, labels=None, seed=0):
            seen.append((len(images), labels is not None))
            return ScanResult("probe", False, [], [], Anomaly("mad", [], 3.5), {}, seed, 0.0)

    scanners.register("probe-training-set")(Probe)
    try:
        report = evaluate(quick_zoo[0], ["probe-training-set"], quiet=True)
    finally:
        scanners._REGISTRY.pop("probe-training-set")
    n_train = quick_zoo[1]["models"][0]["n_train"]
    assert seen == [(n_train, True)] * len(report["rows"])


class Interrupt(Exception):
    pass


def test_interrupted_scan_resumes_bitwise(quadrant_data, tmp_path, monkeypatch):
    from trigscan import checkpoint as ck

    model, x, y = quadrant_data
    options = {"method": "dtinspector", "seed": 2, "max_steps": 12, "patience": 2}
    reference = trigscan.scan(model, x, y, **options)
    original, calls = ck.Checkpoint.save, []

    def failing_save(self, state, **kw):
        calls.append(1)
        if len(calls) == 5:
            raise Interrupt
        return original(self, state, **kw)

    monkeypatch.setattr(ck.Checkpoint, "save", failing_save)
    with pytest.raises(Interrupt):
        trigscan.scan(model, x, y, checkpoint=tmp_path / "c.pt", **options)
    monkeypatch.setattr(ck.Checkpoint, "save", original)
    resumed = trigscan.scan(model, x, y, checkpoint=tmp_path / "c.pt", **options)
    assert resumed.statistics == reference.statistics
    assert [c.steps for c in resumed.per_class] == [c.steps for c in reference.per_class]
    for a, b in zip(resumed.per_class, reference.per_class):
        assert torch.equal(a.trigger["mask"], b.trigger["mask"])


# ---------------------------------------------------------------------------
# The quick zoo: BadNets backdoor (3x3 checker, target 0) vs a clean model;
# the mitigation's dropped samples
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def badnets_scan(quick_zoo):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, x, y, poisoned = zoo_training_set(quick_zoo, "badnets-cnn-grey")
        return model, x, y, poisoned, trigscan.scan(model, x, y, method="dtinspector", **FAST)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_detects_the_badnets_backdoor_and_its_label(badnets_scan):
    *_, result = badnets_scan
    assert result.backdoored and result.targets == [0], (result.statistics, result.anomaly.values)
    ratio = {c.target: c.statistic for c in result.per_class}
    assert ratio[0] < 0.5 < min(r for z, r in ratio.items() if z != 0)


@pytest.mark.slow
def test_clean_model_is_not_flagged(quick_zoo, one_thread):
    """At the paper's defaults (K = 50, up to 1000 steps). With FAST's K = 25 and 300
    steps the zoo built on a 2-vCPU Xeon gives label 4 a ratio of 0.72 (index 4.7)."""
    model, x, y, _ = zoo_training_set(quick_zoo, "clean-cnn-grey-s0")
    result = trigscan.scan(model, x, y, method="dtinspector")
    assert not result.backdoored, (result.statistics, result.anomaly.values)


@pytest.mark.slow
def test_mitigation_drops_mostly_poisoned_samples(badnets_scan):
    model, x, y, poisoned, result = badnets_scan
    drop = drop_indices(model, x, y, result).numpy()
    hit = np.isin(drop, poisoned).sum()
    assert len(drop) and hit / len(drop) >= 0.8 and hit / len(poisoned) >= 0.5, (len(drop), hit)
    assert set(y[drop].tolist()) == {0}  # only samples of the flagged label
