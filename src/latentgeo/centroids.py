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

from latentgeo import chi
from latentgeo.errors import InputError
from latentgeo.metric import N_GRID, NAOMetric, regrid, solve_planar
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


def _angles(c: np.ndarray, Y: np.ndarray):
    """|c|, c/|c|, |y_i|, and per point y_i: the angle theta_i to c, cos, sin, and e2_i, the
    unit component of y_i orthogonal to c (grad theta_i = -e2_i / |c|)."""
    rc = math.sqrt(float(c @ c))
    chat = c / rc
    ry = np.sqrt((Y * Y).sum(1))
    cos = np.clip(Y @ chat / ry, -1.0, 1.0)
    perp = Y / ry[:, None] - cos[:, None] * chat[None, :]
    sin = np.sqrt((perp * perp).sum(1))
    theta = np.arctan2(sin, cos)
    e2 = perp / np.where(sin > 1e-300, sin, 1.0)[:, None]
    return rc, chat, ry, theta, cos, sin, e2


def _solve_pairs(rc, ry, theta, d, n_grid, warm, hessian):
    """Planar solves c -> y_i, warm-started from ``warm`` (the previous solution's grid and
    profile, moved to first order with its sensitivities), which is then updated."""
    init = None
    if warm and warm["grid"].shape[1] == n_grid + 1:
        delta = warm["delta"]
        if warm.get("sens") is not None:
            delta = (delta + warm["sens"][..., 0] * (rc - warm["rc"])
                     + warm["sens"][..., 1] * (theta - warm["theta"])[:, None])
        init = (warm["grid"], delta)
    sol = solve_planar(np.full(len(ry), rc), ry, theta, d, n_grid, init=init, hessian=hessian)
    if warm is not None:
        warm.update(grid=sol.grid, delta=sol.delta, sens=sol.sens, rc=rc, theta=theta)
    return sol


def nao_objective(c: np.ndarray, Y: np.ndarray, w: np.ndarray, d: int, power: int,
                  prior: bool, n_grid: int = N_GRID, warm: dict | None = None,
                  hessian: bool = False):
    """J(c) = sum_i w_i D(c, y_i)^power + [prior] (-log p(|c|)), its gradient and (with
    ``hessian``) its Hessian, for c (k,) and the points Y (N, k) in span coordinates (float64
    numpy). Returns (J, grad (k,), D (N,)) or (J, grad, D, hess (k, k)).

    D and its derivatives in (|c|, theta_i) come from the planar solver (first and second
    variation via the envelope theorem: exact for the discrete problem); the chain rule uses
    grad |c| = u = c/|c|, grad theta_i = -e2_i/|c|, Hess |c| = (I - u u^T)/|c| and
    Hess theta_i = (u e2_i^T + e2_i u^T + cot(theta_i) (I - u u^T - e2_i e2_i^T)) / |c|^2.
    ``warm``: a dict carried between calls (frozen grids, warm-started profiles)."""
    rc, u, ry, theta, cos, sin, e2 = _angles(c, Y)
    sol = _solve_pairs(rc, ry, theta, d, n_grid, warm, hessian)
    D = sol.length
    gD = sol.d_ra[:, None] * u[None, :] - (sol.d_theta / rc)[:, None] * e2
    a = w * (power * D ** (power - 1))
    J = float((w * D**power).sum())
    g = a @ gD
    if prior:
        J += float(0.5 * rc * rc - (d - 1) * math.log(rc) + chi.log_norm_const(d))
        g = g + (rc - (d - 1) / rc) * u
    if not hessian:
        return J, g, D
    k = len(c)
    h_rr, h_rt, h_tt = sol.hess[:, 0, 0], sol.hess[:, 0, 1], sol.hess[:, 1, 1]
    # d_theta cot(theta) -> h_tt as theta -> 0 (d_theta ~ h_tt theta there)
    small = theta < 1e-6
    tcot = np.where(small, h_tt, sol.d_theta * cos / np.where(small, 1.0, sin))
    uu = np.outer(u, u)
    P = np.eye(k) - uu
    v = (a * (sol.d_theta - h_rt * rc)) @ e2 / rc**2
    H = float(a @ h_rr) * uu + (np.outer(u, v) + np.outer(v, u))
    H += (e2.T * (a * (h_tt - tcot) / rc**2)) @ e2
    H += (float(a @ sol.d_ra) / rc + float(a @ tcot) / rc**2) * P
    if power == 2:
        H += (gD.T * (2 * w)) @ gD
    if prior:
        H += (1 + (d - 1) / rc**2) * uu + (1 - (d - 1) / rc**2) * P
    return J, g, D, H


