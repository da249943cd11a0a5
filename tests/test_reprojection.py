"""`reproject`: typical latents stay put; the checkerboard toy becomes typical."""

from __future__ import annotations

import pytest
import torch

from latentgeo.errors import InputError
from latentgeo.gaussianity import gaussianity_stats
from latentgeo.regularizers import spectral
from latentgeo.reprojection import (
    METHODS,
    gaussianize_marginal,
    reproject,
    whiten_spectrum,
)
from tests.test_gaussianity import blurred, checkerboard


@pytest.mark.parametrize("method", ["fast", "moment+spectral", "kl"])
def test_fresh_latent_barely_moves(method):
    z = torch.randn(4, 64, 64, generator=torch.Generator().manual_seed(11))
    assert gaussianity_stats(z).passed
    r = reproject(z, method=method)
    assert r.relative_distance < 0.01 and r.passed
    assert r.latent.shape == z.shape and r.latent.dtype == z.dtype


@pytest.mark.parametrize("make", [checkerboard, blurred])
def test_fast_reprojection_makes_structured_latents_pass(make):
    z = make((4, 64, 64))
    assert not gaussianity_stats(z).passed
    r = reproject(z, method="fast", max_steps=10)
    assert r.passed and gaussianity_stats(r.latent).passed
    assert 1 <= r.steps <= 10 and r.before.failed
    assert r.distance == pytest.approx(float((r.latent - z).norm()), rel=1e-5)


def test_optimiser_reduces_the_regulariser_and_reports_progress():
    z = checkerboard((4, 16, 16))
    seen = []
    r = reproject(z, method="moment+spectral", max_steps=15, lr=0.05, check_every=5,
                  callback=lambda step, loss: seen.append(step))
    assert seen == list(range(1, r.steps + 1))
    assert spectral(r.latent) < 0.5 * spectral(z)
    assert torch.isfinite(r.latent).all()


def test_closed_form_pieces():
    x = torch.randn(2, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    g = gaussianize_marginal(x)
    q = torch.special.ndtri((torch.arange(128, dtype=torch.float64) + 0.5) / 128)
    torch.testing.assert_close(torch.sort(g.flatten()).values, q)
    assert torch.equal(torch.argsort(g.flatten()), torch.argsort(x.flatten()))
    w = whiten_spectrum(blurred((2, 16, 16)).double())
    assert w.shape == (2, 16, 16) and w.dtype == torch.float64
    assert spectral(w) < spectral(blurred((2, 16, 16)))


def test_bad_arguments():
    z = torch.randn(4, 8, 8)
    with pytest.raises(InputError, match="fast"):
        reproject(z, method="nope")
    with pytest.raises(InputError):
        reproject(z, strength=0)
    assert "moment+spectral" in METHODS and "covariance" in METHODS


def test_fast_handles_bins_without_power_and_nan_never_passes():
    z = checkerboard((1, 32, 32), blocks=(8,))
    r = reproject(z, method="fast")
    assert torch.isfinite(r.latent).all() and r.passed
    assert 0 < r.relative_distance < 2
    bad = torch.randn(4, 8, 8)
    bad[0, 0, 0] = float("nan")
    assert not gaussianity_stats(bad).passed
