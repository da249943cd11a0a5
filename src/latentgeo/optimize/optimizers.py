"""Per-seed optimisers: SGD with (Nesterov) momentum and AdamW, row by row (pure torch).

Every seed of a batch is its own optimisation problem: its own gradient clipping, its own
state, its own stopping. ``torch.optim`` keeps one state per parameter tensor, which is right
for the element-wise updates but cannot skip a stopped row (AdamW's step count, momentum
buffers). These are the same update rules (torch's ``SGD`` and ``AdamW`` formulas, checked
against them in the tests) with state per row and an index of the rows that step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from latentgeo.errors import InputError

OPTIMIZERS = ("sgd", "adamw")


@dataclass(frozen=True)
class OptimizerSpec:
    """name: 'sgd' (torch.optim.SGD, dampening 0) or 'adamw' (torch.optim.AdamW);
    lr; momentum and nesterov (sgd); betas, eps (adamw); weight_decay (sgd: L2 added to the
    gradient; adamw: decoupled, p <- p (1 - lr wd)).

    Learning-rate schedule: a seed's steps are numbered 0, 1, 2, ... (its own count); step k
    uses ``lr * decay`` once k >= ``decay_at`` (None: constant lr). SeedSelect's "lr / 10 from
    iteration 3" is ``decay_at=3, decay=0.1`` (its code sets the optimiser's lr before the
    step of loop index 3, so steps 0-2 use lr and steps 3+ lr / 10). The decayed lr also
    scales AdamW's decoupled weight decay, as changing a torch param group's lr does."""

    name: str = "sgd"
    lr: float = 5.0
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    decay_at: int | None = None
    decay: float = 0.1

    def lr_at(self, step: torch.Tensor) -> torch.Tensor:
        """The learning rate of step numbers ``step`` (long tensor, 0-based) as float64."""
        lr = torch.full(step.shape, float(self.lr), dtype=torch.float64, device=step.device)
        if self.decay_at is None:
            return lr
        return torch.where(step >= self.decay_at, lr * self.decay, lr)

    def check(self) -> None:
        if self.name not in OPTIMIZERS:
            raise InputError(f"unknown optimizer {self.name!r} (choose from "
                             f"{', '.join(OPTIMIZERS)})")
        if not (self.lr > 0 and self.lr < float("inf")):
            raise InputError(f"learning rate {self.lr}: must be a positive number")
        if not 0 <= self.momentum < 1:
            raise InputError(f"momentum {self.momentum}: must lie in [0, 1)")
        if self.decay_at is not None and (isinstance(self.decay_at, bool)
                                          or int(self.decay_at) != self.decay_at
                                          or self.decay_at < 0):
            raise InputError(f"learning-rate decay step {self.decay_at}: must be a whole "
                             "number >= 0")
        if not (self.decay > 0 and self.decay < float("inf")):
            raise InputError(f"learning-rate decay factor {self.decay}: must be a positive "
                             "number")


class RowOptimizer:
    """State for a batch x (B, ...) whose rows are optimised independently.

    ``step(x, grad, rows)`` returns x with rows ``rows`` (1-D long index) moved by one step of
    ``spec`` using ``grad`` (len(rows), ...); other rows and their state are untouched.
    """

    def __init__(self, spec: OptimizerSpec, like: torch.Tensor) -> None:
        spec.check()
        self.spec = spec
        self.buf = torch.zeros_like(like)
        self.v = torch.zeros_like(like)
        self.t = torch.zeros(like.shape[0], dtype=torch.long, device=like.device)

    def step(self, x: torch.Tensor, grad: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        s = self.spec
        x = x.clone()
        p, g = x[rows], grad.to(x.dtype)
        lr: float | torch.Tensor = s.lr  # a Python float unless scheduled (bit-identical)
        if s.decay_at is not None:
            lr = s.lr_at(self.t[rows]).to(x.dtype).view(-1, *[1] * (p.ndim - 1))
        self.t[rows] += 1
        if s.name == "sgd":
            if s.weight_decay:
                g = g + s.weight_decay * p
            if s.momentum:
                first = (self.t[rows] == 1).view(-1, *[1] * (p.ndim - 1))
                buf = torch.where(first, g, s.momentum * self.buf[rows] + g)
                self.buf[rows] = buf
                g = g + s.momentum * buf if s.nesterov else buf
            x[rows] = p - lr * g
            return x
        b1, b2 = s.betas
        p = p * (1 - lr * s.weight_decay)
        m = b1 * self.buf[rows] + (1 - b1) * g
        v = b2 * self.v[rows] + (1 - b2) * g * g
        self.buf[rows], self.v[rows] = m, v
        t = self.t[rows].to(x.dtype).view(-1, *[1] * (p.ndim - 1))
        step_size = lr / (1 - b1 ** t)
        denom = (v / (1 - b2 ** t)).sqrt() + s.eps
        x[rows] = p - step_size * m / denom
        return x


def row_norms(g: torch.Tensor) -> torch.Tensor:
    """Euclidean norm of each row of g (B, ...) -> (B,), in float64 for the comparison."""
    return g.flatten(1).to(torch.float64).norm(dim=1)


def clip_rows(g: torch.Tensor, max_norm: float | None) -> torch.Tensor:
    """Per-row gradient-norm clipping, torch's ``clip_grad_norm_`` rule applied to each row:
    g_i <- g_i min(1, max_norm / (|g_i| + 1e-6)). None or inf: unchanged."""
    if max_norm is None or max_norm == float("inf"):
        return g
    coef = (max_norm / (row_norms(g) + 1e-6)).clamp(max=1.0).to(g.dtype)
    return g * coef.view(-1, *[1] * (g.ndim - 1))


def rescale_rows(g: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Rescale each row of g to the norm of the same row of ``ref`` (Hwang et al.: the
    regulariser's gradient at the reward gradient's scale); a zero row stays zero."""
    n_g, n_ref = row_norms(g), row_norms(ref)
    coef = torch.where(n_g > 0, n_ref / n_g.clamp(min=torch.finfo(torch.float64).tiny),
                       torch.zeros_like(n_g))
    return g * coef.to(g.dtype).view(-1, *[1] * (g.ndim - 1))
