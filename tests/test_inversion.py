"""DDIM inversion core: exactness against a closed form, the sampler round trip, diagnostics."""

from __future__ import annotations

import math

import pytest
import torch

from latentgeo.ddim import ddim_alphas, ddim_sample, ddim_step
from latentgeo.errors import InputError, ShapeError
from latentgeo.inversion import chi_zscore, ddim_invert, inverse_step, latent_rmse, psnr

DTYPES = [torch.float32, torch.float64]
# Round-trip tolerance of converged fixed-point inversion, keyed by dtype.
ROUNDTRIP_TOL = {torch.float32: 1e-4, torch.float64: 1e-5}


def schedule(steps: int = 20, n_train: int = 1000):
    """Stable Diffusion's scaled-linear betas and diffusers' 'leading' DDIM grid (offset 1)."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, n_train, dtype=torch.float64) ** 2
    ac = torch.cumprod(1.0 - betas, dim=0)
    ratio = n_train // steps
    ts = [i * ratio + 1 for i in reversed(range(steps))]
    return ts, ac, 1.0


class GaussianEps:
    """The exact noise predictor when the data are N(mu, s^2 I):

    x_t = sqrt(a) x0 + sqrt(1-a) eps
    =>  E[eps | x_t] = sqrt(1-a) (x_t - sqrt(a) mu) / (a s^2 + 1 - a),
    affine in x_t, so every implicit inverse step has a closed-form solution.
    """

    def __init__(self, ac, mu, s):
        self.ac, self.mu, self.s = ac, mu, s

    def k(self, t):
        a = float(self.ac[t])
        return (1 - a) ** 0.5 / (a * self.s ** 2 + 1 - a), a ** 0.5 * self.mu

    def __call__(self, x, t):
        k, m = self.k(t)
        return k * (x - m.to(x.dtype))


def exact_inverse(eps: GaussianEps, x0, ts, ac, final):
    """Solve x_t = alpha x_s + beta k (x_t - m) exactly, step by step (closed form)."""
    x = x0
    for t, a_t, a_s in reversed(ddim_alphas(ac, ts, final)):
        k, m = eps.k(t)
        alpha = (a_t / a_s) ** 0.5
        beta = (1 - a_t) ** 0.5 - alpha * (1 - a_s) ** 0.5
        x = (alpha * x - beta * k * m.to(x.dtype)) / (1 - beta * k)
    return x


def smooth_eps(dim: int, seed: int = 0):
    """A smooth nonlinear predictor (tanh of a random linear map plus a t-dependent shift)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(dim, dim, generator=g, dtype=torch.float64) / dim ** 0.5

    def eps_fn(x, t):
        flat = x.flatten(1)
        out = 0.8 * torch.tanh(flat @ w.to(x.dtype).T) + 0.3 * flat + 1e-3 * t
        return out.reshape(x.shape)

    return eps_fn


@pytest.fixture(params=[0, 1])
def x0(request):
    g = torch.Generator().manual_seed(request.param)
    return torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64) * 0.5 + 0.2


def test_inverse_step_inverts_ddim_step():
    g = torch.Generator().manual_seed(0)
    x, e = torch.randn(2, 5, generator=g, dtype=torch.float64), torch.randn(2, 5, generator=g,
                                                                           dtype=torch.float64)
    y = ddim_step(x, e, 0.3, 0.9)
    torch.testing.assert_close(inverse_step(y, e, 0.9, 0.3), x, rtol=0, atol=1e-14)


def test_fixed_point_matches_closed_form_and_plain_does_not(x0):
    ts, ac, final = schedule(20)
    eps = GaussianEps(ac, mu=torch.full((1, 2, 4, 4), 0.2, dtype=torch.float64), s=0.5)
    exact = exact_inverse(eps, x0, ts, ac, final)
    fixed, info = ddim_invert(eps, x0, ac, ts, final, fixed_point_iters=30, return_info=True)
    plain = ddim_invert(eps, x0, ac, ts, final, fixed_point_iters=0)
    assert latent_rmse(fixed, exact).max() < 1e-10
    assert latent_rmse(plain, exact).min() > 1e-3
    # ... and the shared sampler maps the fixed-point seed back to x0 to 1e-5 (float64).
    back = ddim_sample(eps, fixed, ac, ts, final)
    assert (back - x0).abs().max() < 1e-5
    assert (ddim_sample(eps, plain, ac, ts, final) - x0).abs().max() > 1e-3
    assert bool(info.converged.all())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("steps", [10, 50])
def test_nonlinear_roundtrip(dtype, steps):
    ts, ac, final = schedule(steps)
    x0 = (torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
          .clamp(-1, 1)).to(dtype)
    eps_fn = smooth_eps(16)
    seeds = ddim_invert(eps_fn, x0, ac, ts, final, fixed_point_iters=20,
                        tol=1e-6 if dtype == torch.float32 else None)
    plain = ddim_invert(eps_fn, x0, ac, ts, final, fixed_point_iters=0)
    err_fixed = latent_rmse(ddim_sample(eps_fn, seeds, ac, ts, final), x0)
    err_plain = latent_rmse(ddim_sample(eps_fn, plain, ac, ts, final), x0)
    assert seeds.dtype == dtype
    assert err_fixed.max() < ROUNDTRIP_TOL[dtype], err_fixed
    assert err_plain.min() > 10 * ROUNDTRIP_TOL[torch.float32], err_plain


