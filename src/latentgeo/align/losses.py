"""The two soft-token objectives, as pure batched torch functions (no models, no I/O).

Both start from one batch of B (image, condition) pairs noised at *one shared* timestep t with
*one shared* noise eps, and the network output ``out[i, j]`` for noisy image i under condition j
(B x B calls; the frozen network's target ``target[i]`` is eps, v or x0 of image i, as the model
predicts). A condition equal to another one in the batch is no negative: :func:`keep_mask`
keeps, in row i, column i and the first column of every *other* condition, so a repeated class
is neither pushed away from its own images nor counted twice.

SoftREPA (Lee et al. 2025, arXiv 2503.08250; code softrepa/SoftREPA ``train.py``,
``ContrastiveLoss``)::

    e_ij    = mean_d (out[i, j] - target[i])^2                         (B, B)
    logit_ij = scale * exp(-e_ij / temperature)        scale, temperature learnable (4.0, 0.07)
    loss    = CE(logits row i, class i) + dweight * mean_i e_ii

AGSM (arXiv 2605.30038; the paper's constants gamma+ = gamma- = 1; A(t) and the EMA decay are
latentgeo's documented choices, see :data:`A_OF_T`). The in-batch Plackett-Luce reward of image i
under condition j, with the EMA tokens' outputs ``ema[i, j]``::

    r_ij = -(A(t) / 2) |eps_hat(ema[i, j]) - eps_i|^2        (eps units, summed over dimensions)
    p_ij = softmax_j(r_ij)                                    (over the kept columns)

For a score model the gradient of log p(c_i | x_t) is s(x_t, c_i) - sum_j p_ij s(x_t, c_j), and
a score is -eps / sigma; an output of any parameterisation is affine in eps_hat at fixed (x_t, t)
with the same map for the target, so shifting the score-matching target by gamma times that
gradient is, in the network's own output units,

    delta_i      = ema[i, i] - sum_j p_ij ema[i, j]
    target_pos_i = target_i + gamma+ delta_i        (towards the matching condition)
    target_neg_i = target_i - gamma- delta_i        (away from it, towards mismatched ones)
    loss = mean |pos[i] - target_pos_i|^2 + mean |neg[i] - target_neg_i|^2

with ``pos`` / ``neg`` the outputs under the positive / negative token banks; the positive bank
is the one used at inference. With the true class posterior in place of p, target_pos is what
classifier-free guidance at scale 1 + gamma+ predicts (Ho & Salimans 2022), which is why the
positive bank aims at guidance-2 behaviour from one network call.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

#: latentgeo's choice of AGSM's weighting: A(t) = 1 with errors measured in eps units summed
#: over dimensions, i.e. r is the Gaussian log-density of the true noise under the prediction
#: (up to a constant). Measured on the bundled model (10 classes, one noise): the posterior p is
#: near uniform for t < 400, sharp near t = 800 (0.65 on the diagonal), flat again at t = 950.
A_OF_T = 1.0
#: latentgeo's choice of AGSM's EMA decay (runs are a few hundred steps; 0.999 would barely move).
EMA_DECAY = 0.99
GAMMA_POS = 1.0
GAMMA_NEG = 1.0
SCALE_INIT = 4.0
TEMPERATURE_INIT = 0.07


def condition_ids(conditions: Sequence[Any]) -> torch.Tensor:
    """Conditions (ints, prompts, None) -> (B,) int64 ids, equal ids for equal conditions."""
    seen: dict[Any, int] = {}
    return torch.tensor([seen.setdefault(c, len(seen)) for c in conditions], dtype=torch.long)


def keep_mask(ids: torch.Tensor) -> torch.Tensor:
    """(B,) condition ids -> (B, B) bool: row i keeps column i and the first column of each
    condition other than its own (repeats of i's condition are no negatives; other repeats
    count once)."""
    b = ids.shape[0]
    same = ids[:, None] == ids[None, :]
    first = torch.ones(b, dtype=torch.bool, device=ids.device)
    first[1:] = ~torch.tril(same, diagonal=-1)[1:].any(dim=1)
    eye = torch.eye(b, dtype=torch.bool, device=ids.device)
    return eye | (first[None, :] & ~same)


def pair_errors(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """out (B, B, *shape) [image i, condition j], target (B, *shape) -> e (B, B): the mean
    squared error over all but the two leading dimensions."""
    return (out - target[:, None]).pow(2).flatten(2).mean(-1)


def softrepa_logits(errors: torch.Tensor, scale: torch.Tensor | float,
                    temperature: torch.Tensor | float) -> torch.Tensor:
    """scale * exp(-errors / temperature), errors' shape (SoftREPA ``ContrastiveLoss``)."""
    return scale * torch.exp(-errors / temperature)


