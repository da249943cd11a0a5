"""Latent shapes (C, H, W) of common models, for ``--like``."""

LATENT_SHAPES: dict[str, tuple[int, ...]] = {
    "bundled": (1, 32, 32),
    "sd15": (4, 64, 64),
    "sd2": (4, 96, 96),
    "sdxl": (4, 128, 128),
}
