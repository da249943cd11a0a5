"""Start seeds for seed optimisation from a few example images (the NAO pipeline).

Samuel et al. (NAO, 2023) start SeedSelect from seeds that already render the concept: invert
the examples, take their NAO centroid, and walk the NAO paths from the centroid towards each
inversion. :func:`start_seeds` does this on a backend:

1. fixed-point inversion of the references (:func:`latentgeo.diffusion.invert_images`) on
   exactly the grid the optimisation renders with (same ``steps``), guidance 1 by default;
2. a centroid of the inversions (:mod:`latentgeo.centroids`: ``nao`` by default, any other
   method by name);
3. n start seeds: the centroid first, then the remaining n - 1 shared evenly over the m paths
   centroid -> inversion_i (the first (n - 1) mod m paths get one more). A path holding p
   seeds places them at the fractions j / (p + 1), j = 1..p, of the path
   (:func:`latentgeo.interpolation.nao`, equal Euclidean arc length along the exact NAO
   geodesic by default): equally spaced, stopping short of the reference, whose own inversion
   is the far end (rendering it gives the example back).

``method="random"`` draws n standard Gaussian seeds from a seeded CPU generator instead.
Pure torch on tensors; reading image folders is the caller's (``images.load_image_folder``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from latentgeo.errors import InputError

#: ``method`` values besides the centroid names of :data:`latentgeo.centroids.CENTROIDS`.
RANDOM = "random"


@dataclass
class StartSeeds:
    """Start seeds and where they came from.

    seeds:    float32 (n, *latent_shape), the centroid first (for centroid methods).
    nfe:      network evaluations spent inverting the references (0 for ``random``): shared by
              all n seeds (divide by n for a per-image cost).
    method:   ``random`` or the centroid method.
    inverted: float32 (m, *latent_shape), the references' inversions (None for ``random``).
    centroid: float32 (*latent_shape) (None for ``random``).
    path:     per seed, the reference index whose path it lies on (-1: the centroid or random).
    fraction: per seed, its fraction t along that path (0 for the centroid / random).
    steps, guidance: the inversion's grid steps and guidance.
    """

    seeds: torch.Tensor
    nfe: int
    method: str
    inverted: torch.Tensor | None = None
    centroid: torch.Tensor | None = None
    path: list[int] = field(default_factory=list)
    fraction: list[float] = field(default_factory=list)
    steps: int | None = None
    guidance: float | None = None


def path_counts(n: int, m: int) -> list[int]:
    """How many of n seeds (the centroid included) each of m paths holds: n - 1 shared
    evenly, the first (n - 1) mod m paths one more."""
    q, r = divmod(n - 1, m)
    return [q + (1 if i < r else 0) for i in range(m)]


def start_seeds(backend: Any, references: torch.Tensor | None, n: int, method: str = "nao",
                steps: int | None = 20, guidance: float = 1.0, *, condition: Any = None,
                seed: int = 0, fixed_point_iters: int = 3, interpolator: str = "nao",
                centroid_options: dict | None = None, inverted: torch.Tensor | None = None,
                inversion_nfe: int = 0, batch_size: int = 16) -> StartSeeds:
    """n start seeds for ``backend`` from ``references`` (module docstring).

    references: images (m, image_channels, H, W) in [0, 1] at the backend's size (ignored for
        ``random``; may be None when ``inverted`` is given).
    method: ``random``, or a centroid method of :data:`latentgeo.centroids.CENTROIDS`
        (``nao``, ``normalized``, ``euclidean``, ``cog``, ``spherical``, ``nao-reference``).
    steps: the grid of the inversion: the same steps the optimisation renders with (None: the
        model's default). guidance: of the inversion (1: none, the invertible default).
    condition: what the inversion conditions on (None: unconditional).
    seed: the generator seed of ``random``.
    interpolator: the paths from the centroid (:data:`latentgeo.interpolation.INTERPOLATORS`,
        default the exact ``nao`` geodesic).
    centroid_options: keyword arguments of the centroid (e.g. ``{"power": 2}``).
    inverted / inversion_nfe: reuse inversions already made on the same grid (e.g. one
        inversion shared by several methods); ``nfe`` then reports ``inversion_nfe``.
    """
    from latentgeo.centroids import get_centroid
    from latentgeo.interpolation import get_interpolator

    if isinstance(n, bool) or int(n) != n or n < 1:
        raise InputError(f"n = {n}: the number of start seeds must be a whole number >= 1")
    n = int(n)
    shape = tuple(backend.latent_shape)
    if method == RANDOM:
        g = torch.Generator(device="cpu").manual_seed(int(seed))
        z = torch.randn((n, *shape), generator=g, dtype=torch.float32)
        return StartSeeds(z, 0, RANDOM, path=[-1] * n, fraction=[0.0] * n)
    centroid_fn = get_centroid(method)
    interp = get_interpolator(interpolator)
    n_steps = backend.default_steps if steps is None else int(steps)
    if inverted is None:
        if references is None or not isinstance(references, torch.Tensor) \
                or references.ndim != 4:
            raise InputError("start seeds from examples need reference images (N, C, H, W)")
        m = references.shape[0]
        if m < 2:
            raise InputError(f"{m} reference image(s): a centroid and its paths need at least 2")
        from latentgeo.diffusion.inversion import invert_images

        inv = invert_images(backend, references, condition=condition, steps=n_steps,
                            guidance=guidance, fixed_point_iters=fixed_point_iters,
                            batch_size=batch_size)
        x = inv.seeds
        nfe = int(inv.nfe.sum())
    else:
        x = backend.check_seeds(inverted).to("cpu", torch.float32)
        if x.shape[0] < 2:
            raise InputError(f"{x.shape[0]} inversion(s): a centroid and its paths need at "
                             "least 2")
        nfe = int(inversion_nfe)
    if not bool(torch.isfinite(x).all()):
        raise InputError("the inversions of the references have NaN or infinite entries")
    m = x.shape[0]
    c = centroid_fn(x.to(torch.float64), **(centroid_options or {})).to(torch.float64)
    seeds = [c.to(torch.float32)]
    path, fraction = [-1], [0.0]
    for i, p in enumerate(path_counts(n, m)):
        if p == 0:
            continue
        t = torch.arange(1, p + 1, dtype=torch.float64) / (p + 1)
        pts = interp(c, x[i].to(torch.float64), t)
        seeds.extend(pts.to(torch.float32).unbind(0))
        path.extend([i] * p)
        fraction.extend(t.tolist())
    return StartSeeds(torch.stack(seeds), nfe, method, inverted=x.clone(),
                      centroid=c.to(torch.float32), path=path, fraction=fraction,
                      steps=n_steps, guidance=float(guidance))
