"""Evaluation statistics against closed forms and references."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from latentgeo.evaluation import bootstrap_interval, frechet_distance, wilson_interval


def test_frechet_distance_closed_form():
    # For Gaussians the FD is |mu_a - mu_b|^2 + tr(Sa + Sb - 2 (Sa Sb)^1/2); with diagonal
    # covariances this is sum (sa_i - sb_i)^2 over standard deviations.
    rng = np.random.default_rng(0)
    n, f = 200_000, 3
    sa, sb = np.array([1.0, 2.0, 0.5]), np.array([1.5, 1.0, 0.5])
    a = rng.normal(size=(n, f)) * sa
    b = rng.normal(size=(n, f)) * sb + np.array([1.0, 0.0, -2.0])
    expected = 1.0 + 4.0 + ((sa - sb) ** 2).sum()
    assert frechet_distance(a, b) == pytest.approx(expected, rel=0.02)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_rejects_bad_shapes():
    with pytest.raises(ValueError):
        frechet_distance(np.zeros((1, 3)), np.zeros((5, 3)))


def test_wilson_matches_statsmodels_formula():
    lo, hi = wilson_interval(45, 50)
    # Reference values of the Wilson interval for 45/50 at 95%.
    assert lo == pytest.approx(0.7864, abs=1e-3) and hi == pytest.approx(0.9565, abs=1e-3)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and 0.25 < hi < 0.35


def test_bootstrap_covers_mean():
    x = stats.norm.rvs(size=400, random_state=1)
    lo, hi = bootstrap_interval(x, n_boot=500)
    assert lo < x.mean() < hi and hi - lo == pytest.approx(2 * 1.96 / 20, rel=0.25)


def test_kid_equals_the_double_sum():
    """KID (unbiased MMD^2, cubic kernel) against explicit loops over pairs."""
    from latentgeo.evaluation import kernel_inception_distance

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(7, 3)), rng.normal(0.5, 1.0, size=(5, 3))

    def k(x, y):
        return (x @ y / 3 + 1.0) ** 3

    aa = sum(k(a[i], a[j]) for i in range(7) for j in range(7) if i != j) / (7 * 6)
    bb = sum(k(b[i], b[j]) for i in range(5) for j in range(5) if i != j) / (5 * 4)
    ab = sum(k(a[i], b[j]) for i in range(7) for j in range(5)) / 35
    assert kernel_inception_distance(a, b) == pytest.approx(aa + bb - 2 * ab, rel=1e-12)
    same = rng.normal(size=(400, 3))
    assert abs(kernel_inception_distance(same[:200], same[200:])) < 0.05
