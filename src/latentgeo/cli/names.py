"""Method names for the CLI's choices, in a table that imports no torch.

The registries (``interpolation.INTERPOLATORS``, ``centroids.CENTROIDS``,
``reprojection.METHODS``) import torch; ``--help`` must not. These tuples repeat their keys, in
registry order, and ``tests/test_cli_options.py`` checks that they stay equal, so a method added
to a registry without a line here fails the suite rather than silently missing from the CLI.
"""

from __future__ import annotations

from latentgeo import spacings as _spacings

#: ``latentgeo.interpolation.INTERPOLATORS``
INTERPOLATION_METHODS: tuple[str, ...] = ("lerp", "slerp", "nlerp", "cog", "nao", "nao-reference")

#: ``latentgeo.centroids.CENTROIDS``
CENTROID_METHODS: tuple[str, ...] = ("euclidean", "normalized", "cog", "spherical", "nao",
                                     "nao-reference")

#: ``latentgeo.reprojection.METHODS``: the closed form, then ``regularizers.REGULARIZERS``
REPROJECTION_METHODS: tuple[str, ...] = ("fast", "moment", "spectral", "moment+spectral", "kl",
                                         "kurtosis", "norm", "covariance", "dno", "mpgr")

#: ``latentgeo.regularizers.REGULARIZERS`` (``optimize --reg``)
REGULARIZERS: tuple[str, ...] = ("moment", "spectral", "moment+spectral", "kl", "kurtosis",
                                 "norm", "covariance", "dno", "mpgr", "none")

#: ``latentgeo.optimize.presets.PRESETS`` (``optimize --preset``)
OPTIMIZE_PRESETS: tuple[str, ...] = ("default", "reno", "mpgr", "dno", "seedselect",
                                     "nao-seedselect")

#: ``latentgeo.optimize.optimizers.OPTIMIZERS`` (``optimize --optimizer``)
OPTIMIZERS: tuple[str, ...] = ("sgd", "adamw")

#: ``latentgeo.optimize.rewards.REWARDS``: the kinds of ``--reward KIND:ARGUMENT``
REWARD_KINDS: tuple[str, ...] = ("class", "clip", "python", "match")

#: Point spacing of the ``nao`` interpolator (``interpolation.nao(spacing=...)``); the registry
#: itself is torch-free, so it is read directly.
SPACINGS: tuple[str, ...] = tuple(_spacings.SPACINGS)

#: Latent file formats, by suffix without the dot (``io.LATENT_SUFFIXES``).
LATENT_FORMATS: tuple[str, ...] = ("safetensors", "pt")

#: Pipeline dtypes the CLI offers (``diffusion.backends.base.parse_dtype`` also takes aliases).
DTYPES: tuple[str, ...] = ("float32", "float16", "bfloat16")
