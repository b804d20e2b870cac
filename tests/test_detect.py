"""The anomaly statistics, checked against direct computations."""
import math

import numpy as np
import pytest

from trigscan.detect import gamma_order_pvalue, mad_anomaly_index, mad_outliers, true_median


def test_true_median_averages_the_two_middle_values():
    assert true_median([4, 1, 3, 2]) == 2.5
    assert true_median([5, 1, 3]) == 3
    rng = np.random.default_rng(0)
    for n in range(1, 12):
        v = rng.normal(size=n)
        assert true_median(v) == pytest.approx(float(np.median(v)))


def test_mad_index_matches_the_formula():
    rng = np.random.default_rng(1)
    v = rng.gamma(2.0, size=11)
    med = np.median(v)
    mad = 1.4826 * np.median(np.abs(v - med))
    np.testing.assert_allclose(mad_anomaly_index(v), np.abs(v - med) / mad)


def test_low_side_outlier_is_flagged_and_high_side_is_not():
    values = [50, 52, 48, 51, 49, 50, 53, 47, 5, 120]
    assert mad_outliers(values, 2.0, "low") == [8]
    assert mad_outliers(values, 2.0, "high") == [9]
    assert mad_outliers(values, 2.0, "both") == [8, 9]


def test_ineligible_entries_are_never_flagged_but_count_for_the_median():
    values = [50, 52, 48, 51, 49, 50, 53, 47, 5, 120]
    eligible = [True] * 10
    eligible[8] = False
    assert mad_outliers(values, 2.0, "low", eligible=eligible) == []


def test_all_equal_statistics_give_zero_indices_not_nan():
    index = mad_anomaly_index([3.0] * 6)
    assert np.all(index == 0)
    assert mad_outliers([3.0] * 6) == []


def test_zero_mad_with_one_different_value_flags_it():
    index = mad_anomaly_index([3.0, 3.0, 3.0, 3.0, 1.0])
    assert index[4] == math.inf and np.all(index[:4] == 0)
    assert mad_outliers([3.0, 3.0, 3.0, 3.0, 1.0], 2.0, "low") == [4]


@pytest.mark.parametrize("bad", [[1.0], [], [[1.0, 2.0]], [1.0, float("nan")]])
def test_bad_statistics_are_rejected(bad):
    with pytest.raises(ValueError, match="values"):
        mad_anomaly_index(bad)


def test_bad_side_is_rejected():
    with pytest.raises(ValueError, match="side"):
        mad_outliers([1.0, 2.0, 3.0], side="left")


def test_gamma_pvalue_follows_the_order_statistic_formula():
    from scipy import stats

    rng = np.random.default_rng(3)
    r = rng.gamma(4.0, 0.5, size=10)
    r[6] = 20.0
    out = gamma_order_pvalue(r)
    null = np.delete(r, 6)
    a, _, scale = stats.gamma.fit(null, floc=0)
    assert out["index"] == 6
    assert out["p_value"] == pytest.approx(1 - stats.gamma.cdf(20.0, a, scale=scale) ** 10, rel=1e-6)
    assert out["p_value"] < 0.05


def test_gamma_pvalue_of_an_unremarkable_maximum_is_large():
    r = [1.0, 1.1, 0.9, 1.05, 0.95, 1.0, 1.02, 0.98, 1.08, 0.93]
    assert gamma_order_pvalue(r)["p_value"] > 0.05
    # ... and it shrinks as the maximum moves away from the rest
    assert gamma_order_pvalue(r[:-1] + [1.3])["p_value"] < gamma_order_pvalue(r)["p_value"]


def test_gamma_pvalue_underflow_is_zero_not_nan():
    r = np.array([1.0, 1.1, 0.9, 1.05, 0.95, 1.0, 1.02, 0.98, 1e6])
    out = gamma_order_pvalue(r)
    assert out["p_value"] == 0.0


def test_gamma_pvalue_with_degenerate_null_is_defined():
    assert gamma_order_pvalue([2.0, 2.0, 2.0, 2.0])["p_value"] == 1.0
    assert gamma_order_pvalue([2.0, 2.0, 2.0, 5.0])["p_value"] == 0.0
    with pytest.raises(ValueError, match="statistics"):
        gamma_order_pvalue([1.0, -1.0, 2.0])


def test_gamma_fit_matches_scipy_vectorised():
    from scipy import stats

    from trigscan.detect import gamma_fit

    rng = np.random.default_rng(4)
    samples = np.stack([rng.gamma(a, s, size=9) for a, s in [(0.7, 2.0), (4.0, 0.5), (60.0, 0.01), (900.0, 3.0)]])
    shape, scale = gamma_fit(samples)
    for row, a, s in zip(samples, shape, scale):
        a_ref, _, s_ref = stats.gamma.fit(row, floc=0)
        assert a == pytest.approx(a_ref, rel=1e-7) and s == pytest.approx(s_ref, rel=1e-7)
    shape, scale = gamma_fit([2.0, 2.0, 2.0])
    assert shape == math.inf and scale == 0.0


def test_plain_pvalue_is_anticonservative_and_the_calibrated_one_is_not():
    """K = 10 statistics from one Gamma null: the paper's pv < 0.05 far more
    often than 5% of the time; the calibrated p-value close to 5%."""
    rng = np.random.default_rng(7)
    plain = calibrated = 0
    trials = 300
    for i in range(trials):
        out = gamma_order_pvalue(rng.gamma(30.0, 1.0, size=10), calibration_draws=1000, seed=i)
        plain += out["p_value"] < 0.05
        calibrated += out["calibrated_p_value"] < 0.05
    assert plain / trials > 0.15
    assert 0.015 <= calibrated / trials <= 0.095


def test_calibrated_pvalue_is_a_seeded_monte_carlo_pvalue():
    r = [1.0, 1.1, 0.9, 1.05, 0.95, 1.0, 1.02, 0.98, 1.08, 1.2]
    out = gamma_order_pvalue(r, calibration_draws=2000, seed=3)
    assert out == gamma_order_pvalue(r, calibration_draws=2000, seed=3)
    assert 1 / 2001 <= out["calibrated_p_value"] <= 1
    assert out["calibrated_p_value"] > out["p_value"]
    # the raw level is where the calibration puts phi: below it, calibrated < phi
    assert (out["p_value"] < out["raw_level"]) == (out["calibrated_p_value"] < 0.05)
    far = gamma_order_pvalue(r[:-1] + [5.0], calibration_draws=2000, seed=3)
    assert far["calibrated_p_value"] == 1 / 2001 and far["p_value"] < far["raw_level"]
    assert gamma_order_pvalue(r)["p_value"] == out["p_value"]  # the plain one does not change
    assert "calibrated_p_value" not in gamma_order_pvalue(r)


def test_calibrated_pvalue_of_a_degenerate_null_is_defined():
    out = gamma_order_pvalue([2.0, 2.0, 2.0, 5.0], calibration_draws=100)
    assert out["calibrated_p_value"] == 0.0 and out["raw_level"] is None
    with pytest.raises(ValueError, match="calibration_draws"):
        gamma_order_pvalue([1.0, 2.0, 3.0], calibration_draws=-1)


def test_nearly_equal_null_gives_a_defined_pvalue_without_warnings():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for r in ([100.0, 100.0 + 1e-12, 100.0, 300.0], [1.0, 1.0 + 1e-14, 1.0 + 1e-14]):
            out = gamma_order_pvalue(r, calibration_draws=50)
            assert out["p_value"] in (0.0, 1.0) and out["calibrated_p_value"] == out["p_value"]
