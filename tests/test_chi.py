"""Chi prior: closed forms, scipy agreement, Monte Carlo, stability for huge d."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from latentgeo import chi


@pytest.mark.parametrize("d", [1, 2, 3, 16, 1024, 16384])
def test_log_prob_matches_scipy(d):
    r = np.linspace(0.05, math.sqrt(d) + 6, 37)
    ours = chi.log_prob(torch.from_numpy(r), d).numpy()
    np.testing.assert_allclose(ours, stats.chi.logpdf(r, d), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("d", [1, 2, 5, 64, 4096, 10**6])
def test_mean_mode_variance(d):
    # scipy loses digits for huge d (compare with the asymptotic sqrt(d - 1/2) there)
    assert chi.mean(d) == pytest.approx(stats.chi.mean(d), rel=1e-10 if d < 10**5 else 1e-7)
    assert chi.variance(d) == pytest.approx(stats.chi.var(d), rel=1e-6, abs=1e-9)
    assert chi.mode(d) == pytest.approx(math.sqrt(d - 1))
    if d > 1:  # the mode maximises the density
        m = chi.mode(d)
        lp = chi.log_prob(torch.tensor([m - 1e-3, m, m + 1e-3], dtype=torch.float64), d)
        assert lp[1] >= lp[0] and lp[1] >= lp[2]


def test_mean_vs_monte_carlo():
    g = torch.Generator().manual_seed(0)
    d, n = 64, 20000
    norms = torch.randn(n, d, generator=g, dtype=torch.float64).norm(dim=1)
    se = norms.std() / math.sqrt(n)
    assert abs(float(norms.mean()) - chi.mean(d)) < 4 * float(se)


def test_huge_d_is_finite_and_stable():
    d = 10**6
    r = torch.tensor([1.0, chi.mode(d), 2 * chi.mode(d)], dtype=torch.float64)
    lp = chi.log_prob(r, d)
    assert torch.isfinite(lp).all()
    assert chi.mean(d) == pytest.approx(math.sqrt(d - 0.5), rel=1e-12)
    assert chi.variance(d) == pytest.approx(0.5 - 1 / (8 * d), rel=1e-9)
    # the density peak tends to 1/sqrt(pi) (variance 1/2)
    assert float(-lp[1]) == pytest.approx(0.5 * math.log(math.pi), abs=1e-3)


@pytest.mark.parametrize("d", [1, 2, 3, 8, 100, 16384, 10**6])
def test_weight_is_positive(d):
    """w = -log p is bounded below by -log(peak density) >= 0.2258: NAO lengths are metric."""
    r = torch.linspace(max(chi.mode(d) - 8, 1e-6), chi.mode(d) + 8, 4001, dtype=torch.float64)
    assert float(chi.weight(r, d).min()) > 0.2257


@pytest.mark.parametrize("d", [3, 100, 16384])
def test_quantile_inverts_cdf(d):
    q = torch.tensor([0.001, 0.1, 0.5, 0.9, 0.999], dtype=torch.float64)
    r = chi.quantile(q, d)
    torch.testing.assert_close(chi.cdf(r, d), q, rtol=1e-9, atol=1e-12)
    assert float(chi.z_score(chi.mean(d), d)) == pytest.approx(0.0, abs=1e-12)