def test_default_three_iterations_beat_plain_by_orders_of_magnitude(x0):
    ts, ac, final = schedule(50)
    eps_fn = smooth_eps(32)
    errs = []
    for k in (0, 1, 3):
        z = ddim_invert(eps_fn, x0, ac, ts, final, fixed_point_iters=k)
        errs.append(float(latent_rmse(ddim_sample(eps_fn, z, ac, ts, final), x0).max()))
    assert errs[0] > errs[1] > errs[2]
    assert errs[2] < 1e-3 * errs[0], errs


def test_residual_diagnostic_is_the_true_forward_residual(x0):
    """The free residual c (eps(x) - e_prev) equals f(x, eps(x)) - x_s recomputed directly."""
    ts, ac, final = schedule(5)
    eps_fn = smooth_eps(32)
    steps = list(reversed(ddim_alphas(ac, ts, final)))
    # One fixed-point iteration on the first inverse step: the residual measured is that of the
    # plain estimate x = g(x0, eps(x0)).
    _, info = ddim_invert(eps_fn, x0, ac, ts[-1:], final, fixed_point_iters=1, tol=0.0,
                          return_info=True)
    t, a_t, a_s = steps[0]
    x_plain = inverse_step(x0, eps_fn(x0, t), a_s, a_t)
    direct = latent_rmse(ddim_step(x_plain, eps_fn(x_plain, t), a_t, a_s), x0)
    torch.testing.assert_close(info.residual[0], direct, rtol=1e-10, atol=1e-14)


def test_nfe_accounting_and_early_stop(x0):
    ts, ac, final = schedule(10)
    eps = GaussianEps(ac, mu=torch.zeros(1, 2, 4, 4, dtype=torch.float64), s=0.5)
    _, plain = ddim_invert(eps, x0, ac, ts, final, fixed_point_iters=0, return_info=True)
    assert plain.nfe.tolist() == [10] * 3 and plain.calls == 10
    assert torch.isnan(plain.residual).all()
    _, full = ddim_invert(eps, x0, ac, ts, final, fixed_point_iters=4, tol=0.0, anderson=0,
                          return_info=True)
    assert full.nfe.tolist() == [50] * 3 and full.calls == 50
    # Anderson mixing solves an affine, isotropic eps (this one) in one refinement: the second
    # refinement measures a zero residual and stops.
    exact = exact_inverse(eps, x0, ts, ac, final)
    z, aa = ddim_invert(eps, x0, ac, ts, final, fixed_point_iters=4, tol=1e-13, anderson=1,
                        return_info=True)
    assert aa.nfe.tolist() == [30] * 3 and bool(aa.converged.all())
    assert latent_rmse(z, exact).max() < 1e-13
    # A loose tolerance stops early, per sample, and saves network calls.
    _, loose = ddim_invert(eps, x0, ac, ts, final, fixed_point_iters=12, tol=1e-6,
                           return_info=True)
    assert (loose.nfe < 10 * 13).all()
    assert bool(loose.converged.all())
    assert (loose.nfe == 10 + loose.iters.sum(0)).all()
    assert float(loose.max_residual.max()) <= 1e-6


def test_batched_equals_looped_and_deterministic(x0):
    ts, ac, final = schedule(10)
    eps_fn = smooth_eps(32)
    batched = ddim_invert(eps_fn, x0, ac, ts, final, fixed_point_iters=3, tol=1e-9)
    looped = torch.cat([ddim_invert(eps_fn, x0[i:i + 1], ac, ts, final, fixed_point_iters=3,
                                    tol=1e-9) for i in range(x0.shape[0])])
    torch.testing.assert_close(batched, looped, rtol=0, atol=1e-12)
    again = ddim_invert(eps_fn, x0, ac, ts, final, fixed_point_iters=3, tol=1e-9)
    assert torch.equal(batched, again)


def test_callback_and_final_alpha_not_one(x0):
    ts, ac, _ = schedule(8)
    final = float(ac[0])
    eps_fn = smooth_eps(32)
    seen = []
    z = ddim_invert(eps_fn, x0, ac, ts, final, fixed_point_iters=20,
                    callback=lambda i, x: seen.append((i, tuple(x.shape))))
    assert seen == [(i, tuple(x0.shape)) for i in range(8)]
    assert (ddim_sample(eps_fn, z, ac, ts, final) - x0).abs().max() < 1e-9


def test_bad_arguments():
    ts, ac, final = schedule(4)
    eps_fn = smooth_eps(4)
    with pytest.raises(InputError, match="fixed_point_iters"):
        ddim_invert(eps_fn, torch.zeros(1, 4), ac, ts, final, fixed_point_iters=-1)
    with pytest.raises(ShapeError, match="batched"):
        ddim_invert(eps_fn, torch.zeros(4), ac, ts, final)
    with pytest.raises(ShapeError, match="eps_fn returned"):
        ddim_invert(lambda x, t: x[:, :2], torch.zeros(1, 4), ac, ts, final)


def test_metrics():
    a = torch.zeros(2, 1, 4, 4)
    b = a.clone()
    b[0] += 0.1
    p = psnr(b, a)
    assert p[0].item() == pytest.approx(20.0) and math.isinf(p[1].item())
    torch.testing.assert_close(latent_rmse(b, a), torch.tensor([0.1, 0.0], dtype=torch.float64))
    z = torch.randn(4000, 1024, generator=torch.Generator().manual_seed(0))
    zs = chi_zscore(z)
    assert abs(float(zs.mean())) < 0.1 and abs(float(zs.std()) - 1) < 0.1
    assert float(chi_zscore(z * 0.5).mean()) < -20
