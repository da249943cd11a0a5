"""Noise-level grids and the one deterministic step shared by every model family.

Both kinds of model write a noisy latent as

    x = alpha x0 + sigma eps

* variance preserving (DDPM/DDIM: SD 1.x/2.x, SDXL, the bundled DDPM): alpha = sqrt(a_t),
  sigma = sqrt(1 - a_t) with a_t = alpha-bar (``alphas_cumprod[t]``);
* flow matching (SD3, FLUX, the bundled flow model): alpha = 1 - s, sigma = s.

A network output ``out`` at (x, alpha, sigma) gives both estimates as *affine* maps of x and out,

    x0_hat  = c1 x + c2 out,        eps_hat = c3 x + c4 out,

with, per prediction type (every form division-free where the prediction allows it, so that
nothing cancels near alpha = 0, where the trailing DDIM grid starts):

    epsilon      (eps)                 c = (1/alpha, -sigma/alpha, 0,       1)
    sample       (x0)                  c = (0,       1,            1/sigma, -alpha/sigma)
    v_prediction (v = alpha eps - sigma x0; Salimans & Ho 2022, alpha^2 + sigma^2 = 1)
                                       c = (alpha,   -sigma,       sigma,   alpha)
    flow         (v = eps - x0; Lipman et al. 2023, alpha + sigma = 1)
                                       c = (1,       -sigma,       1,       alpha)

The deterministic step to the next level (alpha', sigma') re-noises the estimates:

    x' = alpha' x0_hat + sigma' eps_hat = A x + B out,
    A = alpha' c1 + sigma' c3,   B = alpha' c2 + sigma' c4.

For VP models this is DDIM with eta = 0 (Song et al. 2021, Eq. 12; diffusers ``DDIMScheduler``
computes exactly these x0/eps forms); for flow models A = 1 and B = s' - s, the Euler step
x' = x + (s' - s) v of ``FlowMatchEulerDiscreteScheduler``. A and B are float64 scalars, so the
step is one fused linear combination of two tensors. For a fixed ``out`` the step is affine in
x, which makes its exact inverse the fixed point x = (x' - B out(x)) / A
(:mod:`latentgeo.diffusion.inversion`).

This module is pure: no diffusers, no I/O. Grids are built from a family's scheduler in
:mod:`latentgeo.diffusion.schedules`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

#: The network output kinds a grid can step with.
PREDICTIONS = ("epsilon", "v_prediction", "sample", "flow")


def estimate_coefficients(prediction: str, alpha: float, sigma: float
                          ) -> tuple[float, float, float, float]:
    """(c1, c2, c3, c4) with x0_hat = c1 x + c2 out and eps_hat = c3 x + c4 out at level
    (alpha, sigma); float64 scalars (see the module docstring for the table).

    Where a form is singular (``epsilon`` at alpha = 0, ``sample`` at sigma = 0) the undefined
    estimate is set to 0 rather than inf: x then carries no information about it.
    """
    if prediction == "epsilon":
        return (1.0 / alpha, -sigma / alpha, 0.0, 1.0) if alpha > 0 else (0.0, 0.0, 0.0, 1.0)
    if prediction == "sample":
        return (0.0, 1.0, 1.0 / sigma, -alpha / sigma) if sigma > 0 else (0.0, 1.0, 0.0, 0.0)
    if prediction == "v_prediction":
        return (alpha, -sigma, sigma, alpha)
    if prediction == "flow":
        return (1.0, -sigma, 1.0, alpha)
    raise ValueError(f"unknown prediction type {prediction!r} (expected one of "
                     f"{', '.join(PREDICTIONS)})")


def step_coefficients(prediction: str, src: tuple[float, float], dst: tuple[float, float]
                      ) -> tuple[float, float]:
    """(A, B) with x_dst = A x_src + B out for the deterministic step from level ``src`` =
    (alpha, sigma) to ``dst`` (DDIM eta = 0 / flow Euler; module docstring). float64."""
    c1, c2, c3, c4 = estimate_coefficients(prediction, *src)
    a, s = dst
    return a * c1 + s * c3, a * c2 + s * c4


@dataclass(frozen=True)
class Grid:
    """The S deterministic steps of one sampling run, from the seed's level to clean data.

    Step i evaluates the network at time ``timesteps[i]`` on x at level ``src[i]`` =
    (alpha, sigma) and moves x to ``dst[i]``. Usually ``dst[i] == src[i + 1]``, but diffusers'
    DDIM steps to t - T/S whatever the next grid point is ("linspace" spacing), and a grid
    reproduces its scheduler exactly. ``plain_timesteps[i]`` is the time at which *plain*
    inversion evaluates the network on x at ``dst[i]`` (VP: the step's own t, as diffusers'
    ``DDIMInverseScheduler``; flow: the time of ``dst[i]``, forward Euler backwards).

    timesteps, plain_timesteps: (S,) tensors in the dtype the family's network expects (int64
    for DDIM, float32 for flow schedulers). src, dst: tuples of S (alpha, sigma) float pairs.
    """

    prediction: str
    timesteps: torch.Tensor
    src: tuple[tuple[float, float], ...]
    dst: tuple[tuple[float, float], ...]
    plain_timesteps: torch.Tensor

    def __post_init__(self) -> None:
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction type {self.prediction!r}")
        n = len(self.timesteps)
        if not (len(self.src) == len(self.dst) == len(self.plain_timesteps) == n) or n < 1:
            raise ValueError("grid fields must all have the same length S >= 1")
        for a, s in (*self.src, *self.dst):
            if not (math.isfinite(a) and math.isfinite(s)) or a < 0 or s < 0:
                raise ValueError(f"invalid noise level (alpha={a}, sigma={s})")

    def __len__(self) -> int:
        return len(self.timesteps)

    def step(self, i: int) -> tuple[float, float]:
        """(A, B) of step i: x_dst = A x + B out."""
        return step_coefficients(self.prediction, self.src[i], self.dst[i])

    def denoised(self, i: int) -> tuple[float, float]:
        """(c1, c2) of the clean estimate at step i: x0_hat = c1 x + c2 out."""
        return estimate_coefficients(self.prediction, *self.src[i])[:2]

    @property
    def seed_level(self) -> tuple[float, float]:
        """(alpha, sigma) of the seed: the first step's source level."""
        return self.src[0]


def vp_level(alpha_cumprod: float) -> tuple[float, float]:
    """(alpha, sigma) = (sqrt(a), sqrt(1 - a)) of a variance-preserving level a = alpha-bar."""
    a = float(alpha_cumprod)
    return math.sqrt(a), math.sqrt(max(1.0 - a, 0.0))


def flow_level(sigma: float) -> tuple[float, float]:
    """(alpha, sigma) = (1 - s, s) of a flow-matching level s."""
    s = float(sigma)
    return 1.0 - s, s
