"""Centroids of a set of seeds: one signature, one registry.

Every centroid is ``f(x, weights=None, **opts) -> x.shape[1:]``: x is (N, *shape) (any float
dtype; geometry runs in float32/float64), weights an optional (N,) sequence of non-negative
numbers, used as given: unit weights are the unweighted formulas and integer weights are the
same as repeating seeds (for cog, whose formula assumes independent seeds, only the former).
``CENTROIDS`` maps CLI names to functions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from scipy.optimize import minimize

from latentgeo import chi
from latentgeo.errors import InputError
from latentgeo.metric import N_GRID, NAOMetric, solve_planar
from latentgeo.numerics import geometry_dtype

Centroid = Callable[..., torch.Tensor]


def _prepare(x: torch.Tensor, weights) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(x, torch.Tensor) or x.ndim < 2 or x.shape[0] < 1:
        raise InputError("centroids need a set of latents shaped (N, ...)")
    if not bool(torch.isfinite(x).all()):
        raise InputError("latents have NaN or infinite entries")
    dt = geometry_dtype(x)
    n = x.shape[0]
    if weights is None:
        w = torch.ones(n, dtype=dt)
    else:
        w = torch.as_tensor(weights, dtype=dt).reshape(-1)
        if w.numel() != n:
            raise InputError(f"{w.numel()} weights for {n} latents")
        if bool((w < 0).any()) or not bool(torch.isfinite(w).all()) or float(w.sum()) <= 0:
            raise InputError("weights must be finite, non-negative and not all zero")
    return x.to(dt), w


def euclidean(x: torch.Tensor, weights: Sequence[float] | None = None) -> torch.Tensor:
    """Weighted mean sum_i w_i x_i / sum_i w_i. Shape x.shape[1:]."""
    x, w = _prepare(x, weights)
    return (w.reshape((-1,) + (1,) * (x.ndim - 1)) * x).sum(0) / w.sum()


def normalized(x: torch.Tensor, weights: Sequence[float] | None = None) -> torch.Tensor:
    """The weighted mean rescaled to the chi mode sqrt(d - 1) (the NAO paper's baseline)."""
    m = euclidean(x, weights)
    n = m.norm()
    if float(n) == 0.0:
        raise InputError("the mean of these latents is 0: its direction is undefined")
    return m * (chi.mode(m.numel()) / n)


def cog(x: torch.Tensor, weights: Sequence[float] | None = None) -> torch.Tensor:
    """sum_i w_i x_i / sqrt(sum_i w_i^2) (Bodin et al., arXiv 2408.08558): for independent
    x_i ~ N(0, I) the result is again N(0, I). Unweighted: sum / sqrt(N)."""
    x, w = _prepare(x, weights)
    return (w.reshape((-1,) + (1,) * (x.ndim - 1)) * x).sum(0) / w.pow(2).sum().sqrt()


def spherical(x: torch.Tensor, weights: Sequence[float] | None = None, max_iters: int = 100,
              tol: float = 1e-10) -> torch.Tensor:
    """Weighted Karcher mean of the directions on the unit sphere (fixed-point iteration
    mu <- Exp_mu(sum w_i Log_mu(u_i) / sum w_i), Buss & Fillmore 2001), at radius = the
    weighted mean norm."""
    x, w = _prepare(x, weights)
    flat = x.flatten(1).to(torch.float64)
    norms = flat.norm(dim=1)
    if bool((norms == 0).any()):
        raise InputError("a zero latent has no direction")
    u = flat / norms[:, None]
    wd = w.to(torch.float64)
    mu = (wd[:, None] * u).sum(0)
    mu = mu / mu.norm() if float(mu.norm()) > 0 else u[0].clone()
    for _ in range(max_iters):
        c = (u @ mu).clamp(-1, 1)
        th = torch.acos(c)
        perp = u - c[:, None] * mu
        pn = perp.norm(dim=1)
        scale = torch.where(pn > 1e-15, th / torch.where(pn > 1e-15, pn, torch.ones_like(pn)),
                            torch.zeros_like(pn))
        v = (wd[:, None] * scale[:, None] * perp).sum(0) / wd.sum()
        vn = v.norm()
        if float(vn) < tol:
            break
        mu = torch.cos(vn) * mu + torch.sin(vn) * v / vn
        mu = mu / mu.norm()
    r = (wd * norms).sum() / wd.sum()
    return (r * mu).to(x.dtype).reshape(x.shape[1:])


def _span_coordinates(flat: np.ndarray):
    """Coordinates of the N points in an orthonormal basis of span{x_i} via the Gram matrix:
    returns (Y (N, k), basis (k, d)) with flat = Y @ basis."""
    G = flat @ flat.T
    lam, V = np.linalg.eigh(G)
    keep = lam > lam.max() * 1e-13
    lam, V = lam[keep], V[:, keep]
    Y = V * np.sqrt(lam)
    basis = (V / np.sqrt(lam)).T @ flat
    return Y, basis


def nao_objective(c: np.ndarray, Y: np.ndarray, w: np.ndarray, d: int, power: int,
                  prior: bool, n_grid: int = N_GRID, warm: dict | None = None):
    """J(c) = sum_i w_i D(c, y_i)^power + [prior] (-log p(|c|)) and its gradient, for c and the
    points Y (N, k) in span coordinates (float64 numpy). D and dD come from the planar solver;
    grad_c D(c, y) = (dD/d|c|) c/|c| + (dD/dtheta) grad_c theta (first variation)."""
    rc = float(np.linalg.norm(c))
    ry = np.linalg.norm(Y, axis=1)
    chat = c / rc
    cos = np.clip(Y @ chat / ry, -1.0, 1.0)
    perp = Y / ry[:, None] - cos[:, None] * chat[None, :]
    sin = np.linalg.norm(perp, axis=1)
    theta = np.arctan2(sin, cos)
    init = None
    if warm is not None and "G" in warm:
        init = (warm["G"], warm["delta"])
    sol = solve_planar(np.full(len(ry), rc), ry, theta, d, n_grid, init=init)
    if warm is not None:
        warm["G"], warm["delta"] = sol.grid, sol.delta
    D = sol.length
    # grad theta_i = -(e2_i) / |c| with e2_i the unit component of y_i orthogonal to c
    e2 = perp / np.where(sin > 1e-300, sin, 1.0)[:, None]
    gD = sol.d_ra[:, None] * chat[None, :] - (sol.d_theta / rc)[:, None] * e2
    coef = w * (power * D ** (power - 1))
    J = float((w * D**power).sum())
    g = (coef[:, None] * gD).sum(0)
    if prior:
        J += float(chi.weight(rc, d))
        g = g + (-(d - 1) / rc + rc) * chat
    return J, g, D


def nao(x: torch.Tensor, weights: Sequence[float] | None = None, power: int = 1,
        prior: bool | None = None, n_grid: int | None = None, tol: float = 1e-9,
        max_iters: int = 200, polish_grid: int | None = None, return_info: bool = False):
    """The exact NAO centroid (Samuel et al. 2023, centroid objective):

        argmin_c  sum_i w_i D(c, x_i)^power  +  [prior] (-log p(|c|)),

    D the NAO distance. power = 1 with the prior (default) is the paper's objective;
    power = 2 without it (default for power 2) is the Frechet mean. The minimiser lies in
    span{x_i} (reflection symmetry), so after one Gram matrix the search runs in k <= N
    dimensions: L-BFGS on the exact gradient (first variation of each planar geodesic),
    started from the normalised mean, with ``n_grid``-segment planar solves (default 48 for
    d >= 4096, where the planar error is ~1e-6, else 192; see the comment in the body),
    optionally polished on ``polish_grid`` segments.

    Returns the centroid (x.shape[1:], geometry dtype), or with ``return_info`` a pair
    (centroid, dict(objective, distances, iterations, gradient_norm)).
    """
    if power not in (1, 2):
        raise InputError(f"--power {power}: choose 1 (paper objective) or 2 (Frechet mean)")
    x, w = _prepare(x, weights)
    if prior is None:
        prior = power == 1
    d = x[0].numel()
    flat = x.flatten(1).to(torch.float64).numpy()
    if bool((np.abs(flat).max(1) == 0).any()):
        raise InputError("a zero latent has infinite NAO weight")
    Y, basis = _span_coordinates(flat)
    wn = w.to(torch.float64).numpy()
    if n_grid is None:
        n_grid = 48 if d >= 4096 else N_GRID
    mean = (wn[:, None] * Y).sum(0) / wn.sum()
    nm = float(np.linalg.norm(mean))
    c = mean * (chi.mode(d) / nm) if nm > 0 else Y[int(np.argmax(wn))].copy()
    nit = 0
    # The search uses planar solves on ``n_grid`` segments, with each pair's grid frozen after
    # the first evaluation (a consistent objective for L-BFGS). The planar error is second order
    # in the centroid objective at the optimum, so a coarse grid loses nothing measurable
    # (objective re-evaluated on N_GRID segments: same to ~1e-7 relative) and is ~3x cheaper.
    stages = ((n_grid, tol),) if polish_grid is None else ((n_grid, 1e-9), (polish_grid, tol))
    for grid, ftol in stages:
        warm: dict = {}

        def fun(cc, grid=grid, warm=warm):
            J, g, _ = nao_objective(cc, Y, wn, d, power, prior, grid, warm)
            return J, g

        res = minimize(fun, c, jac=True, method="L-BFGS-B",
                       options={"maxiter": max_iters, "gtol": 1e-12, "ftol": ftol})
        c, nit = res.x, nit + int(res.nit)
    out = torch.from_numpy(c @ basis).to(x.dtype).reshape(x.shape[1:])
    if return_info:
        J, g, D = nao_objective(c, Y, wn, d, power, prior, N_GRID)
        return out, {"objective": J, "distances": D.tolist(), "iterations": nit,
                     "gradient_norm": float(np.linalg.norm(g))}
    return out


def nao_objective_of(c: torch.Tensor, x: torch.Tensor, weights=None, power: int = 1,
                     prior: bool | None = None, n_grid: int = N_GRID) -> float:
    """The NAO centroid objective of any candidate c (shape x.shape[1:]) for the set x."""
    x, w = _prepare(x, weights)
    if prior is None:
        prior = power == 1
    metric = NAOMetric(x[0].numel(), n_grid)
    D = torch.stack([metric.dist(c, xi) for xi in x]).to(torch.float64)
    J = float((w.to(torch.float64) * D**power).sum())
    if prior:
        J += float(chi.weight(float(c.to(torch.float64).norm()), x[0].numel()))
    return J


def nao_reference(x: torch.Tensor, weights: Sequence[float] | None = None, power: int = 1,
                  prior: bool | None = None, n_points: int = 50, lr: float = 0.01,
                  max_iters: int = 10_000, patience: int = 100, rtol: float = 1e-6,
                  callback: Callable[[int, float], None] | None = None) -> torch.Tensor:
    """The paper's centroid optimiser (official code): joint Adam(lr) over the centroid c and N
    discretised paths c -> x_i of n_points points each, minimising

        sum_i w_i L_i^power + [prior] (-log p(|c|)),   L_i = sum_k w(|mid_k|) |seg_k|
                                                          + sum_k relu(|seg_k| - eps_i),

    eps_i = 2 |c_0 - x_i| / n_points from the initial c_0 = the normalised mean. Paths start on
    the segments c_0 -> x_i. Early stopping as in ``interpolation.nao_reference``. Runs on x's
    device; no printing. Returns c (x.shape[1:])."""
    from latentgeo.interpolation import _torch_weight

    x, w = _prepare(x, weights)
    if prior is None:
        prior = power == 1
    n, d = x.shape[0], x[0].numel()
    flat = x.flatten(1)
    c0 = normalized(x, weights).reshape(-1)
    c = c0.clone().requires_grad_(True)
    s = torch.linspace(0, 1, n_points, dtype=flat.dtype, device=flat.device)[1:-1]
    inner = ((1 - s)[None, :, None] * c0[None, None, :]
             + s[None, :, None] * flat[:, None, :]).clone().requires_grad_(True)
    eps = 2 * (c0[None] - flat).norm(dim=1) / n_points
    weight = _torch_weight(d)
    wt = w.to(flat.dtype)
    opt = torch.optim.Adam([c, inner], lr=lr)
    best, stale = math.inf, 0
    for it in range(max_iters):
        opt.zero_grad()
        path = torch.cat([c.expand(n, 1, d), inner, flat[:, None, :]], dim=1)
        seg = path[:, 1:] - path[:, :-1]
        seg_len = seg.norm(dim=2)
        mid = (path[:, 1:] + path[:, :-1]) / 2
        L = (weight(mid.norm(dim=2)) * seg_len).sum(1) + torch.relu(seg_len - eps[:, None]).sum(1)
        loss = (wt * L**power).sum()
        if prior:
            loss = loss + weight(c.norm())
        loss.backward()
        opt.step()
        value = float(loss.detach())
        if callback is not None:
            callback(it, value)
        if value < best * (1 - rtol):
            best, stale = value, 0
        else:
            stale += 1
            if stale >= patience:
                break
    return c.detach().reshape(x.shape[1:])


#: name -> centroid, the API's and the CLI's ``--method`` choices.
CENTROIDS: dict[str, Centroid] = {
    "euclidean": euclidean,
    "normalized": normalized,
    "cog": cog,
    "spherical": spherical,
    "nao": nao,
    "nao-reference": nao_reference,
}


def get_centroid(name: str) -> Centroid:
    """Look a method up by name; unknown names are refused with the list of valid ones."""
    if name not in CENTROIDS:
        raise InputError(f"unknown centroid method {name!r} (choose from {', '.join(CENTROIDS)})")
    return CENTROIDS[name]
