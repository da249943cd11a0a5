"""Latent shapes (C, H, W) of common models at their default image sizes, for ``--like``.

Always the unpacked spatial layout: FLUX packs 2x2 patches into tokens inside its adapter, so a
FLUX seed file holds (16, H/8, W/8) like SD3's (:mod:`latentgeo.diffusion.backends.flux`).
"""

LATENT_SHAPES: dict[str, tuple[int, ...]] = {
    "bundled": (1, 32, 32),
    "bundled-flow": (1, 32, 32),
    "sd15": (4, 64, 64),
    "sd2": (4, 96, 96),
    "sdxl": (4, 128, 128),
    "sd3": (16, 128, 128),
    "flux": (16, 128, 128),
}
