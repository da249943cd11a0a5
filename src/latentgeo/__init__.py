"""latentgeo: the geometry of diffusion-model latent seeds.

The math core (``chi``, ``metric``, ``spacings``, ``interpolation``, ``centroids``,
``gaussianity``, ``regularizers``, ``reprojection``) is pure torch. ``diffusion`` holds the one
sampler, its inversion and a backend per model family; ``optimize`` and ``align`` build on it.
``io``, ``images``, ``jobs``, ``launch`` and ``cli`` sit at the edge.
"""

__version__ = "0.1.0"

from latentgeo.errors import LatentgeoError

__all__ = ["LatentgeoError", "__version__"]
