"""The published seed-optimisation loops as presets; every value can be overridden.

* ``reno`` (Eyring et al., NeurIPS 2024, code ExplainableML/ReNO): SGD with Nesterov
  momentum 0.9, lr 5, per-seed gradient-norm clip 0.1, 50 iterations, regulariser ``norm``
  (the chi log-likelihood of |z|) with weight 0.01 added to the loss as is.
* ``mpgr`` (Hwang, Kim, Sung, NeurIPS 2025): Nesterov 0.9, clip 0.01, regulariser ``mpgr``
  with its gradient rescaled to the reward gradient's norm (weight 1), 500 iterations (the
  paper's count). The paper gives no learning rate for this setup: we use ReNO's lr 5, which
  with a 10x smaller clip and 10x the iterations walks the same total path length as ``reno``.
* ``dno`` (Tang et al. 2024, code TZW1998/Direct-Noise-Optimization): AdamW lr 0.01
  (torch's default weight decay 0.01), clip 1.0, regulariser ``dno`` with weight 1, 50
  iterations. DNO optimises every per-step noise of a stochastic sampler; our sampler is
  deterministic, so only the seed is optimised.
* ``default`` (the default of ``optimize`` and the CLI): the ``reno`` loop with the regulariser
  and lambda chosen by the reward-hacking table (``docs/results/optimize.md``: the best held-out
  success among the regularisers at the lambda whose target success is nearest 90%), its
  gradient rescaled to the reward gradient's norm times lambda.
* ``seedselect`` (Samuel et al. 2023, code dvirsamuel/SeedSelect, main.py): AdamW lr 0.1
  (torch's default weight decay 0.01), divided by 10 from iteration 3 on, 30 iterations,
  20 DDIM steps, no clipping, no regulariser; meant for the ``match:DIR`` reward.
* ``nao-seedselect`` (the same code's NAO_SeedSelect): 5 iterations, lr 0.05 divided by 10 from
  iteration 3, guidance 1, 20 steps; meant for seeds started by ``optimize.init.start_seeds``.

``steps`` and ``guidance`` of a preset are None (the model's default) except for the two
SeedSelect presets; an explicit ``steps``/``guidance`` given to ``optimize`` wins.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from latentgeo.errors import InputError
from latentgeo.optimize.optimizers import OptimizerSpec
from latentgeo.regularizers import REGULARIZERS


@dataclass(frozen=True)
class Settings:
    """One optimisation loop: optimiser, per-seed clip (None: none), iterations, regulariser
    name and weight lambda, whether the regulariser's gradient is rescaled to the reward
    gradient's norm before weighting (then lambda is a ratio of norms); the sampler steps
    and guidance the loop renders with (None: the model's default)."""

    preset: str
    optimizer: OptimizerSpec
    clip: float | None
    iters: int
    reg: str
    reg_weight: float
    rescale: bool
    steps: int | None = None
    guidance: float | None = None

    def check(self) -> None:
        self.optimizer.check()
        if self.reg not in REGULARIZERS:
            raise InputError(f"unknown regulariser {self.reg!r} (choose from "
                             f"{', '.join(REGULARIZERS)})")
        if isinstance(self.iters, bool) or int(self.iters) != self.iters or self.iters < 0:
            raise InputError(f"iterations {self.iters}: must be a whole number >= 0")
        if not (self.reg_weight >= 0 and self.reg_weight < float("inf")):
            raise InputError(f"regulariser weight {self.reg_weight}: must be a number >= 0")
        if self.clip is not None and not self.clip > 0:
            raise InputError(f"gradient clip {self.clip}: must be positive")
        if self.steps is not None and (isinstance(self.steps, bool)
                                       or int(self.steps) != self.steps or self.steps < 1):
            raise InputError(f"steps {self.steps}: must be a whole number >= 1")


#: The regulariser and lambda the table chose (docs/results/optimize.md, "Verdict").
DEFAULT_REG: tuple[str, float] = ("kl", 1.0)

PRESETS: dict[str, Settings] = {
    "default": Settings("default", OptimizerSpec("sgd", lr=5.0, momentum=0.9, nesterov=True),
                        clip=0.1, iters=50, reg=DEFAULT_REG[0], reg_weight=DEFAULT_REG[1],
                        rescale=True),
    "reno": Settings("reno", OptimizerSpec("sgd", lr=5.0, momentum=0.9, nesterov=True),
                     clip=0.1, iters=50, reg="norm", reg_weight=0.01, rescale=False),
    "mpgr": Settings("mpgr", OptimizerSpec("sgd", lr=5.0, momentum=0.9, nesterov=True),
                     clip=0.01, iters=500, reg="mpgr", reg_weight=1.0, rescale=True),
    "dno": Settings("dno", OptimizerSpec("adamw", lr=0.01, weight_decay=0.01),
                    clip=1.0, iters=50, reg="dno", reg_weight=1.0, rescale=False),
    "seedselect": Settings("seedselect", OptimizerSpec("adamw", lr=0.1, weight_decay=0.01,
                                                       decay_at=3, decay=0.1),
                           clip=None, iters=30, reg="none", reg_weight=0.0, rescale=False,
                           steps=20),
    "nao-seedselect": Settings("nao-seedselect",
                               OptimizerSpec("adamw", lr=0.05, weight_decay=0.01, decay_at=3,
                                             decay=0.1),
                               clip=None, iters=5, reg="none", reg_weight=0.0, rescale=False,
                               steps=20, guidance=1.0),
}


def resolve(preset: str = "default", *, optimizer: str | None = None, lr: float | None = None,
            momentum: float | None = None, clip: float | None = None, iters: int | None = None,
            reg: str | None = None, reg_weight: float | None = None,
            rescale: bool | None = None, steps: int | None = None,
            guidance: float | None = None) -> Settings:
    """The preset's settings with every given (non-None) value overriding it; checked. A new
    ``optimizer`` keeps the preset's lr (and its schedule for adamw -> adamw only)."""
    if preset not in PRESETS:
        raise InputError(f"unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
    s = PRESETS[preset]
    opt = s.optimizer
    if optimizer is not None and optimizer != opt.name:
        opt = OptimizerSpec(optimizer, lr=opt.lr) if optimizer == "sgd" else \
            OptimizerSpec(optimizer, lr=opt.lr, weight_decay=0.01)
    if lr is not None:
        opt = replace(opt, lr=float(lr))
    if momentum is not None:
        opt = replace(opt, momentum=float(momentum))
    out = replace(s, optimizer=opt,
                  clip=s.clip if clip is None else (None if clip == float("inf") else clip),
                  iters=s.iters if iters is None else iters,
                  reg=s.reg if reg is None else reg,
                  reg_weight=s.reg_weight if reg_weight is None else float(reg_weight),
                  rescale=s.rescale if rescale is None else bool(rescale),
                  steps=s.steps if steps is None else int(steps),
                  guidance=s.guidance if guidance is None else float(guidance))
    out.check()
    return out