def _polar_step(c, g, H):
    """Newton step for J in polar coordinates c = (|c| + rho) Exp(v): radius and direction
    move separately (a tangent step does not change |c|, which matters because J is far stiffer
    radially than along the sphere). With Q = [u, T] an orthonormal basis (u = c/|c|), the
    Hessian in (rho, v) is Q^T H Q with the sphere's curvature terms: -(g.u)/|c| on the
    tangent block, + T^T g / |c| on the radial-tangent block. Negative eigenvalues are
    flipped, tiny ones floored. Returns (rho, v (k,), decrement -g.step)."""
    rc = math.sqrt(float(c @ c))
    u = c / rc
    Q = np.linalg.qr(np.column_stack([u, np.eye(len(c))]))[0]
    Q[:, 0] = u
    gh = Q.T @ g
    Hh = Q.T @ H @ Q
    Hh[1:, 1:] -= (gh[0] / rc) * np.eye(len(c) - 1)
    Hh[0, 1:] += gh[1:] / rc
    Hh[1:, 0] += gh[1:] / rc
    lam, V = np.linalg.eigh(Hh)
    floor = max(float(np.abs(lam).max()), 1e-300) * 1e-10
    sh = -V @ ((V.T @ gh) / np.maximum(np.abs(lam), floor))
    return float(sh[0]), Q[:, 1:] @ sh[1:], -float(gh @ sh)


def _retract(c, rho, v):
    """(|c| + rho) times the unit direction reached from c/|c| along the great circle of
    tangent v (length |v| / |c| radians)."""
    rc = math.sqrt(float(c @ c))
    u = c / rc
    nv = math.sqrt(float(v @ v))
    if nv == 0.0:
        return (rc + rho) * u
    a = nv / rc
    return (rc + rho) * (math.cos(a) * u + math.sin(a) * v / nv)


def _newton_search(c, Y, w, d, power, prior, n_grid, warm, max_iters, rtol, blind=False):
    """Minimise J over span coordinates by Newton's method with the exact Hessian in polar
    coordinates (``_polar_step``) and a backtracking line search; stops when the Newton
    decrement is below rtol * |J|. Pairs whose angle has changed by more than a factor 1.5
    since their grid was laid out are regridded (and J re-evaluated). ``blind``: a final step
    whose decrement is already tiny (< 1e-9 |J|: the quadratic zone) is taken without a new
    evaluation. Returns (c, J, g, D, iterations)."""
    J, g, D, H = nao_objective(c, Y, w, d, power, prior, n_grid, warm, True)
    warm.setdefault("theta_grid", warm["theta"])
    it = 0
    for it in range(1, max_iters + 1):
        rho, v, dec = _polar_step(c, g, H)
        if not dec > rtol * abs(J):
            it -= 1
            break
        if blind and dec < 1e-9 * abs(J):
            return _retract(c, rho, v), J - dec / 2, g, D, it
        # stay where the quadratic model is meaningful: at most 10% of |c| per step
        rc = math.sqrt(float(c @ c))
        alpha = min(1.0, 0.1 * rc / max(math.hypot(rho, math.sqrt(float(v @ v))), 1e-300))
        for _ in range(30):
            ct = _retract(c, alpha * rho, alpha * v)
            Jt, gt, Dt, Ht = nao_objective(ct, Y, w, d, power, prior, n_grid, warm, True)
            if Jt <= J - 1e-4 * alpha * dec or (dec < 1e-9 * abs(J)
                                                 and Jt <= J + 1e-13 * abs(J)):
                break
            alpha /= 2
        else:
            break
        c, J, g, D, H = ct, Jt, gt, Dt, Ht
        ratio = warm["theta"] / np.maximum(warm["theta_grid"], 1e-300)
        if (ratio > 1.5).any() or (ratio < 1 / 1.5).any():
            G, delta = regrid(warm["grid"], warm["delta"], warm["theta"], n_grid)
            warm.update(grid=G, delta=delta, sens=None, theta_grid=warm["theta"])
            J, g, D, H = nao_objective(c, Y, w, d, power, prior, n_grid, warm, True)
    return c, J, g, D, it


