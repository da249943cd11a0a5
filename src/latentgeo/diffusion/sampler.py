"""The deterministic sampler: a model function and a grid, nothing else (k-diffusion's idea).

``model(x, t)`` returns the network's raw output at time ``t`` (classifier-free guidance already
applied: guidance is linear in the output, so it commutes with every estimate of
:mod:`latentgeo.diffusion.grid`); the grid says how an output moves x (DDIM eta = 0 for
variance-preserving models, Euler for flow matching). Rendering and inversion share this one
sampler, so an inverted seed is exactly the seed this sampler maps back to its image.

Gradients are the caller's choice: nothing here disables autograd. With ``checkpoint=True`` and
gradients enabled each step runs without a graph and is recomputed in the backward pass
(:func:`latentgeo.diffusion.recompute.recompute`), so memory does not grow with the number of
steps: what a step leaves for the backward pass is its input, one seed-sized tensor.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from latentgeo.diffusion.grid import Grid
from latentgeo.diffusion.recompute import recompute

#: model(x (B, *shape), t scalar tensor) -> raw network output, x's shape and dtype.
ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: callback(i, x_next, x0_hat) after step i; x0_hat is the step's clean estimate.
StepCallback = Callable[[int, torch.Tensor, torch.Tensor], None]


def sample_step(model: ModelFn, x: torch.Tensor, grid: Grid, i: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Step i of the grid: (x at dst[i], clean estimate x0_hat at src[i]), both x's shape.

    x_next = A x + B out and x0_hat = c1 x + c2 out with out = model(x, timesteps[i])
    (:func:`latentgeo.diffusion.grid.step_coefficients`), computed in x's dtype.
    """
    out = model(x, grid.timesteps[i])
    if out.shape != x.shape:
        raise ValueError(f"model returned shape {tuple(out.shape)} for input {tuple(x.shape)}")
    out = out.to(x.dtype)
    a, b = grid.step(i)
    c1, c2 = grid.denoised(i)
    return a * x + b * out, c1 * x + c2 * out


def sample(model: ModelFn, x: torch.Tensor, grid: Grid, callback: StepCallback | None = None,
           checkpoint: bool = False) -> torch.Tensor:
    """Run the grid from the seed x (B, *shape) to clean data x0 (same shape and dtype).

    Deterministic (Song et al. 2021, Eq. 12 with sigma = 0 / the flow Euler solver). Rows are
    independent. ``checkpoint``: recompute each step in backward (only when autograd records
    and x requires gradients; gradients then flow to x only: tensors the model uses must not
    require gradients, which is refused in backward).
    """
    for i in range(len(grid)):
        if checkpoint:
            x, x0 = recompute(lambda v, i=i: sample_step(model, v, grid, i), x)
        else:
            x, x0 = sample_step(model, x, grid, i)
        if callback is not None:
            callback(i, x, x0)
    return x