def softrepa_loss(errors: torch.Tensor, ids: torch.Tensor, scale: torch.Tensor | float,
                  temperature: torch.Tensor | float, dweight: float = 0.0) -> torch.Tensor:
    """SoftREPA's objective (module docstring): errors (B, B), ids (B,) -> scalar.

    Cross-entropy of each image's row of logits with its own condition as the positive,
    masked columns (:func:`keep_mask`) removed, plus ``dweight`` times the mean matching error.
    """
    logits = softrepa_logits(errors, scale, temperature)
    logits = logits.masked_fill(~keep_mask(ids.to(errors.device)), float("-inf"))
    target = torch.arange(errors.shape[0], device=errors.device)
    return F.cross_entropy(logits, target) + dweight * errors.diagonal().mean()


def agsm_posterior(ema_out: torch.Tensor, target: torch.Tensor, ids: torch.Tensor,
                   eps_per_out: float, a_t: float = A_OF_T) -> torch.Tensor:
    """In-batch Plackett-Luce posterior p (B, B) from EMA outputs (B, B, *shape).

    r_ij = -(a_t / 2) sum_d (eps_per_out * (ema[i, j] - target[i]))^2; masked columns get
    probability 0. ``eps_per_out`` converts output differences to eps differences (the c4 of
    :func:`latentgeo.diffusion.grid.estimate_coefficients`: 1 for eps, alpha for v).
    """
    sq = (ema_out - target[:, None]).pow(2).flatten(2).sum(-1) * eps_per_out ** 2
    r = -(a_t / 2.0) * sq
    r = r.masked_fill(~keep_mask(ids.to(r.device)), float("-inf"))
    return torch.softmax(r, dim=1)


def agsm_targets(target: torch.Tensor, ema_out: torch.Tensor, ids: torch.Tensor,
                 eps_per_out: float, a_t: float = A_OF_T, gamma_pos: float = GAMMA_POS,
                 gamma_neg: float = GAMMA_NEG) -> tuple[torch.Tensor, torch.Tensor]:
    """(target_pos, target_neg), each target's shape (B, *shape): target +/- gamma * delta with
    delta_i = ema[i, i] - sum_j p_ij ema[i, j] (module docstring). No gradient flows."""
    with torch.no_grad():
        p = agsm_posterior(ema_out, target, ids, eps_per_out, a_t)
        b = target.shape[0]
        diag = ema_out[torch.arange(b), torch.arange(b)]
        mean = torch.einsum("ij,ij...->i...", p.to(ema_out.dtype), ema_out)
        delta = diag - mean
        return target + gamma_pos * delta, target - gamma_neg * delta


def agsm_loss(pos_out: torch.Tensor, neg_out: torch.Tensor, target_pos: torch.Tensor,
              target_neg: torch.Tensor) -> torch.Tensor:
    """mean |pos - target_pos|^2 + mean |neg - target_neg|^2 (all (B, *shape)) -> scalar."""
    return (pos_out - target_pos).pow(2).mean() + (neg_out - target_neg).pow(2).mean()


def ema_update(ema: torch.Tensor, value: torch.Tensor, decay: float = EMA_DECAY) -> None:
    """In place: ema <- decay ema + (1 - decay) value."""
    with torch.no_grad():
        ema.mul_(decay).add_(value.detach(), alpha=1.0 - decay)