def nao(x: torch.Tensor, weights: Sequence[float] | None = None, power: int = 1,
        prior: bool | None = None, n_grid: int | None = None,
        polish_grid: int | None = N_GRID,
        tol: float = 1e-12, max_iters: int = 100, return_info: bool = False):
    """The exact NAO centroid (Samuel et al. 2023, centroid objective):

        argmin_c  sum_i w_i D(c, x_i)^power  +  [prior] (-log p(|c|)),

    D the NAO distance. power = 1 with the prior (default) is the paper's objective;
    power = 2 without it (default for power 2) is the Frechet mean. The minimiser lies in
    span{x_i} (reflection symmetry), so after one Gram matrix the search runs in k <= N
    dimensions: Newton's method with the exact gradient and Hessian of the discrete planar
    distances (first and second variation, envelope theorem), started from the normalised
    mean, each planar solve warm-started from the previous iterate's profile moved by its
    sensitivities. The search runs on coarse ``n_grid``-segment planar solves (default 48 for
    d >= 4096, where the planar error is ~1e-6 relative, else N_GRID), then Newton
    continues on ``polish_grid`` segments (the metric's default grid; None: no polish) from
    the coarse profiles, regridded; each stage stops when the Newton decrement is below
    ``tol`` * |J|. ``return_info`` reports J, its gradient and the distances from fresh
    N_GRID planar solves (the yardstick of ``nao_objective_of``).

    Returns the centroid (x.shape[1:], geometry dtype), or with ``return_info`` a pair
    (centroid, dict(objective, distances, iterations, gradient_norm)).
    """
    if power not in (1, 2):
        raise InputError(f"power {power}: choose 1 (paper objective) or 2 (Frechet mean)")
    x, w = _prepare(x, weights)
    if prior is None:
        prior = power == 1
    d = x[0].numel()
    flat = x.flatten(1).to(torch.float64).numpy()
    if bool((np.abs(flat).max(1) == 0).any()):
        raise InputError("a zero latent has infinite NAO weight")
    Y, basis = _span_coordinates(flat)
    wn = w.to(torch.float64).numpy()
    mean = (wn[:, None] * Y).sum(0) / wn.sum()
    nm = float(np.linalg.norm(mean))
    c = mean * (chi.mode(d) / nm) if nm > 0 else Y[int(np.argmax(wn))].copy()
    if n_grid is None:
        n_grid = 48 if d >= 4096 else N_GRID
    warm: dict = {}
    c, J, g, D, nit = _newton_search(c, Y, wn, d, power, prior, n_grid, warm, max_iters, tol)
    if polish_grid is not None and polish_grid != n_grid:
        G, delta = regrid(warm["grid"], warm["delta"], warm["theta"], polish_grid)
        warm = {"grid": G, "delta": delta, "sens": None, "theta_grid": warm["theta"]}
        c, J, g, D, more = _newton_search(c, Y, wn, d, power, prior, polish_grid, warm,
                                          max_iters, tol, blind=True)
        nit += more
    out = torch.from_numpy(c @ basis).to(x.dtype).reshape(x.shape[1:])
    if return_info:  # the yardstick of ``nao_objective_of``: fresh planar solves, N_GRID
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
    from latentgeo.interpolation import _torch_weight, adam_until_stale

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

    def loss_fn() -> torch.Tensor:
        path = torch.cat([c.expand(n, 1, d), inner, flat[:, None, :]], dim=1)
        seg_len = (path[:, 1:] - path[:, :-1]).norm(dim=2)
        mid = (path[:, 1:] + path[:, :-1]) / 2
        L = (weight(mid.norm(dim=2)) * seg_len).sum(1) + torch.relu(seg_len - eps[:, None]).sum(1)
        loss = (wt * L**power).sum()
        return loss + weight(c.norm()) if prior else loss

    adam_until_stale(loss_fn, [c, inner], lr, max_iters, patience, rtol, callback)
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
