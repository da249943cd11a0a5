"""Grids built from a family's diffusers scheduler, exactly as its pipeline builds them.

* :func:`ddim_grid` — variance-preserving models sample with diffusers' ``DDIMScheduler``
  (eta = 0) built from the pipeline's scheduler config: ``set_timesteps(steps)`` gives the
  timesteps, and each step goes from alpha-bar[t] to alpha-bar[t - T // steps] (or the final
  alpha-bar), as ``DDIMScheduler.step`` does.
* :func:`flow_grid` — flow-matching models sample with ``FlowMatchEulerDiscreteScheduler``:
  ``set_timesteps`` is called with exactly the arguments the family's pipeline passes (FLUX:
  ``sigmas=linspace(1, 1/N, N)`` and ``mu``; SD3 and the bundled flow model: the scheduler's own
  grid), and step i goes from sigmas[i] to sigmas[i + 1].

A scheduler whose sampler is not a deterministic map of (x, network output) cannot be inverted
and is refused (``stochastic_sampling``, inverted sigmas). DDIM's ``clip_sample`` and
``thresholding`` are switched off: clipping x0 would make the step non-invertible.
"""

from __future__ import annotations

from typing import Any

import torch

from latentgeo.diffusion.grid import Grid, flow_level, vp_level
from latentgeo.errors import InputError, ModelError

VP_PREDICTIONS = ("epsilon", "v_prediction", "sample")


def ddim_scheduler(config: Any) -> Any:
    """A diffusers ``DDIMScheduler`` from any VP scheduler config, with x0 clipping off."""
    from diffusers import DDIMScheduler

    cfg = dict(config)
    cfg.update(clip_sample=False, thresholding=False)
    return DDIMScheduler.from_config(cfg)


def ddim_grid(scheduler: Any, steps: int) -> Grid:
    """The deterministic DDIM grid of ``scheduler`` (a ``DDIMScheduler``) for ``steps`` steps.

    Step i: t_i = scheduler.timesteps[i], from alpha-bar[t_i] to alpha-bar[t_i - T // steps]
    (``final_alpha_cumprod`` below 0), exactly ``DDIMScheduler.step``'s levels. Plain inversion
    evaluates the network at t_i, as ``DDIMInverseScheduler`` does.
    """
    prediction = str(scheduler.config.prediction_type)
    if prediction not in VP_PREDICTIONS:
        raise ModelError(f"scheduler prediction_type {prediction!r} is not supported "
                         f"(expected one of {', '.join(VP_PREDICTIONS)})")
    n_train = int(scheduler.config.num_train_timesteps)
    if not 1 <= int(steps) <= n_train:
        raise InputError(f"steps {steps}: must be between 1 and {n_train}")
    scheduler.set_timesteps(int(steps))
    ts = scheduler.timesteps.detach().to("cpu")
    ac = scheduler.alphas_cumprod.detach().to("cpu", torch.float64)
    final = float(scheduler.final_alpha_cumprod)
    ratio = n_train // int(steps)
    src = tuple(vp_level(ac[int(t)]) for t in ts)
    dst = tuple(vp_level(ac[int(t) - ratio] if int(t) - ratio >= 0 else final) for t in ts)
    return Grid(prediction=prediction, timesteps=ts, src=src, dst=dst, plain_timesteps=ts)


def check_flow_scheduler(scheduler: Any, name: str) -> None:
    """Refuse flow-matching configs whose sampler is not a deterministic map."""
    cfg = scheduler.config
    if cfg.get("stochastic_sampling", False):
        raise ModelError(f"{name}: its scheduler uses stochastic_sampling, which re-draws noise "
                         "at every step; latentgeo needs a deterministic sampler")
    if cfg.get("invert_sigmas", False):
        raise ModelError(f"{name}: its scheduler uses invert_sigmas, which is not supported")


def flow_grid(scheduler: Any, steps: int, **set_timesteps_kwargs: Any) -> Grid:
    """The Euler grid of a ``FlowMatchEulerDiscreteScheduler`` after
    ``set_timesteps(steps, **set_timesteps_kwargs)`` (pass what the family's pipeline passes).

    Step i: network at scheduler.timesteps[i], sigma from sigmas[i] to sigmas[i + 1]. Plain
    inversion evaluates the network on x at sigmas[i + 1] at that sigma's own time
    sigmas[i + 1] * T (forward Euler, backwards).
    """
    check_flow_scheduler(scheduler, "model")
    n = int(steps)
    if n < 1:
        raise InputError(f"steps {steps}: must be at least 1")
    if set_timesteps_kwargs.get("sigmas") is not None:   # diffusers' retrieve_timesteps
        scheduler.set_timesteps(**set_timesteps_kwargs)
    else:
        scheduler.set_timesteps(n, **set_timesteps_kwargs)
    ts = scheduler.timesteps.detach().to("cpu")
    sig = scheduler.sigmas.detach().to("cpu")
    n_train = int(scheduler.config.num_train_timesteps)
    s64 = sig.to(torch.float64)
    src = tuple(flow_level(s) for s in s64[:-1].tolist())
    dst = tuple(flow_level(s) for s in s64[1:].tolist())
    plain = (sig[1:] * n_train).to(ts.dtype)
    return Grid(prediction="flow", timesteps=ts, src=src, dst=dst, plain_timesteps=plain)
