"""`gaussianity_stats`: exact null laws, calibrated false alarms, power against typical defects."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats as st
import torch
import torch.nn.functional as F

from latentgeo.errors import ShapeError
from latentgeo.gaussianity import (
    GAUSSIAN_MOMENTS,
    chi_mean,
    gaussianity_stats,
    gaussianity_stats_batch,
    normalized_power,
    spectral_layout,
)


def checkerboard(shape=(4, 64, 64), blocks=(8, 4, 16, 2), seed=0) -> torch.Tensor:
    """The paper's toy: |N(0,1)| entries with checkerboard signs (block size per channel).

    Its marginal distribution is exactly N(0, 1) and channels are uncorrelated in expectation;
    only the spatial structure is wrong.
    """
    c, h, w = shape
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    signs = torch.stack([((yy // b + xx // b) % 2 * 2 - 1).float()
                         for b in (blocks * c)[:c]])
    return signs * torch.randn(shape, generator=g).abs()


def blurred(shape=(4, 64, 64), seed=0) -> torch.Tensor:
    """Noise blurred by a 5x5 binomial kernel (circular), rescaled to unit variance."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(shape, generator=g)
    k = torch.tensor([1.0, 4, 6, 4, 1])
    k = torch.outer(k, k) / 256
    y = F.conv2d(F.pad(z.unsqueeze(1), (2, 2, 2, 2), mode="circular"), k[None, None]).squeeze(1)
    return y / y.std()


@pytest.mark.parametrize("hw", [(8, 8), (7, 9), (1, 16), (16, 1), (6, 5), (64, 64)])
def test_independent_bins_count_every_degree_of_freedom_once(hw):
    h, w = hw
    index, is_real, radius = spectral_layout(h, w)
    assert 2 * int((~is_real).sum()) + int(is_real.sum()) == h * w
    x = torch.randn(3, h, w, dtype=torch.float64)
    p = normalized_power(x)
    weight = torch.where(is_real, 1.0, 2.0).double()
    torch.testing.assert_close((p * weight).sum(), (x * x).sum())  # Parseval
    assert index.unique().numel() == index.numel() and (radius >= 0).all()


def test_norm_test_and_moments_match_closed_forms():
    z = torch.randn(4, 16, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    r = gaussianity_stats(z)
    d = z.numel()
    ref = st.chi(d)
    assert r.norm == pytest.approx(float(z.norm()))
    assert r.norm_mean == pytest.approx(ref.mean(), rel=1e-10)
    assert chi_mean(16384) == pytest.approx(st.chi(16384).mean(), rel=1e-10)
    p_ref = 2 * min(ref.cdf(r.norm), ref.sf(r.norm))
    assert r.norm_p == pytest.approx(p_ref, rel=1e-8)
    for n, m, target, se in zip(r.moment_orders, r.moments, r.moment_targets, r.moment_se):
        assert m == pytest.approx(float((z ** n).mean()), rel=1e-10)
        assert target == GAUSSIAN_MOMENTS[n]
        assert se == pytest.approx(math.sqrt((GAUSSIAN_MOMENTS[2 * n] - target ** 2) / d))
    assert GAUSSIAN_MOMENTS[:9] == (1, 0, 1, 0, 3, 0, 15, 0, 105)
    assert r.channel_mean == pytest.approx(z.mean((1, 2)).tolist())
    assert r.channel_std == pytest.approx(z.std((1, 2)).tolist())


def test_false_alarm_rate_matches_alpha_on_fresh_sd_latents():
    """1000 fresh torch.randn latents of SD shape: rejections ~ Binomial(1000, ~alpha)."""
    alpha, n = 0.01, 1000
    z = torch.randn(n, 4, 64, 64, generator=torch.Generator().manual_seed(2024))
    reports = gaussianity_stats_batch(z, alpha)
    rejected = sum(not r.passed for r in reports)
    sd = math.sqrt(n * alpha * (1 - alpha))
    # Bonferroni guarantees <= alpha; the tests are weakly dependent so the rate is close to it.
    assert abs(rejected - n * alpha) <= 3 * sd, rejected
    # Every single test is calibrated: its p-values are uniform under the null.
    for name in reports[0].p_values:
        ps = np.array([r.p_values[name] for r in reports])
        assert st.kstest(ps, "uniform").pvalue > 1e-3, name


def test_batch_equals_single():
    z = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    batch = gaussianity_stats_batch(z)
    for zi, rb in zip(z, batch):
        rs = gaussianity_stats(zi)
        assert rs.p_values == pytest.approx(rb.p_values, rel=1e-9)
        assert rs.moments == pytest.approx(rb.moments)


def _defects():
    g = torch.Generator().manual_seed(5)
    z = torch.randn(4, 64, 64, generator=g)
    shared = torch.randn(1, 64, 64, generator=g)
    return {
        "checkerboard": (checkerboard(), {"spectral", "bands"}),
        "blurred": (blurred(), {"spectral", "bands"}),
        "scaled 0.9": (0.9 * z, {"norm"}),
        "mean shift 0.1": (z + 0.1, {"channels"}),
        "channel-correlated": ((z + shared) / math.sqrt(2), {"correlation"}),
    }


@pytest.mark.parametrize("name", list(_defects()))
def test_defective_latents_are_rejected(name):
    z, expected = _defects()[name]
    r = gaussianity_stats(z)
    assert not r.passed
    assert expected <= set(r.failed), r.failed


def test_shapes_dtypes_and_errors():
    g = torch.Generator().manual_seed(6)
    for shape in [(32, 32), (2, 2, 16, 16), (1000,)]:
        r = gaussianity_stats(torch.randn(shape, generator=g))
        assert r.shape == shape and r.d == math.prod(shape)
    r16 = gaussianity_stats(torch.randn(4, 16, 16, generator=g).half())
    assert 0 <= r16.adjusted_p <= 1
    d = r16.to_dict()
    assert set(d["failed"]) <= set(r16.p_values) and "passed" in d
    with pytest.raises(ShapeError):
        gaussianity_stats(torch.tensor(1.0))
    with pytest.raises(ValueError):
        gaussianity_stats(torch.randn(4, 8, 8), alpha=1.5)
