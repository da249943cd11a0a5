"""Deterministic DDIM sampling (eta = 0) as a pure function of a noise predictor.

Rendering and inversion share this one sampler, so that an inverted seed is exactly the seed
that this sampler maps back to the image.

Notation (Song et al., "Denoising Diffusion Implicit Models", 2021, Eq. 12 with sigma = 0):
``a_t`` is alpha-bar (``alphas_cumprod[t]``) and

    x0_hat = (x_t - sqrt(1 - a_t) eps(x_t, t)) / sqrt(a_t)
    x_s    = sqrt(a_s) x0_hat + sqrt(1 - a_s) eps(x_t, t)        (s < t)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

#: eps_fn(x_t, t) -> predicted noise, same shape as x_t; t is a python int timestep.
NoiseFn = Callable[[torch.Tensor, int], torch.Tensor]


def ddim_alphas(alphas_cumprod: torch.Tensor, timesteps: Sequence[int],
                final_alpha_cumprod: float) -> list[tuple[int, float, float]]:
    """Per step (t, a_t, a_prev) along a descending timestep grid, as diffusers' DDIM uses it.

    The step after the last grid point lands on ``final_alpha_cumprod`` (1.0 for
    ``set_alpha_to_one=True``, else ``alphas_cumprod[0]``).
    """
    ts = [int(t) for t in timesteps]
    out = []
    for i, t in enumerate(ts):
        a_t = float(alphas_cumprod[t])
        a_prev = float(alphas_cumprod[ts[i + 1]]) if i + 1 < len(ts) else float(final_alpha_cumprod)
        out.append((t, a_t, a_prev))
    return out


def ddim_step(x: torch.Tensor, eps: torch.Tensor, a_t: float, a_s: float) -> torch.Tensor:
    """Move x from noise level a_t to a_s along the DDIM (eta = 0) trajectory of ``eps``."""
    x0 = (x - (1.0 - a_t) ** 0.5 * eps) / a_t ** 0.5
    return a_s ** 0.5 * x0 + (1.0 - a_s) ** 0.5 * eps


@torch.no_grad()
def ddim_sample(eps_fn: NoiseFn, x_T: torch.Tensor, alphas_cumprod: torch.Tensor,
                timesteps: Sequence[int], final_alpha_cumprod: float,
                callback: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Run DDIM from the seed x_T (B, *shape) down the descending ``timesteps`` to x_0.

    Returns x_0 with x_T's shape and dtype. ``callback(i, x)`` is called after each step.
    """
    x = x_T
    for i, (t, a_t, a_prev) in enumerate(ddim_alphas(alphas_cumprod, timesteps,
                                                     final_alpha_cumprod)):
        x = ddim_step(x, eps_fn(x, t), a_t, a_prev)
        if callback is not None:
            callback(i, x)
    return x
