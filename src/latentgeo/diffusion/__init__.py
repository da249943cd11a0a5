"""The diffusion layer: grids, the one deterministic sampler, inversion, model backends.

* :mod:`~latentgeo.diffusion.grid` — noise levels and the step shared by every family (pure);
* :mod:`~latentgeo.diffusion.sampler` — ``sample(model, x, grid)`` (pure, differentiable);
* :mod:`~latentgeo.diffusion.inversion` — fixed-point inversion of that sampler (pure core)
  and ``invert_images`` / ``check_roundtrip`` over a backend;
* :mod:`~latentgeo.diffusion.schedules` — grids exactly as each family's diffusers pipeline
  builds them;
* :mod:`~latentgeo.diffusion.backends` — one small adapter per model family behind one
  protocol; :mod:`~latentgeo.diffusion.loading` picks the adapter for a model spec;
* :mod:`~latentgeo.diffusion.render` — seeds to images, with or without gradients;
* :mod:`~latentgeo.diffusion.recompute` — gradient checkpointing of one step (forward without a
  graph, recomputed in backward), so the differentiable render's memory does not grow with K.
"""

from latentgeo.diffusion.inversion import check_roundtrip, invert, invert_images
from latentgeo.diffusion.loading import load_model
from latentgeo.diffusion.render import render, render_grad
from latentgeo.diffusion.sampler import sample

__all__ = ["check_roundtrip", "invert", "invert_images", "load_model", "render", "render_grad",
           "sample"]
