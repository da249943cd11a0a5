"""latentgeo: the geometry of diffusion-model latent seeds.

The math core (``chi``, ``metric``, ``interpolation``, ``centroids``, ``gaussianity``,
``regularizers``, ``reprojection``, ``inversion``) is pure torch; ``io``, ``images``,
``backend`` and ``cli`` sit at the edge.
"""

__version__ = "0.1.0"

from latentgeo.errors import LatentgeoError

__all__ = ["LatentgeoError", "__version__"]
