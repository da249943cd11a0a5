"""Seeds -> images through a backend: the no-grad renderer and the differentiable one.

Both are ``backend.decode(sample(backend.model_fn(condition, guidance), seeds,
backend.grid(steps)))``; :func:`render` runs without autograd in chunks, :func:`render_grad`
keeps the graph from the seeds to the pixels for seed optimisation, with each sampler step and
the decoder recomputed in backward (gradient checkpointing), so memory stays that of one step
whatever the number of steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from latentgeo.diffusion.recompute import recompute
from latentgeo.diffusion.sampler import StepCallback, sample
from latentgeo.errors import InputError, ShapeError


def num_batches(n: int, batch_size: int) -> int:
    """ceil(n / batch_size): the number of chunks :func:`render` runs."""
    return math.ceil(n / batch_size)


def render(backend: Any, seeds: torch.Tensor, condition: Any = None, steps: int | None = None,
           guidance: float | None = None, batch_size: int = 16,
           callback: Callable[..., None] | None = None) -> torch.Tensor:
    """Seeds x_T (B, *latent_shape) -> images (B, C, H, W) float32 in [0, 1], on the CPU.

    Deterministic (DDIM eta = 0 / flow Euler, :mod:`latentgeo.diffusion.sampler`).
    ``condition`` may be a list with one entry per seed. Runs in chunks of ``batch_size`` under
    ``torch.no_grad``; ``callback(i, x, x0_hat)`` is called after every step of every chunk
    (ceil(B / batch_size) * steps calls). On the CPU the result is bit-for-bit reproducible.
    """
    seeds = backend.check_seeds(seeds)
    steps = backend.default_steps if steps is None else int(steps)
    grid = backend.grid(steps)
    backend.check_condition(condition)
    per_seed = isinstance(condition, (list, tuple))
    if per_seed and len(condition) != seeds.shape[0]:
        raise ShapeError(f"{len(condition)} conditions for {seeds.shape[0]} seeds")
    if batch_size < 1:
        raise InputError(f"batch size {batch_size}: must be at least 1")
    out = []
    with torch.no_grad():
        for start in range(0, seeds.shape[0], batch_size):
            chunk = seeds[start:start + batch_size].to(backend.device)
            cond = list(condition[start:start + batch_size]) if per_seed else condition
            x0 = sample(backend.model_fn(cond, guidance), chunk, grid, callback)
            out.append(backend.decode(x0).to("cpu"))
    return torch.cat(out)


def render_grad(backend: Any, seeds: torch.Tensor, condition: Any = None,
                steps: int | None = None, guidance: float | None = None,
                checkpoint: bool = True, callback: StepCallback | None = None,
                estimates: int = 0
                ) -> tuple[torch.Tensor, torch.Tensor] | \
        tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Differentiable render: seeds (B, *latent_shape) -> (images (B, C, H, W) in [0, 1],
    clean latents x0 (B, *latent_shape)), both on the backend's device with autograd graphs
    back to ``seeds`` (when gradients are enabled).

    ``checkpoint``: recompute every sampler step and the decoder in the backward pass
    (:func:`latentgeo.diffusion.recompute.recompute`), so activation memory is one step's and
    the forward keeps one seed-sized tensor per step (the network's weights stay frozen;
    gradients flow to the seeds only). ``callback(i, x, x0_hat)`` sees each step's outputs,
    graph attached.

    ``estimates`` = k > 0 also returns the decoded clean estimates of the last k sampler
    states, oldest first, as a third item: a list of k images (B, C, H, W). The states are
    those after steps S-k, ..., S-1 of the S-step grid (the ones SeedSelect decodes; "after
    step -1" is the seed); the clean estimate of the state after step j < S-1 is the x0_hat
    that step j + 1 forms from it (no extra network call), and that of the final state is the
    final sample itself, so the last entry *is* ``images``. Each extra decode is checkpointed
    like the final one. k must lie in 0..S+1; with k = 0 (default) nothing is kept or decoded
    beyond the plain path.
    """
    seeds = backend.check_seeds(seeds)
    steps = backend.default_steps if steps is None else int(steps)
    grid = backend.grid(steps)
    n = len(grid)
    k = int(estimates)
    if k < 0 or k > n + 1:
        raise InputError(f"{k} clean estimates asked for from a {n}-step render (need "
                         f"0..{n + 1})")
    kept: list[torch.Tensor] = []
    step_cb = callback
    if k > 1:
        def step_cb(i: int, x: torch.Tensor, x0_hat: torch.Tensor) -> None:
            if i >= n - k + 1:
                kept.append(x0_hat)
            if callback is not None:
                callback(i, x, x0_hat)

    x0 = sample(backend.model_fn(condition, guidance), seeds.to(backend.device), grid, step_cb,
                checkpoint=checkpoint)

    def decode(z: torch.Tensor) -> torch.Tensor:
        return recompute(backend.decode, z) if checkpoint else backend.decode(z)

    images = decode(x0)
    if k == 0:
        return images, x0
    return images, x0, [decode(z) for z in kept] + [images]
