"""The diffusion core: grid steps against diffusers' schedulers and closed forms, the sampler,
fixed-point inversion's exactness and its diagnostics, for every prediction type."""

from __future__ import annotations

import math

import pytest
import torch

from latentgeo.chi import norm_z_scores
from latentgeo.diffusion.grid import Grid, flow_level, step_coefficients, vp_level
from latentgeo.diffusion.inversion import invert, latent_rmse, psnr
from latentgeo.diffusion.sampler import sample, sample_step
from latentgeo.errors import InputError, ShapeError

DTYPES = [torch.float32, torch.float64]
PREDICTIONS = ["epsilon", "v_prediction", "sample", "flow"]
# Round-trip tolerance of converged fixed-point inversion, keyed by dtype.
ROUNDTRIP_TOL = {torch.float32: 1e-4, torch.float64: 1e-5}


def vp_grid(steps: int = 20, prediction: str = "epsilon", final: float | None = 1.0,
            n_train: int = 1000) -> tuple[Grid, dict[int, tuple[float, float]]]:
    """SD's scaled-linear betas on diffusers' 'leading' DDIM grid (offset 1); also returns
    the level of every timestep (for analytic predictors)."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, n_train, dtype=torch.float64) ** 2
    ac = torch.cumprod(1.0 - betas, dim=0)
    ratio = n_train // steps
    ts = [i * ratio + 1 for i in reversed(range(steps))]
    final = float(ac[0]) if final is None else final
    src = tuple(vp_level(ac[t]) for t in ts)
    dst = tuple(vp_level(ac[t - ratio]) if t - ratio >= 0 else vp_level(final) for t in ts)
    t = torch.tensor(ts)
    return Grid(prediction, t, src, dst, t), {ts[i]: src[i] for i in range(steps)}


def fm_grid(steps: int = 20, shift: float = 3.0) -> tuple[Grid, dict[int, tuple[float, float]]]:
    """A shifted flow-matching grid (SD3's shift 3), sigmas from 1 to 0, times 1000 sigma."""
    s = torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64)
    s = shift * s / (1 + (shift - 1) * s)
    sig = torch.cat([s, torch.zeros(1, dtype=torch.float64)])
    ts = sig * 1000
    levels = {int(i): flow_level(sig[i]) for i in range(steps + 1)}
    grid = Grid("flow", torch.arange(steps), tuple(flow_level(x) for x in sig[:-1]),
                tuple(flow_level(x) for x in sig[1:]), torch.arange(1, steps + 1))
    del ts
    return grid, levels


def grid_for(prediction: str, steps: int = 20):
    """A grid for each prediction type (VP ones on SD's scaled-linear schedule)."""
    return fm_grid(steps) if prediction == "flow" else vp_grid(steps, prediction)


class GaussianModel:
    """The exact network when the data are N(mu, c^2 I): at level x = alpha x0 + sigma eps,

        E[x0 | x]  = mu + alpha c^2 (x - alpha mu) / (alpha^2 c^2 + sigma^2),
        E[eps | x] = sigma (x - alpha mu) / (alpha^2 c^2 + sigma^2),

    and the output of each prediction type is the matching combination: affine in x
    (out = K x + M), so every implicit inverse step has a closed-form solution."""

    def __init__(self, prediction, levels, mu, c):
        self.prediction, self.levels, self.mu, self.c = prediction, levels, mu, c

    def affine(self, t):
        a, s = self.levels[int(t)]
        q = a * a * self.c ** 2 + s * s
        kx, mx = a * self.c ** 2 / q, self.mu * (1 - a * a * self.c ** 2 / q)   # E[x0|x]
        ke, me = s / q, -s * a * self.mu / q                                   # E[eps|x]
        return {"epsilon": (ke, me), "sample": (kx, mx), "v_prediction": (a * ke - s * kx,
                a * me - s * mx), "flow": (ke - kx, me - mx)}[self.prediction]

    def __call__(self, x, t):
        k, m = self.affine(t)
        return k * x + m.to(x.dtype)


