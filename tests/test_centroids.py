"""Centroids: one battery over every method x dtype, closed forms, NAO optimality."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch

from latentgeo import chi
from latentgeo.centroids import (
    CENTROIDS,
    _span_coordinates,
    get_centroid,
    nao,
    nao_objective,
    nao_objective_of,
    nao_reference,
)
from latentgeo.errors import InputError
from latentgeo.metric import NAOMetric

METHODS = {name: (partial(fn, max_iters=10) if name == "nao-reference" else fn)
           for name, fn in CENTROIDS.items()}
SHAPE = (2, 8, 8)


def _set(n, seed, dtype=torch.float64, scales=(0.85, 1.0, 1.15)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *SHAPE, generator=g, dtype=torch.float64)
    s = torch.tensor([scales[i % len(scales)] for i in range(n)], dtype=torch.float64)
    return (x * s.reshape(-1, 1, 1, 1)).to(dtype)


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_battery(name, dtype):
    x = _set(4, 0, dtype)
    c = METHODS[name](x)
    assert c.shape == SHAPE and c.dtype == dtype and torch.isfinite(c).all()
    # permutation invariance (the NAO optimum is compared by objective: at a minimum the
    # objective is flat, so solver-level differences move c far more than they move J)
    c2 = METHODS[name](x[[2, 0, 3, 1]])
    if name == "nao":
        assert nao_objective_of(c2, x) == pytest.approx(nao_objective_of(c, x), rel=1e-5)
    else:
        tol = 5e-2 if name == "nao-reference" else 1e-5
        assert float((c - c2).abs().max()) <= tol * float(c.abs().max())
    # integer weights == repeated seeds (not for cog: repeated seeds are not independent)
    if name not in ("nao-reference", "cog"):
        cw = METHODS[name](x, weights=[2, 1, 1, 1])
        cr = METHODS[name](torch.cat([x, x[:1]]))
        if name == "nao":
            jw = nao_objective_of(cw, x, weights=[2, 1, 1, 1])
            assert jw == pytest.approx(nao_objective_of(cr, x, weights=[2, 1, 1, 1]), rel=1e-5)
        else:
            assert float((cw - cr).abs().max()) <= 1e-5 * float(cw.abs().max())


def test_closed_forms():
    x = _set(6, 1)
    d = x[0].numel()
    assert float(CENTROIDS["normalized"](x).norm()) == pytest.approx(chi.mode(d))
    torch.testing.assert_close(CENTROIDS["euclidean"](x), x.mean(0))
    # cog of independent seeds is N(0, I) again
    g = torch.Generator().manual_seed(3)
    z = torch.randn(8, 100_000, generator=g)
    c = CENTROIDS["cog"](z)
    assert float(c.var()) == pytest.approx(1.0, abs=0.02) and abs(float(c.mean())) < 0.01
    # spherical mean of two directions is the slerp midpoint direction
    a, b = x[0].reshape(-1), x[1].reshape(-1)
    s = CENTROIDS["spherical"](x[:2]).reshape(-1)
    mid = a / a.norm() + b / b.norm()
    torch.testing.assert_close(s / s.norm(), mid / mid.norm())
    assert float(s.norm()) == pytest.approx(float((a.norm() + b.norm()) / 2))


@pytest.mark.parametrize("power", [1, 2])
def test_nao_is_optimal(power):
    x = _set(4, 2)
    c, info = nao(x, power=power, return_info=True)
    J = nao_objective_of(c, x, power=power)
    assert J == pytest.approx(info["objective"], rel=1e-9)
    for name in ("euclidean", "normalized", "cog", "spherical"):
        assert J <= nao_objective_of(CENTROIDS[name](x), x, power=power) * (1 + 1e-9)
    ref = nao_reference(x, power=power, max_iters=60)
    assert J <= nao_objective_of(ref, x, power=power) * (1 + 1e-6)
    # the gradient vanishes at the optimum, relative to the size of its terms
    # sum_i |grad w_i D_i^p| = sum_i p D_i^(p-1) w(|c|)  (|grad D_i| = w(|c|), first variation)
    flat = x.flatten(1).numpy()
    Y, basis = _span_coordinates(flat)
    w = np.ones(len(x))
    cy = c.reshape(-1).numpy() @ basis.T
    _, g_opt, D = nao_objective(cy, Y, w, 128, power, power == 1)
    scale = float(chi.weight(float(c.norm()), 128)) * float((power * D ** (power - 1)).sum())
    assert np.linalg.norm(g_opt) <= 1e-4 * scale
    # and it lies in span{x_i}
    resid = c.reshape(-1).numpy() - (c.reshape(-1).numpy() @ basis.T) @ basis
    assert np.linalg.norm(resid) < 1e-8 * float(c.norm())


def test_nao_gradient_matches_finite_differences():
    x = _set(4, 4)
    Y, _ = _span_coordinates(x.flatten(1).numpy())
    w = np.array([1.0, 2.0, 0.5, 1.0])
    c = Y.mean(0) * 1.3
    _, g, _ = nao_objective(c, Y, w, 128, 1, True)
    u = np.random.default_rng(0).standard_normal(c.shape)
    h = 1e-5
    fd = (nao_objective(c + h * u, Y, w, 128, 1, True)[0]
          - nao_objective(c - h * u, Y, w, 128, 1, True)[0]) / (2 * h)
    assert float(g @ u) == pytest.approx(fd, rel=1e-4)


@pytest.mark.parametrize("power", [1, 2])
def test_nao_hessian_matches_finite_differences(power):
    # the exact Hessian of the discrete objective (second variation of the planar solves, on
    # the grids frozen at c) against central differences of the exact gradient
    x = _set(5, 6)
    Y, _ = _span_coordinates(x.flatten(1).numpy())
    w = np.array([1.0, 2.0, 0.5, 1.0, 1.5])
    c = Y.mean(0) * 1.2
    warm: dict = {}
    _, _, _, H = nao_objective(c, Y, w, 128, power, power == 1, 64, warm, True)
    fd = np.zeros_like(H)
    h = 1e-5 * float(np.linalg.norm(c))
    for j in range(len(c)):
        e = np.zeros(len(c))
        e[j] = h
        gp = nao_objective(c + e, Y, w, 128, power, power == 1, 64, dict(warm))[1]
        gm = nao_objective(c - e, Y, w, 128, power, power == 1, 64, dict(warm))[1]
        fd[:, j] = (gp - gm) / (2 * h)
    assert np.abs(fd - H).max() <= 1e-6 * np.abs(H).max()


def test_nao_large_d_is_stationary_on_the_fine_grid():
    # d = 16384, norms off the shell: the coarse-grid Newton search plus the fine polish lands
    # where the gradient measured with fresh N_GRID solves vanishes
    g = torch.Generator().manual_seed(7)
    x = torch.randn(5, 16384, generator=g, dtype=torch.float64)
    x = x * torch.tensor([0.8, 1.2, 0.8, 1.2, 1.0], dtype=torch.float64)[:, None]
    c, info = nao(x, return_info=True)
    scale = float(chi.weight(float(c.norm()), 16384)) * len(x)
    assert info["gradient_norm"] <= 1e-4 * scale
    assert info["objective"] <= nao_objective_of(CENTROIDS["normalized"](x), x)


def test_frechet_mean_of_two_is_geodesic_midpoint():
    x = _set(2, 5)
    c = nao(x, power=2)
    m = NAOMetric(x[0].numel())
    d0, d1, D = float(m.dist(c, x[0])), float(m.dist(c, x[1])), float(m.dist(x[0], x[1]))
    assert d0 == pytest.approx(D / 2, rel=1e-3) and d1 == pytest.approx(D / 2, rel=1e-3)


def test_bad_inputs_refused():
    x = _set(3, 0)
    with pytest.raises(InputError, match="euclidean, normalized"):
        get_centroid("median")
    with pytest.raises(InputError, match="weights"):
        CENTROIDS["nao"](x, weights=[1, 2])
    with pytest.raises(InputError, match="non-negative"):
        CENTROIDS["euclidean"](x, weights=[1, -1, 1])
    with pytest.raises(InputError, match="power"):
        nao(x, power=3)
