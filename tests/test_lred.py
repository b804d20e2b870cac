"""L-RED / U-RED on real zoo models, and their input rules."""
import pytest
import torch

import trigscan
from trigscan.data import read_npz


def zoo_model(quick_zoo, name):
    root, _ = quick_zoo
    test = read_npz(root / name / "test.npz")
    return (trigscan.load_model(root / name / "model.pt"), torch.as_tensor(test["x"]),
            torch.as_tensor(test["y"]))


@pytest.mark.slow
def test_lred_finds_the_imperceptible_additive_backdoor_and_its_target(quick_zoo):
    model, x, y = zoo_model(quick_zoo, "sparse-additive-cnn-grey")
    result = trigscan.scan(model, x, y, method="lred", images_per_class=4)
    assert result.backdoored and result.targets == [4]
    assert result.anomaly.kind == "gamma" and result.anomaly.p_value < 0.05
    best = max(result.per_class, key=lambda c: c.statistic)
    assert best.target == 4 and best.converged and best.asr >= 0.9


@pytest.mark.slow
def test_lred_does_not_flag_a_clean_model(quick_zoo):
    model, x, y = zoo_model(quick_zoo, "clean-cnn-grey-s0")
    result = trigscan.scan(model, x, y, method="lred", images_per_class=4)
    assert not result.backdoored and result.targets == []
    assert result.anomaly.p_value >= 0.05


def test_ured_keeps_uniform_weights_and_lred_learns_them():
    assert trigscan.scanners.get("ured")().config.learn_weights is False
    assert trigscan.scanners.get("lred")().config.learn_weights is True


def test_lred_needs_labels_and_two_images_per_class(quick_zoo):
    model, x, y = zoo_model(quick_zoo, "clean-cnn-grey-s0")
    with pytest.raises(ValueError, match="labels: method 'lred' needs the labels"):
        trigscan.scan(model, x, method="lred")
    keep = torch.cat([torch.nonzero(y != 7).flatten(), torch.nonzero(y == 7).flatten()[:1]])
    with pytest.raises(ValueError, match=r"labels: class 7 has 1 image\(s\); L-RED needs"):
        trigscan.scan(model, x[keep], y[keep], method="lred", max_steps=2)
    with pytest.raises(ValueError, match="images_per_class"):
        trigscan.scan(model, x, y, method="lred", images_per_class=1)


def test_lred_draws_only_correctly_classified_images(quick_zoo):
    """The paper's detection images are correctly classified: images the model gets
    wrong are never drawn; a class with fewer than 2 correct ones is drawn from all
    its images, and the notes say so."""
    from trigscan.models import as_white_box
    from trigscan.scanners.lred import LRED

    model, x, y = zoo_model(quick_zoo, "clean-cnn-grey-s0")
    model = as_white_box(model)
    with torch.no_grad():
        predicted = model(x).argmax(1)
    fives = torch.nonzero((y == 5) & (predicted == 5)).flatten()
    labels = y.clone()
    labels[fives[2:]] = 6  # fives called sixes: the model gets all of these wrong
    scanner = LRED(images_per_class=len(x))  # draw every image it accepts
    xs, ys, notes = scanner._per_class_subset(model, x, labels, 10, torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(xs).argmax(1), ys)
    assert int((ys == 6).sum()) == int(((labels == 6) & (predicted == 6)).sum())
    assert int((ys == 5).sum()) == 2 and notes == []
    sixes = torch.nonzero((y == 6) & (predicted == 6)).flatten()
    labels[fives[1]] = 6
    labels[sixes[:3]] = 5  # class 5: one image the model gets right, at least three it gets wrong
    xs, ys, notes = scanner._per_class_subset(model, x, labels, 10, torch.Generator().manual_seed(0))
    assert int((ys == 5).sum()) == int((labels == 5).sum()) >= 4  # all of class 5's images
    assert len(notes) == 1 and "class(es) 5 (1 of " in notes[0]
    result = trigscan.scan(model, x, labels, method="lred", max_steps=2, images_per_class=2)
    assert notes[0] in result.notes


def test_lred_statistics_are_reproducible(quick_zoo):
    model, x, y = zoo_model(quick_zoo, "clean-cnn-grey-s0")
    runs = [trigscan.scan(model, x, y, method="lred", seed=seed, max_steps=20, images_per_class=2)
            for seed in (1, 1)]
    assert [c.statistic for c in runs[0].per_class] == [c.statistic for c in runs[1].per_class]


def test_lred_verdict_reads_the_calibrated_pvalue_and_zero_draws_the_papers(quick_zoo):
    from trigscan.detect import gamma_order_pvalue

    model, x, y = zoo_model(quick_zoo, "clean-cnn-grey-s0")
    options = dict(method="lred", seed=2, max_steps=20, images_per_class=2)
    calibrated = trigscan.scan(model, x, y, calibration_draws=500, **options)
    plain = trigscan.scan(model, x, y, calibration_draws=0, **options)
    r = calibrated.anomaly.values
    assert r == plain.anomaly.values
    test = gamma_order_pvalue(r, calibration_draws=500, seed=2)
    assert calibrated.anomaly.p_value == test["calibrated_p_value"]
    assert calibrated.anomaly.details["order_statistic_p_value"] == test["p_value"]
    assert calibrated.anomaly.details["raw_level"] == test["raw_level"]
    assert plain.anomaly.p_value == test["p_value"] and "raw_level" not in plain.anomaly.details
    for result in (calibrated, plain):
        best = max(result.per_class, key=lambda c: c.statistic)
        assert result.backdoored == (result.anomaly.p_value < 0.05 and best.converged)


@pytest.mark.parametrize("bad", [-1, 2.5, True, "many"])
def test_lred_rejects_bad_calibration_draws(bad):
    with pytest.raises(ValueError, match="calibration_draws"):
        trigscan.scanners.get("lred")(calibration_draws=bad)


def test_lred_refuses_fewer_than_three_targets_before_optimising(quick_zoo):
    model, x, y = zoo_model(quick_zoo, "clean-cnn-grey-s0")
    with pytest.raises(ValueError, match="classes: .*at least 3"):
        trigscan.scan(model, x, y, method="lred", classes=[0, 1])