def exact_inverse(model: GaussianModel, grid: Grid, x0):
    """Solve x_dst = A x + B (K x + M) for x, step by step (closed form)."""
    x = x0
    for i in reversed(range(len(grid))):
        a, b = grid.step(i)
        k, m = model.affine(grid.timesteps[i])
        x = (x - b * m.to(x.dtype)) / (a + b * k)
    return x


def smooth_model(dim: int, seed: int = 0):
    """A smooth nonlinear predictor (tanh of a random linear map plus a t-dependent shift)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(dim, dim, generator=g, dtype=torch.float64) / dim ** 0.5

    def model(x, t):
        flat = x.flatten(1)
        out = 0.8 * torch.tanh(flat @ w.to(x.dtype).T) + 0.3 * flat + 1e-3 * float(t)
        return out.reshape(x.shape)

    return model


@pytest.fixture(params=[0, 1])
def x0(request):
    g = torch.Generator().manual_seed(request.param)
    return torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64) * 0.5 + 0.2


# -- the step -------------------------------------------------------------------------------------
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_vp_step_equals_diffusers_ddim_step(prediction, spacing):
    """Every step of a ddim_grid equals DDIMScheduler.step (eta = 0), including the first step
    of the trailing grid (alpha-bar 2e-9) and linspace's uneven spacing. diffusers forms its
    coefficients from float32 alphas_cumprod, hence the 1e-6 relative tolerance."""
    from diffusers import DDIMScheduler

    from latentgeo.diffusion.schedules import ddim_grid

    sched = DDIMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type=prediction,
                          timestep_spacing=spacing, set_alpha_to_one=True, clip_sample=False,
                          steps_offset=1 if spacing == "leading" else 0)
    grid = ddim_grid(sched, 7)
    g = torch.Generator().manual_seed(0)
    for i, t in enumerate(sched.timesteps):
        x, out = (torch.randn(2, 9, generator=g, dtype=torch.float64) for _ in range(2))
        ref = sched.step(out, t, x, eta=0.0)
        a, b = grid.step(i)
        scale = 1 + float(ref.prev_sample.abs().max())
        torch.testing.assert_close(a * x + b * out, ref.prev_sample, rtol=1e-6, atol=1e-6 * scale)
        c1, c2 = grid.denoised(i)
        scale = 1 + float(ref.pred_original_sample.abs().max())
        torch.testing.assert_close(c1 * x + c2 * out, ref.pred_original_sample, rtol=1e-6,
                                   atol=1e-6 * scale)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_step_equals_diffusers_euler_step(shift):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from latentgeo.diffusion.schedules import flow_grid

    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    grid = flow_grid(sched, 6)
    ref_sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    ref_sched.set_timesteps(6)
    torch.testing.assert_close(grid.timesteps, ref_sched.timesteps)
    g = torch.Generator().manual_seed(1)
    for i, t in enumerate(ref_sched.timesteps):
        x, v = (torch.randn(2, 9, generator=g) for _ in range(2))
        ref = ref_sched.step(v, t, x).prev_sample
        a, b = grid.step(i)
        torch.testing.assert_close(a * x + b * v, ref, rtol=0, atol=1e-6)
    # plain inversion evaluates at the destination's own time; the last is sigma = 0 -> t = 0
    assert grid.plain_timesteps[:-1].tolist() == grid.timesteps[1:].tolist()
    assert float(grid.plain_timesteps[-1]) == 0.0


def test_stochastic_flow_scheduler_is_refused():
    from diffusers import FlowMatchEulerDiscreteScheduler

    from latentgeo.diffusion.schedules import flow_grid
    from latentgeo.errors import ModelError

    with pytest.raises(ModelError, match="stochastic_sampling"):
        flow_grid(FlowMatchEulerDiscreteScheduler(stochastic_sampling=True), 4)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_step_is_song_eq12_on_the_estimates(prediction):
    """x' = alpha' x0_hat + sigma' eps_hat with x0_hat, eps_hat solved from (x, out) by brute
    force (a 2x2 linear system per level) rather than the closed-form table."""
    src, dst = ((0.6, 0.8), (0.95, 0.3122499)) if prediction != "flow" else ((0.3, 0.7),
                                                                               (0.8, 0.2))
    a, s = src
    x0, eps = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    x = a * x0 + s * eps
    out = {"epsilon": eps, "sample": x0, "v_prediction": a * eps - s * x0,
           "flow": eps - x0}[prediction]
    A, B = step_coefficients(prediction, src, dst)
    torch.testing.assert_close(A * x + B * out, dst[0] * x0 + dst[1] * eps, rtol=1e-12,
                               atol=1e-12)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_sampler_denoises_gaussian_data_exactly(prediction):
    """With the exact network for N(mu, c^2) data the deterministic sampler maps N(0, I) seeds
    to N(mu, c^2) (the probability-flow ODE is linear here; DDIM/Euler solve it with an error
    that vanishes as steps grow): mean and spread checked on 4000 seeds."""
    grid, levels = grid_for(prediction, steps=200)
    mu = torch.full((1, 1), 0.5, dtype=torch.float64)
    model = GaussianModel(prediction, levels, mu, c=0.3)
    z = torch.randn(4000, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = sample(model, z, grid)
    assert abs(float(x.mean()) - 0.5) < 0.02 and abs(float(x.std()) - 0.3) < 0.02


def test_sampler_callback_and_shape_check():
    grid, levels = vp_grid(4)
    seen = []
    model = GaussianModel("epsilon", levels, torch.zeros(1, 3, dtype=torch.float64), 0.5)
    sample(model, torch.randn(2, 3, dtype=torch.float64), grid,
           callback=lambda i, x, x0: seen.append((i, tuple(x.shape), tuple(x0.shape))))
    assert seen == [(i, (2, 3), (2, 3)) for i in range(4)]
    with pytest.raises(ValueError, match="shape"):
        sample_step(lambda x, t: x[:, :1], torch.zeros(2, 3), grid, 0)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_checkpointed_sampler_gradient_matches_plain_and_finite_differences(prediction):
    """d(sum of sample(z)^2)/dz: with and without per-step checkpointing, and against central
    finite differences in float64 (the gradient path seed optimisation uses)."""
    grid, _ = grid_for(prediction, steps=5)
    model = smooth_model(6, seed=2)
    z = torch.randn(2, 1, 2, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def loss(z, ckpt=False):
        return sample(model, z, grid, checkpoint=ckpt).pow(2).sum()

    grads = []
    for ckpt in (False, True):
        zz = z.clone().requires_grad_(True)
        loss(zz, ckpt).backward()
        grads.append(zz.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-12)
    h = 1e-6
    fd = torch.zeros_like(z)
    for j in range(z.numel()):
        e = torch.zeros_like(z).view(-1)
        e[j] = h
        e = e.view_as(z)
        fd.view(-1)[j] = (loss(z + e) - loss(z - e)) / (2 * h)
    torch.testing.assert_close(grads[0], fd, rtol=1e-6, atol=1e-7)


# -- inversion -------------------------------------------------------------------------------------
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_fixed_point_matches_closed_form_and_plain_does_not(x0, prediction):
    grid, levels = grid_for(prediction, 20)
    model = GaussianModel(prediction, levels, torch.full((1, 2, 4, 4), 0.2,
                                                         dtype=torch.float64), c=0.5)
    exact = exact_inverse(model, grid, x0)
    fixed, info = invert(model, x0, grid, fixed_point_iters=30, return_info=True)
    plain = invert(model, x0, grid, fixed_point_iters=0)
    assert latent_rmse(fixed, exact).max() < 1e-10
    assert latent_rmse(plain, exact).min() > 1e-3
    # ... and the shared sampler maps the fixed-point seed back to x0 to 1e-5 (float64).
    assert (sample(model, fixed, grid) - x0).abs().max() < 1e-5
    assert (sample(model, plain, grid) - x0).abs().max() > 1e-3
    assert bool(info.converged.all())


def test_plain_vp_inversion_is_diffusers_ddim_inverse_scheduler():
    """Plain VP inversion = DDIMInverseScheduler (network at the step's t, x0/eps formed at the
    current, less noisy level) on the same grid, for v-prediction on a trailing grid."""
    from diffusers import DDIMInverseScheduler, DDIMScheduler

    from latentgeo.diffusion.schedules import ddim_grid

    cfg = dict(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
               timestep_spacing="trailing", set_alpha_to_one=True, clip_sample=False)
    grid = ddim_grid(DDIMScheduler(**cfg), 10)
    inv = DDIMInverseScheduler(**cfg)
    inv.set_timesteps(10)
    model = smooth_model(32, seed=1)
    x0 = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    x = x0
    for t in inv.timesteps:
        x = inv.step(model(x, t), t, x).prev_sample
    # (diffusers forms its coefficients from float32 alphas_cumprod)
    torch.testing.assert_close(invert(model, x0, grid, fixed_point_iters=0), x, rtol=1e-6,
                               atol=1e-6)


def as_x0_predictor(eps_model, levels):
    """An x0-predicting network from an eps-predicting one: (x - sigma eps(x)) / alpha. (The raw
    smooth map as an x0 predictor would not be near the identity at low noise, as real ones are,
    and no inversion converges on it.)"""
    def model(x, t):
        a, s = levels[int(t)]
        return (x - s * eps_model(x, t)) / a
    return model


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("steps", [10, 50])
def test_nonlinear_roundtrip(dtype, steps, prediction):
    grid, levels = grid_for(prediction, steps)
    x0 = (torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
          .clamp(-1, 1)).to(dtype)
    model = smooth_model(16)
    if prediction == "sample":
        model = as_x0_predictor(model, levels)
    seeds = invert(model, x0, grid, fixed_point_iters=20,
                   tol=1e-6 if dtype == torch.float32 else None)
    plain = invert(model, x0, grid, fixed_point_iters=0)
    err_fixed = latent_rmse(sample(model, seeds, grid), x0)
    err_plain = latent_rmse(sample(model, plain, grid), x0)
    assert seeds.dtype == dtype
    assert err_fixed.max() < ROUNDTRIP_TOL[dtype], err_fixed
    assert err_plain.min() > 10 * ROUNDTRIP_TOL[torch.float32], err_plain


def test_default_three_iterations_beat_plain_by_orders_of_magnitude(x0):
    grid, _ = vp_grid(50)
    model = smooth_model(32)
    errs = []
    for k in (0, 1, 3):
        z = invert(model, x0, grid, fixed_point_iters=k)
        errs.append(float(latent_rmse(sample(model, z, grid), x0).max()))
    assert errs[0] > errs[1] > errs[2]
    assert errs[2] < 1e-3 * errs[0], errs


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_residual_diagnostic_is_the_true_forward_residual(x0, prediction):
    """The free residual A (x - G(x)) equals step(x) - x_dst recomputed directly."""
    grid, levels = grid_for(prediction, 5)
    last = Grid(grid.prediction, grid.timesteps[-1:], grid.src[-1:], grid.dst[-1:],
                grid.plain_timesteps[-1:])
    model = smooth_model(32)
    if prediction == "sample":
        model = as_x0_predictor(model, levels)
    # One fixed-point iteration on the first inverse step: the residual measured is that of the
    # plain estimate.
    _, info = invert(model, x0, last, fixed_point_iters=1, tol=0.0, return_info=True)
    x_plain = invert(model, x0, last, fixed_point_iters=0)
    direct = latent_rmse(sample_step(model, x_plain, last, 0)[0], x0)
    torch.testing.assert_close(info.residual[0], direct, rtol=1e-10, atol=1e-14)


def test_nfe_accounting_and_early_stop(x0):
    grid, levels = vp_grid(10)
    model = GaussianModel("epsilon", levels, torch.zeros(1, 2, 4, 4, dtype=torch.float64), 0.5)
    _, plain = invert(model, x0, grid, fixed_point_iters=0, return_info=True)
    assert plain.nfe.tolist() == [10] * 3 and plain.calls == 10
    assert torch.isnan(plain.residual).all()
    _, full = invert(model, x0, grid, fixed_point_iters=4, tol=0.0, anderson=0, return_info=True)
    assert full.nfe.tolist() == [50] * 3 and full.calls == 50
    # Anderson mixing solves an affine, isotropic model (this one) in one refinement: the second
    # refinement measures a zero residual and stops.
    exact = exact_inverse(model, grid, x0)
    z, aa = invert(model, x0, grid, fixed_point_iters=4, tol=1e-13, anderson=1, return_info=True)
    assert aa.nfe.tolist() == [30] * 3 and bool(aa.converged.all())
    assert latent_rmse(z, exact).max() < 1e-13
    # A loose tolerance stops early, per sample, and saves network calls.
    _, loose = invert(model, x0, grid, fixed_point_iters=12, tol=1e-6, return_info=True)
    assert (loose.nfe < 10 * 13).all()
    assert bool(loose.converged.all())
    assert (loose.nfe == 10 + loose.iters.sum(0)).all()
    assert float(loose.max_residual.max()) <= 1e-6


def test_batched_equals_looped_and_deterministic(x0):
    grid, _ = vp_grid(10)
    model = smooth_model(32)
    batched = invert(model, x0, grid, fixed_point_iters=3, tol=1e-9)
    looped = torch.cat([invert(model, x0[i:i + 1], grid, fixed_point_iters=3, tol=1e-9)
                        for i in range(x0.shape[0])])
    torch.testing.assert_close(batched, looped, rtol=0, atol=1e-12)
    assert torch.equal(batched, invert(model, x0, grid, fixed_point_iters=3, tol=1e-9))


def test_callback_and_final_alpha_not_one(x0):
    grid, _ = vp_grid(8, final=None)
    model = smooth_model(32)
    seen = []
    z = invert(model, x0, grid, fixed_point_iters=20,
               callback=lambda i, x: seen.append((i, tuple(x.shape))))
    assert seen == [(i, tuple(x0.shape)) for i in range(8)]
    assert (sample(model, z, grid) - x0).abs().max() < 1e-9


def test_bad_arguments():
    grid, _ = vp_grid(4)
    model = smooth_model(4)
    with pytest.raises(InputError, match="fixed_point_iters"):
        invert(model, torch.zeros(1, 4), grid, fixed_point_iters=-1)
    with pytest.raises(ShapeError, match="batched"):
        invert(model, torch.zeros(4), grid)
    with pytest.raises(ShapeError, match="model returned"):
        invert(lambda x, t: x[:, :2], torch.zeros(1, 4), grid)
    with pytest.raises(ValueError, match="prediction"):
        Grid("score", torch.zeros(1), ((1.0, 0.0),), ((1.0, 0.0),), torch.zeros(1))


def test_metrics():
    a = torch.zeros(2, 1, 4, 4)
    b = a.clone()
    b[0] += 0.1
    p = psnr(b, a)
    assert p[0].item() == pytest.approx(20.0) and math.isinf(p[1].item())
    torch.testing.assert_close(latent_rmse(b, a), torch.tensor([0.1, 0.0], dtype=torch.float64))
    z = torch.randn(4000, 1024, generator=torch.Generator().manual_seed(0))
    zs = norm_z_scores(z)
    assert abs(float(zs.mean())) < 0.1 and abs(float(zs.std()) - 1) < 0.1
    assert float(norm_z_scores(z * 0.5).mean()) < -20
