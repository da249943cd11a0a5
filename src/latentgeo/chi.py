"""The chi prior on seed norms: |z| for z ~ N(0, I_d) follows the chi distribution with d dof.

Everything is computed in float64 with ``lgamma``; nothing overflows for d up to 10^6 and
beyond (densities are returned as logs).

    log p(r) = (d-1) log r - r^2/2 - (d/2 - 1) log 2 - lgamma(d/2)          (NAO paper, Sec. 3)

The NAO weight is w(r) = -log p(r). Its minimum over r (at the mode) is -log of the chi peak
density, which is >= 0.2258 for every d >= 1 (0.2258 at d = 1, 0.5 at d = 2, -> 0.5724 as
d -> infinity), so w > 0 everywhere and the NAO length is a genuine (conformal) Riemannian
length: no shift or clipping is needed (``tests/test_chi.py`` checks this over d).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import special, stats


def _as64(r) -> torch.Tensor:
    return torch.as_tensor(r, dtype=torch.float64)


def log_norm_const(d: int) -> float:
    """(d/2 - 1) log 2 + lgamma(d/2): minus the log normaliser of the chi density."""
    return (d / 2 - 1) * math.log(2.0) + math.lgamma(d / 2)


def log_prob(r, d: int) -> torch.Tensor:
    """log p(r) of the chi distribution with ``d`` dof; r: any shape, returns float64 same shape.

    r = 0 gives -inf for d > 1 (the density vanishes there), log sqrt(2/pi) for d = 1.
    """
    r = _as64(r)
    if d == 1:
        return -0.5 * r * r - log_norm_const(d)
    return (d - 1) * torch.log(r) - 0.5 * r * r - log_norm_const(d)


def weight(r, d: int) -> torch.Tensor:
    """NAO weight w(r) = -log p(r) > 0 (float64, same shape as r)."""
    return -log_prob(r, d)


def mode(d: int) -> float:
    """Mode sqrt(d - 1) of the chi distribution (0 for d = 1)."""
    return math.sqrt(max(d - 1, 0))


def _one_minus_s(d: int) -> float:
    """1 - s for Gamma(x + 1/2) / Gamma(x) = sqrt(x) s, x = d/2: the asymptotic series
    1/(8x) - 1/(128x^2) - 5/(1024x^3) + 21/(32768x^4) + O(x^-5) (used for d >= 10^4)."""
    x = d / 2
    return 1 / (8 * x) - 1 / (128 * x**2) - 5 / (1024 * x**3) + 21 / (32768 * x**4)


def mean(d: int) -> float:
    """Mean sqrt(2) Gamma((d+1)/2) / Gamma(d/2): lgamma for d < 10^4, the asymptotic series
    sqrt(d) s above (lgamma differences of huge values lose digits there)."""
    if d >= 10_000:
        return math.sqrt(d) * (1 - _one_minus_s(d))
    return math.sqrt(2.0) * math.exp(math.lgamma((d + 1) / 2) - math.lgamma(d / 2))


def variance(d: int) -> float:
    """Variance d - mean^2 (tends to 1/2 as d grows).

    For d >= 10^4 the cancellation in d - mean^2 is avoided with the series of ``mean``:
    d - mean^2 = d (1 - s)(1 + s).
    """
    if d >= 10_000:
        one_minus_s = _one_minus_s(d)
        return d * one_minus_s * (2 - one_minus_s)
    m = mean(d)
    return max(d - m * m, 0.0)


def cdf(r, d: int) -> torch.Tensor:
    """P(|z| <= r) = regularised lower incomplete gamma P(d/2, r^2/2); float64."""
    r = np.asarray(_as64(r).numpy(), dtype=np.float64)
    return torch.from_numpy(np.asarray(special.gammainc(d / 2, 0.5 * r * r), dtype=np.float64))


def quantile(q, d: int) -> torch.Tensor:
    """Inverse cdf: sqrt of the chi-square(d) quantile; q in [0, 1], float64 same shape."""
    q = np.asarray(_as64(q).numpy(), dtype=np.float64)
    return torch.from_numpy(np.sqrt(np.asarray(stats.chi2.ppf(q, d), dtype=np.float64)))


def z_score(r, d: int) -> torch.Tensor:
    """(r - mean) / std: how many standard deviations a norm is from the chi mean."""
    return (_as64(r) - mean(d)) / math.sqrt(variance(d))


def norm_z_scores(x: torch.Tensor) -> torch.Tensor:
    """Per row of x (B, ...): z_score(|x_i|, d) with d = numel of one row; float64 (B,).

    How far each seed's norm is from the chi(d) mean of an N(0, I_d) seed, in standard
    deviations (norms taken in float64, so large float32 latents do not overflow).
    """
    d = x[0].numel()
    return z_score(x.detach().flatten(1).to(torch.float64).norm(dim=1), d)
