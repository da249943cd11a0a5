"""Bring a latent back to the typical set of N(0, I): ``reproject``.

Two modes, both stopping as soon as ``gaussianity_stats`` passes (a latent that already passes
is returned unchanged):

* an optimiser on  |z' - z|^2 / d + strength * R(z')  for any regulariser R of
  ``latentgeo.regularizers`` (Adam from z' = z; Hwang et al. 2025, the reward-hacking fix);
* ``fast``, closed form and alternated a few times: (1) marginal Gaussianisation by ranks,
  x_(i) -> Phi^-1((i - 1/2) / d); (2) spectral whitening: per channel and radial band of the
  rfft2, the powers are replaced by the Exponential(1) (chi-square(1) for DC/Nyquist) quantiles
  of their ranks, phases kept; (3) rescaling to the chi mean E|z|.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.special as sps
import torch

from latentgeo.errors import InputError
from latentgeo.gaussianity import (
    DEFAULT_ALPHA,
    GaussianityReport,
    as_channels,
    chi_mean,
    gaussianity_stats,
    spectral_layout,
)
from latentgeo.numerics import geometry_dtype
from latentgeo.regularizers import REGULARIZERS, get_regularizer

#: Methods accepted by ``reproject``: every regulariser but ``none``, plus the closed-form
#: ``fast``.
METHODS: tuple[str, ...] = ("fast", *(n for n in REGULARIZERS if n != "none"))


@dataclass(frozen=True)
class ReprojectResult:
    """``latent``: z' (z's shape and dtype); ``steps``: optimiser steps or fast iterations run;
    ``distance``: |z' - z|; ``relative_distance``: |z' - z| / |z|."""

    latent: torch.Tensor
    method: str
    steps: int
    passed: bool
    distance: float
    relative_distance: float
    before: GaussianityReport
    after: GaussianityReport


def reproject(z: torch.Tensor, method: str = "fast", strength: float = 1.0,
              max_steps: int = 500, lr: float = 0.02, alpha: float = DEFAULT_ALPHA,
              check_every: int = 5, callback: Callable[..., None] | None = None
              ) -> ReprojectResult:
    """Find z' near z that passes ``gaussianity_stats`` at level ``alpha``.

    z: (C, H, W) or any shape with >= 2 trailing spatial dims, float; returns z' with z's
    shape, dtype and device. Optimiser methods minimise |z' - z|^2 / d + strength * R(z') with
    Adam (``lr``), checking the stats every ``check_every`` steps, for at most ``max_steps``;
    ``fast`` runs at most ``max_steps`` closed-form iterations (it usually needs 1-3).
    ``callback(step=i, loss=float)`` is called after every step.
    """
    if method not in METHODS:
        raise InputError(f"unknown reproject method {method!r} (choose from {', '.join(METHODS)})")
    if strength <= 0 or not math.isfinite(strength):
        raise InputError(f"strength must be a positive number, got {strength}")
    if max_steps < 0:
        raise InputError(f"max_steps must be >= 0, got {max_steps}")
    before = gaussianity_stats(z, alpha)
    x0 = z.detach().to(geometry_dtype(z))
    x, steps, after = x0, 0, before
    if not before.passed:
        if method == "fast":
            x, steps, after = _fast(x0, max_steps, alpha, callback)
        else:
            x, steps, after = _optimise(x0, get_regularizer(method), strength, max_steps, lr,
                                        alpha, max(1, check_every), callback)
    dist = float((x - x0).norm())
    return ReprojectResult(latent=x.to(z.dtype), method=method, steps=steps, passed=after.passed,
                           distance=dist, relative_distance=dist / max(float(x0.norm()), 1e-300),
                           before=before, after=after)


def _optimise(x0, reg, strength, max_steps, lr, alpha, check_every, callback):
    d = x0.numel()
    x = x0.clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr)
    report = None
    step = 0
    for step in range(1, max_steps + 1):
        opt.zero_grad(set_to_none=True)
        loss = ((x - x0) ** 2).sum() / d + strength * reg(x)
        loss.backward()
        opt.step()
        if callback is not None:
            callback(step=step, loss=float(loss.detach()))
        if step % check_every == 0 or step == max_steps:
            report = gaussianity_stats(x.detach(), alpha)
            if report.passed:
                break
    if report is None:
        report = gaussianity_stats(x.detach(), alpha)
    return x.detach(), step, report


# ---------------------------------------------------------------------------------------------
# Closed-form mode.

#: Bins per whitening band: small enough to flatten smooth spectral shapes locally.
WHITEN_BAND = 64


def gaussianize_marginal(x: torch.Tensor) -> torch.Tensor:
    """Rank Gaussianisation: the i-th smallest entry becomes Phi^-1((i - 1/2) / d). Any shape."""
    flat = x.flatten()
    d = flat.numel()
    ranks = torch.empty(d, dtype=torch.long, device=x.device)
    ranks[torch.argsort(flat)] = torch.arange(d, device=x.device)
    q = torch.special.ndtri((ranks.to(x.dtype) + 0.5) / d)
    return q.reshape(x.shape)


@functools.lru_cache(maxsize=16)
def _whitening_plan(h: int, w: int) -> tuple[torch.Tensor, ...]:
    """Per rfft2 cell, the position of its owner among the independent bins; bin band ids."""
    index, is_real, radius = spectral_layout(h, w)
    wr = w // 2 + 1
    pos = torch.full((h * wr,), -1, dtype=torch.long)
    pos[index] = torch.arange(index.numel())
    k1 = torch.arange(h).unsqueeze(1).expand(h, wr).flatten()
    k2 = torch.arange(wr).unsqueeze(0).expand(h, wr).flatten()
    partner = ((-k1) % h) * wr + k2
    owner = torch.where(pos >= 0, pos, pos[partner])
    n_cplx = int((~is_real).sum())
    nb = max(1, n_cplx // WHITEN_BAND)
    band = torch.full((index.numel(),), -1, dtype=torch.long)
    cplx = torch.nonzero(~is_real).squeeze(1)
    order = cplx[torch.argsort(radius[cplx], stable=True)]
    band[order] = torch.arange(n_cplx) * nb // max(n_cplx, 1)
    return owner, band, is_real, torch.tensor(nb)


def whiten_spectrum(x: torch.Tensor) -> torch.Tensor:
    """Spectral whitening by ranks: x (C, H, W) -> (C, H, W).

    Per channel and per radial band of ~64 complex bins, each power |X_k|^2/(HW) is replaced by
    the Exponential(1) quantile -log(1 - (r + 1/2)/m) of its rank r among the band's m bins;
    the real (DC/Nyquist) bins get chi-square(1) quantiles of their ranks. Phases are kept, and
    conjugate-duplicate rfft2 cells get their owner's factor, so the result stays real.
    """
    c, h, w = x.shape
    owner, band, is_real, nb = _whitening_plan(h, w)
    index, _, _ = spectral_layout(h, w)
    spec = torch.fft.rfft2(x, norm="ortho")
    flat = spec.reshape(c, -1)
    p = (flat[:, index].abs() ** 2).cpu().double().numpy()  # (C, n_bins)
    target = np.empty_like(p)
    band_np, real_np = band.numpy(), is_real.numpy()
    for b in range(int(nb)):
        sel = band_np == b
        target[:, sel] = _rank_quantiles(p[:, sel], lambda u: -np.log1p(-u))
    if real_np.any():
        target[:, real_np] = _rank_quantiles(p[:, real_np], lambda u: 2 * sps.gammaincinv(0.5, u))
    # A bin with (numerically) no power cannot be rescaled: give it the target magnitude.
    empty = p < 1e-24
    factor = np.sqrt(target / np.where(empty, 1.0, p))
    fill = np.where(empty, np.sqrt(target), 0.0)
    own = owner.to(x.device)
    factor_t = torch.from_numpy(np.where(empty, 0.0, factor)).to(x.device)[:, own]
    fill_t = torch.from_numpy(fill).to(x.device)[:, own]
    new = flat.to(torch.complex128) * factor_t + fill_t
    out = torch.fft.irfft2(new.reshape(spec.shape), s=(h, w), norm="ortho")
    return out.to(x.dtype)


def _rank_quantiles(p: np.ndarray, quantile: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    m = p.shape[1]
    ranks = np.argsort(np.argsort(p, axis=1), axis=1)
    return quantile((ranks + 0.5) / m)


def _fast(x0, max_iters, alpha, callback):
    shape = x0.shape
    d = x0.numel()
    r_target = chi_mean(d)
    x = x0
    report = gaussianity_stats(x, alpha)
    it = 0
    for it in range(1, max_iters + 1):
        y = gaussianize_marginal(x)
        y = whiten_spectrum(as_channels(y)).reshape(shape)
        x = y * (r_target / y.norm().clamp_min(1e-300))
        if callback is not None:
            callback(step=it, loss=float("nan"))
        report = gaussianity_stats(x, alpha)
        if report.passed:
            break
    return x, it, report
