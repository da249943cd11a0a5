"""Latent shapes (C, H, W) of common models, for ``sample --like`` (no torch import).

Always the unpacked spatial layout: FLUX packs 2x2 patches into tokens inside its adapter, so a
FLUX seed file holds (16, H/8, W/8) like SD3's (:mod:`latentgeo.diffusion.backends.flux`).
"""

from __future__ import annotations

from latentgeo.errors import InputError

#: --like name -> (latent channels, VAE scale factor, size multiple, default (height, width) in
#: pixels). A scale factor of 1 is a pixel model that renders only at its trained size.
FAMILY_SIZES: dict[str, tuple[int, int, int, tuple[int, int]]] = {
    "bundled": (1, 1, 0, (32, 32)),
    "bundled-flow": (1, 1, 0, (32, 32)),
    "sd15": (4, 8, 8, (512, 512)),
    "sd2": (4, 8, 8, (768, 768)),
    "sdxl": (4, 8, 8, (1024, 1024)),
    "sd3": (16, 8, 16, (1024, 1024)),
    "flux": (16, 8, 16, (1024, 1024)),
}


def latent_shape_like(name: str, height: int | None = None,
                      width: int | None = None) -> tuple[int, int, int]:
    """The seed shape (C, height/f, width/f) of family ``name`` at an image size in pixels
    (None: the family's default). Sizes must be positive multiples of the family's multiple
    (SD 1.x/2.x, SDXL: 8; SD3, FLUX: 16, as their pipelines require); the bundled pixel models
    take only their own size. InputError naming the value otherwise."""
    if name not in FAMILY_SIZES:
        raise InputError(f"{name!r}: unknown preset (choose from {', '.join(FAMILY_SIZES)})")
    channels, factor, multiple, default = FAMILY_SIZES[name]
    sizes = []
    for label, value, fallback in (("height", height, default[0]), ("width", width, default[1])):
        v = fallback if value is None else int(value)
        if multiple == 0 and v != fallback:
            raise InputError(f"{label} {v}: {name} renders only at {default[0]}x{default[1]}")
        if multiple and (v < multiple or v % multiple):
            raise InputError(f"{label} {v}: {name} needs a positive multiple of {multiple}")
        sizes.append(v // factor)
    return channels, sizes[0], sizes[1]


#: Seed shapes at each family's default size.
LATENT_SHAPES: dict[str, tuple[int, ...]] = {k: latent_shape_like(k) for k in FAMILY_SIZES}
