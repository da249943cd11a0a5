"""Seed optimisation: rewards, per-seed optimisers, the published presets, the loop.

* :mod:`~latentgeo.optimize.rewards` — ``reward(images, condition) -> (B,)`` and the registry
  (``class:N``, ``clip:TEXT``, ``python:MODULE:FUNCTION``);
* :mod:`~latentgeo.optimize.optimizers` — SGD (Nesterov) and AdamW with per-seed state,
  per-seed clipping and gradient rescaling;
* :mod:`~latentgeo.optimize.presets` — ``reno``, ``mpgr``, ``dno``;
* :mod:`~latentgeo.optimize.loop` — :func:`optimize`.

The regularisers are :data:`latentgeo.regularizers.REGULARIZERS`.
"""

from latentgeo.optimize.loop import OptimizeResult, optimize
from latentgeo.optimize.presets import PRESETS, Settings, resolve
from latentgeo.optimize.rewards import REWARDS, Reward, parse_reward

__all__ = ["PRESETS", "REWARDS", "OptimizeResult", "Reward", "Settings", "optimize",
           "parse_reward", "resolve"]
