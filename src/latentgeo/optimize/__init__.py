"""Seed optimisation: rewards, per-seed optimisers, the published presets, the loop.

* :mod:`~latentgeo.optimize.rewards` — ``reward(images, condition) -> (B,)`` and the registry
  (``class:N``, ``clip:TEXT``, ``python:MODULE:FUNCTION``, ``match:DIR`` = SeedSelect);
* :mod:`~latentgeo.optimize.optimizers` — SGD (Nesterov) and AdamW with per-seed state,
  per-seed clipping and gradient rescaling;
* :mod:`~latentgeo.optimize.presets` — ``reno``, ``mpgr``, ``dno``, ``seedselect``,
  ``nao-seedselect``;
* :mod:`~latentgeo.optimize.init` — :func:`start_seeds`: start seeds from example images
  (inversion, NAO centroid and paths) or random;
* :mod:`~latentgeo.optimize.loop` — :func:`optimize`.

The regularisers are :data:`latentgeo.regularizers.REGULARIZERS`.
"""

from latentgeo.optimize.init import StartSeeds, start_seeds
from latentgeo.optimize.loop import OptimizeResult, optimize
from latentgeo.optimize.presets import PRESETS, Settings, resolve
from latentgeo.optimize.rewards import REWARDS, Reward, match_reward, parse_reward

__all__ = ["PRESETS", "REWARDS", "OptimizeResult", "Reward", "Settings", "StartSeeds",
           "match_reward", "optimize", "parse_reward", "resolve", "start_seeds"]
