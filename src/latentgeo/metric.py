"""The NAO metric: a conformal, rotation-invariant Riemannian metric on latent space.

NAO (Samuel et al., NeurIPS 2023, arXiv 2306.08687) measures a path gamma by

    L(gamma) = integral of w(|gamma(s)|) ds,      w(r) = -log chi_d(r)  (> 0, see ``chi``).

Planar reduction (MISSION.md, "Interpolation"): w depends only on |x|, so every geodesic from x
to y lies in the plane span{x, y}. In log-polar coordinates (phi, u = log r) of that plane the
line element is  w(r) sqrt(dr^2 + r^2 dphi^2) = W(u) sqrt(du^2 + dphi^2)  with W(u) = r w(r):
the 2-D problem is a conformally flat one in a strip, and a minimiser is a graph u(phi),
phi in [0, theta] (phi is cyclic, so W(u) cos(alpha) is conserved; we do not shoot on that
constant because near the shell the problem is exponentially stiff, see below).

Solver (our choice, and why)
----------------------------
Shooting on the conserved quantity fails at realistic d: away from the shell the path dives
radially to the chi shell, rides it and climbs out, and the conserved constant differs from its
limit by ~exp(-kappa theta) with kappa ~ sqrt(2 d / w_min) (kappa ~ 240 at d = 16384), far below
float64 resolution. We instead solve the *discretised 1-D boundary-value problem*:

* u(phi) on a Chebyshev grid phi_k = theta (1 - cos(pi k / M)) / 2 (dense where the path turns
  from radial to along the shell, i.e. near the ends), endpoints fixed;
* each grid segment is a straight segment in (phi, u), i.e. a logarithmic spiral arc in the real
  plane, and its NAO length  |segment| * mean(W over the segment)  is integrated with
  Gauss-Legendre (``_Q`` nodes), so the discrete objective is the exact length of a real path:
  it is an upper bound on the true distance that converges as M grows;
* Newton iterations in float64 (tridiagonal Hessian, one banded solve for a whole batch of
  pairs, Levenberg-Marquardt damping and backtracking for robustness), initialised with the
  exact solution of the problem linearised around the shell (a sinh profile).

Degenerate cases: theta ~ 0 (below ``THETA_MIN``) is the radial segment, whose length is
F(|y|) - F(|x|) with F' = w in closed form; the route through the origin (length
F(|x|) + F(|y|), any theta) is compared with the planar geodesic and taken if shorter (only
ever at very small d and theta ~ pi). theta = pi: every plane through x is optimal; we pick a
fixed orthogonal direction. Derivatives of the distance with respect to |x|, |y| and theta come
from the envelope theorem on the discrete problem, so they are exact for the value returned.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.integrate import solve_ivp
from scipy.linalg.lapack import dgtsv

from latentgeo import chi
from latentgeo.errors import InputError, ShapeError
from latentgeo.numerics import eps as dtype_eps
from latentgeo.numerics import geometry_dtype
from latentgeo.spacings import DEFAULT_SPACING, SPACINGS

#: Angles below this (radians) are treated as 0: the geodesic is the radial segment.
THETA_MIN = 1e-9
#: Gauss-Legendre nodes per segment (on [0, 1]).
_Q = 6
_GS, _GW = np.polynomial.legendre.leggauss(_Q)
_GS, _GW = (_GS + 1) / 2, _GW / 2
#: Default number of grid segments of the planar solver.
N_GRID = 192


# --------------------------------------------------------------------------------------------
# The planar weight in shell coordinates: delta = log(r / r0), r0 = sqrt(d - 1) (chi mode).
# W~(delta) = W(u) / r0 = e^delta (w0 + A h(delta)),  A = d - 1,  h = (expm1(2 delta) - 2 delta)/2
# which is w(r) = w(r0) - A log(r/r0) + (r^2 - r0^2)/2 written without cancellation.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Shell:
    d: int
    r0: float
    A: float
    w0: float
    delta_star: float  # argmin of W~ near the shell
    kappa: float       # sqrt(W~''/W~) at the minimum: the inverse width of the turning layers
    has_shell: bool = True  # False for d = 2, where W~ is monotone (no channel along the shell)
    W_star: float = 1.0     # W~(delta_star)


def _w_terms(delta: np.ndarray, s: _Shell):
    e = np.exp(delta)
    m = np.expm1(2 * delta)
    w = s.w0 + s.A * (m - 2 * delta) / 2
    wd = s.A * m
    wdd = 2 * s.A * (m + 1)
    return e * w, e * (w + wd), e * (w + 2 * wd + wdd)


def _shell(d: int) -> _Shell:
    if d < 2:
        raise InputError(f"the NAO metric needs latents with at least 2 entries (got d = {d})")
    A = float(d - 1)
    r0 = math.sqrt(A)
    w0 = float(chi.weight(r0, d))
    s = _Shell(d, r0, A, w0, 0.0, 1.0)
    x = -w0 / (2 * A)
    for _ in range(50):  # Newton on W~'(delta) = 0
        _, w1, w2 = _w_terms(np.array(x), s)
        step = float(w1 / w2)
        x -= step
        if abs(step) < 1e-15:
            break
    w, w1, w2 = _w_terms(np.array(x), s)
    ok = bool(np.isfinite(x) and abs(float(w1)) < 1e-9 * float(w) and float(w2) > 0 and x > -1)
    if not ok:
        return _Shell(d, r0, A, w0, 0.0, 1.0, False, float(_w_terms(np.array(0.0), s)[0]))
    return _Shell(d, r0, A, w0, x, math.sqrt(float(w2 / w)), True, float(w))


_SHELLS: dict[int, _Shell] = {}


def shell(d: int) -> _Shell:
    if d not in _SHELLS:
        _SHELLS[d] = _shell(d)
    return _SHELLS[d]


def _weight_np(r: np.ndarray, d: int) -> np.ndarray:
    """w(r) = -log chi_d(r) for d >= 2 in float64 numpy (``chi.weight`` without torch)."""
    return 0.5 * r * r - (d - 1) * np.log(r) + chi.log_norm_const(d)


def radial_antiderivative(r, d: int) -> np.ndarray:
    """F(r) = integral_0^r w(rho) d rho in closed form (float64 numpy, any shape).

    F(r) = -(d-1)(r log r - r) + r^3/6 + K r,  K = (d/2 - 1) log 2 + lgamma(d/2).
    """
    r = np.asarray(r, dtype=np.float64)
    rlogr = np.where(r > 0, r * np.log(np.where(r > 0, r, 1.0)), 0.0)
    return -(d - 1) * (rlogr - r) + r**3 / 6 + chi.log_norm_const(d) * r


# --------------------------------------------------------------------------------------------
# Batched planar solver.
# --------------------------------------------------------------------------------------------


@dataclass
class PlanarSolution:
    """Geodesics of a batch of B planar problems (|x|, |y|, theta); float64 numpy arrays.

    ``length`` (B,) NAO distance; ``d_ra``, ``d_rb``, ``d_theta`` (B,) its partial derivatives;
    ``kind`` (B,) 0 = planar (graph u(phi)), 1 = radial (theta ~ 0), 2 = through the origin;
    ``phi``, ``delta`` (B, M+1) the path (delta = log(r / r0)) for kind 0 and 1.
    """

    length: np.ndarray
    d_ra: np.ndarray
    d_rb: np.ndarray
    d_theta: np.ndarray
    kind: np.ndarray
    phi: np.ndarray
    delta: np.ndarray
    ra: np.ndarray
    rb: np.ndarray
    theta: np.ndarray
    shell: _Shell
    grid: np.ndarray  # (B, M+1) grid fractions phi / theta
    #: with ``solve_planar(..., hessian=True)``: (B, 2, 2) second derivatives of ``length`` in
    #: (|x|, theta), and (B, M+1, 2) the derivatives of ``delta`` in (|x|, theta) at fixed
    #: grid fractions (implicit function theorem), to predict the profile after a small move.
    hess: np.ndarray | None = None
    sens: np.ndarray | None = None


def _grid(M: int) -> np.ndarray:
    return (1 - np.cos(np.pi * np.arange(M + 1) / M)) / 2


def _init_profile(da, db, theta, g, s: _Shell) -> np.ndarray:
    """Exact geodesic of the metric linearised at the shell: a sinh profile (B, M+1)."""
    x = (s.kappa * theta)[:, None]
    gg = g[None, :]
    big = x > 1e-8
    xs = np.where(big, x, 1.0)
    den = -np.expm1(-2 * xs)
    e1 = (np.exp(-xs * gg) - np.exp(-xs * (2 - gg))) / den
    e2 = (np.exp(-xs * (1 - gg)) - np.exp(-xs * (1 + gg))) / den
    e1 = np.where(big, e1, 1 - gg)
    e2 = np.where(big, e2, gg)
    ds = s.delta_star
    return ds + (da[:, None] - ds) * e1 + (db[:, None] - ds) * e2


def _objective(D, dphi, s: _Shell, derivatives: bool):
    du = D[:, 1:] - D[:, :-1]
    ell = np.sqrt(dphi * dphi + du * du)
    nodes = D[:, :-1, None] + _GS * du[..., None]
    W, W1, W2 = _w_terms(nodes, s)
    Wb = W @ _GW
    C = Wb * ell
    if not derivatives:
        return C
    Wp = W1 @ (_GW * (1 - _GS))
    Wq = W1 @ (_GW * _GS)
    Wpp = W2 @ (_GW * (1 - _GS) ** 2)
    Wpq = W2 @ (_GW * _GS * (1 - _GS))
    Wqq = W2 @ (_GW * _GS**2)
    lq = du / ell
    lpp = dphi * dphi / ell**3
    Cp = Wp * ell - Wb * lq
    Cq = Wq * ell + Wb * lq
    Cpp = Wpp * ell - 2 * Wp * lq + Wb * lpp
    Cqq = Wqq * ell + 2 * Wq * lq + Wb * lpp
    Cpq = Wpq * ell + Wp * lq - Wq * lq - Wb * lpp
    return C, Cp, Cq, Cpp, Cqq, Cpq


def _tridiag_solve(diag: np.ndarray, off: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """Solve B independent tridiagonal systems at once: diag (B, n), off (B, n-1) (symmetric),
    rhs (B, n, k); one LAPACK call on the block-diagonal matrix. Returns (B, n, k)."""
    B, n, k = rhs.shape
    o = np.zeros((B, n))
    o[:, :-1] = off
    o = o.ravel()[:-1]
    _, _, _, x, info = dgtsv(o, diag.ravel(), o, rhs.reshape(B * n, k))
    if info != 0:  # pragma: no cover - singular Hessian (not at a strict minimum)
        return np.full(rhs.shape, np.nan)
    return x.reshape(B, n, k)


def _second_derivatives(D, g, theta, s: _Shell):
    """Second derivatives of the discrete length L(delta_a, theta) = min over the interior of
    sum_k C_k (profiles D (B, M+1) converged on grid fractions with steps g (B, M); theta (B,)).

    Envelope / implicit function theorem: with H the (tridiagonal) Hessian of L in the interior
    values and S = -H^{-1} L_{I,p} the profile sensitivities, V_pp = L_pp + L_{p,I} S for
    p = (delta_a, theta). Returns (L, L_a, L_b, L_t, L_aa, L_at, L_tt, S (B, M-1, 2)), all
    float64 (L_b: derivative in delta_b).
    """
    dphi = theta[:, None] * g
    C, Cp, Cq, Cpp, Cqq, Cpq = _objective(D, dphi, s, True)
    du = np.diff(D, axis=1)
    ell = np.sqrt(dphi * dphi + du * du)
    Wb = C / ell
    nodes = D[:, :-1, None] + _GS * du[..., None]
    W1 = _w_terms(nodes, s)[1]
    Wp = W1 @ (_GW * (1 - _GS))
    Wq = W1 @ (_GW * _GS)
    ct = Wb * dphi / ell                      # dC / d dphi
    cross = Wb * dphi * du / ell**3
    Xp = Wp * dphi / ell + cross              # d2C / dp d dphi
    Xq = Wq * dphi / ell - cross              # d2C / dq d dphi
    Ytt = Wb * du * du / ell**3               # d2C / d dphi^2
    B, n = D.shape[0], D.shape[1] - 2
    L, L_a, L_b, L_t = C.sum(1), Cp[:, 0], Cq[:, -1], (ct * g).sum(1)
    if n <= 0:
        S = np.zeros((B, 0, 2))
        return L, L_a, L_b, L_t, Cpp[:, 0], Xp[:, 0] * g[:, 0], (Ytt * g * g).sum(1), S
    rhs = np.zeros((B, n, 2))
    rhs[:, 0, 0] = Cpq[:, 0]
    rhs[:, :, 1] = g[:, :-1] * Xq[:, :-1] + g[:, 1:] * Xp[:, 1:]
    S = -_tridiag_solve(Cqq[:, :-1] + Cpp[:, 1:], Cpq[:, 1:-1], rhs)
    L_aa = Cpp[:, 0] + Cpq[:, 0] * S[:, 0, 0]
    L_at = Xp[:, 0] * g[:, 0] + Cpq[:, 0] * S[:, 0, 1]
    L_tt = (Ytt * g * g).sum(1) + (rhs[:, :, 1] * S[:, :, 1]).sum(1)
    return L, L_a, L_b, L_t, L_aa, L_at, L_tt, S


def _newton(D, dphi, s: _Shell, tol: float, max_iter: int) -> np.ndarray:
    """Minimise sum_k C_k over the interior of D (B, M+1) by damped Newton; returns D."""
    B, n = D.shape[0], D.shape[1] - 2
    if n <= 0:
        return D
    lam = np.zeros(B)
    active = np.ones(B, dtype=bool)
    for _ in range(max_iter):
        idx = np.flatnonzero(active)
        if idx.size == 0:
            break
        Da, dp = D[idx], dphi[idx]
        C, Cp, Cq, Cpp, Cqq, Cpq = _objective(Da, dp, s, True)
        L = C.sum(1)
        g = Cq[:, :-1] + Cp[:, 1:]
        Hd = Cqq[:, :-1] + Cpp[:, 1:]
        Ho = Cpq[:, 1:-1]
        lam_a = lam[idx]
        step = None
        for _attempt in range(12):
            Hdd = Hd + lam_a[:, None] * (np.abs(Hd) + 1e-300)
            off = np.zeros((idx.size, n))
            off[:, :-1] = Ho
            off = off.ravel()[:-1]
            _, _, _, x, info = dgtsv(off, Hdd.ravel(), off, -g.ravel())
            step = x.reshape(idx.size, n) if info == 0 else None
            if step is not None and np.all(np.isfinite(step)):
                dec = -(g * step).sum(1)
                bad = dec <= 0
                if not bad.any():
                    break
                lam_a = np.where(bad, np.maximum(lam_a * 10, 1e-3), lam_a)
            else:
                lam_a = np.maximum(lam_a * 10, 1e-3)
        if step is None:  # pragma: no cover - pathological input
            step = -g / np.maximum(np.abs(Hd), 1e-300)
        dec = -(g * step).sum(1)
        done = dec <= tol * L
        # In the quadratic zone (decrement <= 1e-9 L: the step changes L by ~dec/2, at the
        # level of rounding) the full Newton step is taken without evaluating L; the other rows
        # get a backtracking line search.
        quad = dec <= 1e-9 * L
        alpha = np.ones(idx.size)
        accepted = quad & np.isfinite(step).all(1)
        D[idx[accepted], 1:-1] += step[accepted]
        todo = np.flatnonzero(~accepted)
        for _ls in range(20 if todo.size else 0):
            trial = Da[todo].copy()
            trial[:, 1:-1] += alpha[todo, None] * step[todo]
            Lt = _objective(trial, dp[todo], s, False).sum(1)
            ok = np.isfinite(Lt) & (Lt <= L[todo] - 1e-4 * alpha[todo] * dec[todo])
            D[idx[todo[ok]]] = trial[ok]
            accepted[todo[ok]] = True
            todo = todo[~ok]
            if todo.size == 0:
                break
            alpha[todo] /= 2
        lam_a = np.where(alpha == 1.0, lam_a / 10, np.maximum(lam_a * 4, 1e-4))
        lam_a[lam_a < 1e-10] = 0.0
        lam[idx] = lam_a
        active[idx[done | quad | ~accepted]] = False
    return D


def _dive(delta0: np.ndarray, s: _Shell, n: int = 64):
    """The separatrix from delta0 (B,) towards the shell: the geodesic with Snell constant
    W~(delta*) (the stiff-limit shape of the approach). Returns (phi, delta) tables (B, n),
    phi increasing from 0, computed as phi = int |delta - delta*| / f dv, v = log|delta - delta*|,
    f = sqrt(W~^2 - W~*^2) / W~* (bounded integrand, trapezoid rule)."""
    gap = np.abs(delta0 - s.delta_star)
    sign = np.sign(delta0 - s.delta_star)
    top = np.log(np.maximum(gap, 1e-300))
    v = top[:, None] + (np.log(1e-12) - top)[:, None] * np.linspace(0.0, 1.0, n)[None, :]
    v = np.minimum(v, top[:, None])
    dist = np.exp(v)
    delta = s.delta_star + sign[:, None] * dist
    W = _w_terms(delta, s)[0]
    f = np.sqrt(np.maximum(W * W - s.W_star**2, 1e-300)) / s.W_star
    h = np.minimum(dist / f, 1e6)
    phi = np.concatenate([np.zeros((len(delta0), 1)),
                          np.cumsum(-(h[:, 1:] + h[:, :-1]) / 2 * np.diff(v, axis=1), axis=1)],
                         axis=1)
    return phi, delta


def _separatrix_profile(da, db, theta, G, s: _Shell) -> np.ndarray:
    """delta(phi) = delta* + (dive from a)(phi) + (dive from b)(theta - phi) - 2 delta*, (B, m)."""
    pa, qa = _dive(da, s)
    pb, qb = _dive(db, s)
    phi = theta[:, None] * G
    out = np.empty_like(phi)
    for k in range(len(da)):
        ya = np.interp(phi[k], pa[k], qa[k], right=s.delta_star)
        yb = np.interp(theta[k] - phi[k], pb[k], qb[k], right=s.delta_star)
        out[k] = ya + yb - s.delta_star
    out[:, 0], out[:, -1] = da, db
    return out


def _small_angle_profile(da, db, theta, G, s: _Shell, n: int = 96) -> np.ndarray:
    """The theta -> 0 limit of the geodesic (Snell constant -> 0): phi / theta equals
    int_{da}^{delta} dv / W~ over int_{da}^{db} dv / W~ (monotone in delta), (B, m)."""
    frac = np.linspace(0.0, 1.0, n)
    v = da[:, None] + (db - da)[:, None] * frac[None, :]
    inv = 1.0 / _w_terms(v, s)[0]
    cum = np.concatenate([np.zeros((len(da), 1)),
                          np.cumsum((inv[:, 1:] + inv[:, :-1]) / 2, axis=1)], axis=1)
    tot = cum[:, -1:]
    cum = np.where(tot > 0, cum / np.where(tot > 0, tot, 1.0), frac[None, :])
    return np.stack([np.interp(G[k], cum[k], v[k]) for k in range(len(da))])


def _turning_grid(D: np.ndarray, G: np.ndarray, theta: np.ndarray, M: int,
                  beta: float = 0.6, sigma: float = 0.1) -> np.ndarray:
    """Grid fractions (B, M+1) equidistributing (1 - beta) * phi + beta * turning angle of the
    profile D (B, m+1) given on fractions G: points go where the path bends from radial to
    along the shell, which is where a polyline needs them. Turning is measured in the
    (phi, sigma * u) plane; sigma = 0.1 and beta = 0.6 were chosen by convergence studies
    (relative length error ~1e-6 or better at 192 segments for d >= 1024)."""
    dphi = theta[:, None] * np.diff(G, axis=1)
    alpha = np.arctan2(sigma * np.diff(D, axis=1), dphi)
    turn = np.abs(np.diff(alpha, axis=1))
    seg_turn = np.zeros_like(dphi)
    seg_turn[:, :-1] += turn / 2
    seg_turn[:, 1:] += turn / 2
    total = seg_turn.sum(1, keepdims=True)
    has = total > 1e-9
    share = seg_turn / np.where(has, total, 1.0)
    mu = np.where(has, 1 - beta, 1.0) * np.diff(G, axis=1) + np.where(has, beta, 0.0) * share
    cum = np.concatenate([np.zeros((D.shape[0], 1)), np.cumsum(mu, axis=1)], axis=1)
    cum /= cum[:, -1:]
    target = np.linspace(0.0, 1.0, M + 1)
    out = np.stack([np.interp(target, c, g) for c, g in zip(cum, G)])
    out[:, 0], out[:, -1] = 0.0, 1.0
    return out


def _initial_path(da, db, theta, s: _Shell, M: int, n_fine: int = 128):
    """Grid fractions (B, M+1) and initial profile (B, M+1): the better (by NAO length on a fine
    Chebyshev grid) of the linearised sinh profile and the separatrix profile, and a grid
    adapted to its turning."""
    Gf = np.broadcast_to(_grid(n_fine), (len(da), n_fine + 1))
    dphi = theta[:, None] * np.diff(Gf, axis=1)
    cands = [_init_profile(da, db, theta, Gf[0], s)]
    if s.has_shell:
        cands.append(_separatrix_profile(da, db, theta, Gf, s))
    cands.append(_small_angle_profile(da, db, theta, Gf, s))
    costs = np.stack([_objective(c, dphi, s, False).sum(1) for c in cands])
    costs[~np.isfinite(costs)] = np.inf
    best = np.argmin(costs, axis=0)
    Df = np.stack(cands)[best, np.arange(len(da))]
    G = _turning_grid(Df, Gf, theta, M)
    D = np.stack([np.interp(G[k], Gf[k], Df[k]) for k in range(len(da))])
    return G, D


def regrid(grid: np.ndarray, delta: np.ndarray, theta, n_grid: int):
    """Move converged profiles (``PlanarSolution.grid`` and ``.delta``, (B, m+1)) to a grid of
    ``n_grid`` segments adapted to their turning, for ``solve_planar(..., init=...)``: a warm
    start on a finer grid. Returns (grid fractions, profile), both (B, n_grid + 1)."""
    theta = np.atleast_1d(np.asarray(theta, np.float64))
    G = _turning_grid(delta, grid, np.where(theta > 0, theta, 1.0), n_grid)
    return G, np.stack([np.interp(G[k], grid[k], delta[k]) for k in range(len(G))])


def solve_planar(ra, rb, theta, d: int, n_grid: int = N_GRID, tol: float = 1e-10,
                 max_iter: int = 100, init: tuple[np.ndarray, np.ndarray] | None = None,
                 hessian: bool = False) -> PlanarSolution:
    """Solve B planar NAO problems at once; ra, rb > 0 and theta in [0, pi] are (B,) arrays.

    The grid (n_grid segments, placed uniformly in phi plus where the initial path turns) and
    the initial path come from ``_initial_path``, or from ``init = (G, delta)`` (e.g. a previous
    solution's grid fractions and profile, to warm-start). Returns the geodesic length (the NAO
    distance: an upper bound converging as n_grid grows), its partial derivatives (envelope
    theorem, exact for the discrete problem) and the path; with ``hessian`` also the second
    derivatives in (|x|, theta) and the profile sensitivities (``PlanarSolution.hess``/``sens``).
    """
    s = shell(d)
    ra, rb = np.atleast_1d(np.asarray(ra, np.float64)), np.atleast_1d(np.asarray(rb, np.float64))
    theta = np.clip(np.atleast_1d(np.asarray(theta, np.float64)), 0.0, np.pi)
    B, M = ra.shape[0], n_grid
    da, db = np.log(ra / s.r0), np.log(rb / s.r0)
    planar = theta >= THETA_MIN
    th = np.where(planar, theta, 1.0)
    Fa, Fb = radial_antiderivative(ra, d), radial_antiderivative(rb, d)
    length = np.abs(Fb - Fa)
    wa, wb = _weight_np(ra, d), _weight_np(rb, d)
    d_ra = -np.sign(Fb - Fa) * wa
    d_rb = np.sign(Fb - Fa) * wb
    d_theta = np.zeros(B)
    kind = np.ones(B, dtype=np.int64)
    G = np.broadcast_to(_grid(M), (B, M + 1)).copy()
    D = da[:, None] + (db - da)[:, None] * G
    hess = sens = None
    if hessian:  # radial segments: d2/dra2 |F(rb) - F(ra)| = -sign w'(ra); the rest set below
        hess = np.zeros((B, 2, 2))
        hess[:, 0, 0] = -np.sign(Fb - Fa) * (ra - (d - 1) / ra)
        sens = np.zeros((B, M + 1, 2))
        sens[:, :, 0] = (1 - G) / ra[:, None]
    if planar.any():
        i = np.flatnonzero(planar)
        if init is not None and init[0].shape == (B, M + 1):
            Gi, Di = init[0][i].copy(), init[1][i].copy()
            Di[:, 0], Di[:, -1] = da[i], db[i]
        else:
            Gi, Di = _initial_path(da[i], db[i], th[i], s, M)
        dphi = th[i, None] * np.diff(Gi, axis=1)
        Di = _newton(Di, dphi, s, tol, max_iter)
        G[i], D[i] = Gi, Di
        if hessian:
            L, L_a, L_b, L_t, L_aa, L_at, L_tt, S = _second_derivatives(
                Di, np.diff(Gi, axis=1), th[i], s)
            hess[i, 0, 0] = s.r0 * (L_aa - L_a) / ra[i] ** 2
            hess[i, 0, 1] = hess[i, 1, 0] = s.r0 * L_at / ra[i]
            hess[i, 1, 1] = s.r0 * L_tt
            sens[i, 0, 0] = 1.0 / ra[i]
            sens[i, 1:-1, 0] = S[:, :, 0] / ra[i, None]
            sens[i, 1:-1, 1] = S[:, :, 1]
            length[i], d_ra[i], d_rb[i] = s.r0 * L, s.r0 * L_a / ra[i], s.r0 * L_b / rb[i]
            d_theta[i] = s.r0 * L_t
        else:
            C, Cp, Cq, _, _, _ = _objective(Di, dphi, s, True)
            du = np.diff(Di, axis=1)
            ell = np.sqrt(dphi**2 + du**2)
            Wb = C / ell
            length[i] = s.r0 * C.sum(1)
            d_ra[i] = s.r0 * Cp[:, 0] / ra[i]
            d_rb[i] = s.r0 * Cq[:, -1] / rb[i]
            d_theta[i] = s.r0 * (Wb * dphi**2 / ell).sum(1) / th[i]
        kind[i] = 0
    phi = th[:, None] * G
    # The route through the origin (w is integrable at 0): straight in, straight out.
    origin = Fa + Fb
    via0 = origin < length
    if via0.any():
        length = np.where(via0, origin, length)
        d_ra = np.where(via0, wa, d_ra)
        d_rb = np.where(via0, wb, d_rb)
        d_theta = np.where(via0, 0.0, d_theta)
        kind = np.where(via0, 2, kind)
        if hessian:
            hess[via0] = 0.0
            hess[via0, 0, 0] = ra[via0] - (d - 1) / ra[via0]
    phi[kind == 1] = 0.0
    return PlanarSolution(length, d_ra, d_rb, d_theta, kind, phi, D, ra, rb, theta, s, G,
                          hess, sens)


def _locate(sol: PlanarSolution, b: int, frac: np.ndarray, spacing: str):
    """Points of path ``b`` at fractions ``frac`` of its length in the ``spacing``'s yardstick
    (``spacings.SPACINGS``); returns (r, phi) float64 arrays.

    On a planar path (grid segments straight in (phi, delta), delta = log(r / r0)), segment k
    of (phi, delta)-length ell_k has cost  ell_k int_0^1 m(delta_k + s du_k) ds  with density
    m = W~ (``'nao'``: NAO length / r0) or m = e^delta (``'euclidean'``: Euclidean length / r0,
    since ds = r sqrt(du^2 + dphi^2)); ``'angle'`` costs dphi_k. Within a segment the fraction
    is found by Newton on the Gauss-Legendre integral. Radial paths (theta ~ 0, or the two legs
    through the origin), where the angle does not move, use Euclidean length for ``'angle'``.
    """
    s = sol.shell
    frac = np.clip(np.asarray(frac, np.float64), 0.0, 1.0)
    planar = sol.kind[b] == 0
    if spacing == "angle" and not planar:
        spacing = "euclidean"
    if sol.kind[b] == 2:
        Fa = radial_antiderivative(sol.ra[b], s.d)
        Fb = radial_antiderivative(sol.rb[b], s.d)
        ca, cb = (Fa, Fb) if spacing == "nao" else (sol.ra[b], sol.rb[b])
        target = frac * (ca + cb)
        inbound = target <= ca
        # invert the radial cost on [0, ra] or [0, rb]
        r = np.where(inbound, _invert_radial(ca - target, sol.ra[b], s.d, spacing),
                     _invert_radial(target - ca, sol.rb[b], s.d, spacing))
        theta = sol.theta[b]
        return r, np.where(inbound, 0.0, theta)
    D, phi = sol.delta[b], sol.phi[b]
    dphi, du = np.diff(phi), np.diff(D)
    if spacing == "angle":
        size = dphi

        def density(x):
            return np.ones_like(x)
    else:
        size = np.sqrt(dphi**2 + du**2)

        def density(x):
            return _w_terms(x, s)[0] if spacing == "nao" else np.exp(x)

    seg = size * (density(D[:-1, None] + _GS * du[:, None]) @ _GW)
    cum = np.concatenate([[0.0], np.cumsum(seg)])
    target = frac * cum[-1]
    k = np.clip(np.searchsorted(cum, target, side="right") - 1, 0, len(seg) - 1)
    rem = target - cum[k]
    x = np.where(seg[k] > 0, rem / np.where(seg[k] > 0, seg[k], 1.0), 0.0)
    nodes = np.append(_GS, 1.0)
    for _ in range(8):  # Newton on  size_k * int_0^x density(D_k + sigma du_k) dsigma = rem
        wv = density(D[k, None] + (x[:, None] * nodes) * du[k, None])
        val = size[k] * x * (wv[:, :-1] @ _GW)
        step = (val - rem) / np.maximum(size[k] * wv[:, -1], 1e-300)
        x = np.clip(x - step, 0.0, 1.0)
        if np.abs(step).max() < 1e-14:
            break
    delta = D[k] + x * du[k]
    return s.r0 * np.exp(delta), phi[k] + x * dphi[k]


def _invert_radial(cost, rmax, d, spacing):
    """r in [0, rmax] whose radial cost from 0 is ``cost`` (F(r) for NAO, r for Euclidean)."""
    cost = np.asarray(cost, np.float64)
    if spacing != "nao":
        return np.clip(cost, 0.0, rmax)
    lo, hi = np.zeros_like(cost), np.full_like(cost, rmax)
    for _ in range(80):  # bisection: F is increasing (w > 0)
        mid = (lo + hi) / 2
        below = radial_antiderivative(mid, d) < cost
        lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
    return (lo + hi) / 2


# --------------------------------------------------------------------------------------------
# The metric object (torch at the API).
# --------------------------------------------------------------------------------------------


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1).to(geometry_dtype(x))


def plane_frame(x: torch.Tensor, y: torch.Tensor):
    """Orthonormal frame of span{x, y} for flat x, y: returns (|x|, |y|, theta, e1, e2).

    e1 = x/|x|; e2 the unit component of y orthogonal to x, or, when y is (anti)parallel to x,
    a fixed unit vector orthogonal to x (every plane is then optimal). Finite gradients
    everywhere except x = 0 or y = 0.
    """
    tiny = dtype_eps(x.dtype)
    ra = x.norm()
    rb = y.norm()
    e1 = x / ra
    c = torch.dot(y, e1)
    perp = y - c * e1
    s2 = torch.dot(perp, perp)
    ok = s2 > (tiny * rb) ** 2
    s = torch.sqrt(torch.where(ok, s2, torch.ones_like(s2)))
    # fallback: the basis vector least aligned with e1, made orthogonal to it
    j = int(torch.argmin(e1.detach().abs()))
    basis = torch.zeros_like(x)
    basis[j] = 1.0
    fb = basis - e1 * e1[j]
    fb = fb / fb.norm()
    e2 = torch.where(ok, perp / s, fb)
    theta = torch.atan2(torch.where(ok, s, torch.zeros_like(s)), c)
    return ra, rb, theta, e1, e2


def _np64(x: torch.Tensor) -> np.ndarray:
    """Flat float64 numpy copy of a tensor (numpy, not torch: no thread pool for small work)."""
    x = x.detach().reshape(-1).cpu()
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    return np.asarray(x.numpy(), dtype=np.float64)


def plane_frame_np(x: np.ndarray, y: np.ndarray):
    """``plane_frame`` for flat float64 numpy vectors (no autograd): (|x|, |y|, theta, e1, e2).

    Reductions are elementwise products summed by numpy (single-threaded), not BLAS dots.
    """
    ra = math.sqrt(float((x * x).sum()))
    rb = math.sqrt(float((y * y).sum()))
    e1 = x / ra
    c = float((y * e1).sum())
    perp = y - c * e1
    s = math.sqrt(float((perp * perp).sum()))
    if s > 1e-15 * rb:
        e2 = perp / s
    else:
        j = int(np.argmin(np.abs(e1)))
        e2 = -e1 * e1[j]
        e2[j] += 1.0
        e2 /= math.sqrt(float((e2 * e2).sum()))
        s = 0.0
    return ra, rb, math.atan2(s, c), e1, e2


class _PlanarPoints(torch.autograd.Function):
    """(|x|, |y|, theta) -> (r_t, phi_t) along the planar geodesic; Jacobian by central
    differences of the (deterministic, converged) solver, computed only in backward."""

    @staticmethod
    def forward(ctx, ra, rb, theta, metric, t, spacing):
        r, phi = metric._points(float(ra), float(rb), float(theta), t, spacing)
        ctx.save_for_backward(ra, rb, theta)
        ctx.metric, ctx.t, ctx.spacing = metric, t, spacing
        return (torch.as_tensor(r, dtype=torch.float64), torch.as_tensor(phi, dtype=torch.float64))

    @staticmethod
    def backward(ctx, gr, gphi):
        ra, rb, theta = (float(v) for v in ctx.saved_tensors)
        m, t, sp = ctx.metric, ctx.t, ctx.spacing
        grads = []
        for i, v in enumerate((ra, rb, theta)):
            h = 1e-5 * (max(abs(v), 1.0) if i < 2 else 1.0)
            lo_ok = i < 2 or v - h >= 0.0
            hi_ok = i < 2 or v + h <= math.pi
            args_hi = [ra, rb, theta]
            args_lo = [ra, rb, theta]
            if hi_ok:
                args_hi[i] = v + h
            if lo_ok:
                args_lo[i] = v - h
            r1, p1 = m._points(*args_hi, t, sp)
            r0, p0 = m._points(*args_lo, t, sp)
            span = (args_hi[i] - args_lo[i]) or 1.0
            dr = torch.as_tensor((r1 - r0) / span)
            dp = torch.as_tensor((p1 - p0) / span)
            grads.append((gr * dr).sum() + (gphi * dp).sum())
        return grads[0], grads[1], grads[2], None, None, None


class NAOMetric:
    """The NAO metric  ds_NAO = w(|x|) |dx|,  w = -log chi_d  (Samuel et al. 2023, Eq. for
    the NAO path length), on flattened latents of dimension ``d``.

    Points are tensors of any shape with ``numel() == d``; geometry runs in float32/float64
    (the input's geometry dtype); scalar solves run in float64.
    """

    def __init__(self, d: int, n_grid: int = N_GRID):
        self.d = int(d)
        self.n_grid = int(n_grid)
        self.shell = shell(self.d)

    # -- scalars ------------------------------------------------------------------------------
    def weight(self, r) -> torch.Tensor:
        """w(r) = -log p(r) (float64)."""
        return chi.weight(r, self.d)

    def _check(self, x: torch.Tensor, name: str = "x") -> np.ndarray:
        """Validate one point; returns it as a flat float64 numpy array."""
        if x.numel() != self.d:
            raise ShapeError(f"{name} has {x.numel()} entries, the metric is for d = {self.d}")
        xn = _np64(x)
        if not np.isfinite(xn).all():
            raise InputError(f"{name} has NaN or infinite entries")
        if not xn.any():
            raise InputError(f"{name} is the zero latent: its NAO weight -log p(0) is infinite")
        return xn

    def solve(self, x: torch.Tensor, y: torch.Tensor) -> PlanarSolution:
        """The planar problem of the pair (x, y) (one-element batch)."""
        ra, rb, theta, _, _ = plane_frame_np(self._check(x, "x"), self._check(y, "y"))
        return solve_planar(ra, rb, theta, self.d, self.n_grid)

    def dist(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """NAO distance D(x, y) = min over paths of integral w(|gamma|) ds; float64 0-d tensor."""
        return torch.tensor(float(self.solve(x, y).length[0]), dtype=torch.float64)

    def _points(self, ra, rb, theta, t, spacing):
        sol = solve_planar(ra, rb, theta, self.d, self.n_grid)
        return _locate(sol, 0, t, spacing)

    # -- paths --------------------------------------------------------------------------------
    def geodesic(self, x: torch.Tensor, y: torch.Tensor, t, spacing: str = DEFAULT_SPACING
                 ) -> torch.Tensor:
        """Points of the NAO geodesic from x to y at fractions t of its length.

        x, y: same shape, any float dtype; t: sequence or 1-d tensor in [0, 1].
        spacing (``spacings.SPACINGS``): the yardstick for "fraction of its length" along the
        same exact curve: 'euclidean' (equal Euclidean arc length, default: frames spread along
        the content change, like the paper's near-uniform discretisation), 'nao' (equal NAO
        arc length: off the chi shell nearly every frame sits on the radial legs next to an
        endpoint), 'angle' (equal steps of the angle from x).
        Returns (len(t), *x.shape) in the geometry dtype; t = 0 and t = 1 give x and y exactly.
        Differentiable in x and y.
        """
        if spacing not in SPACINGS:
            raise InputError(f"spacing {spacing!r}: choose from {', '.join(SPACINGS)}")
        if x.shape != y.shape:
            raise ShapeError(f"endpoints differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")
        xn, yn = self._check(x, "a"), self._check(y, "b")
        dt = geometry_dtype(x)
        tt = torch.as_tensor(t, dtype=torch.float64).reshape(-1)
        if not (torch.is_grad_enabled() and (x.requires_grad or y.requires_grad)):
            # no autograd: the same formula in numpy (single-threaded, no tensor overhead)
            ra, rb, theta, e1, e2 = plane_frame_np(xn, yn)
            r, phi = self._points(ra, rb, theta, tt.numpy(), spacing)
            npdt = np.float64 if dt == torch.float64 else np.float32
            e1, e2 = e1.astype(npdt), e2.astype(npdt)
            pts = (r * np.cos(phi)).astype(npdt)[:, None] * e1
            pts += (r * np.sin(phi)).astype(npdt)[:, None] * e2
            tn = tt.numpy()
            pts[tn == 0] = xn.astype(npdt)
            pts[tn == 1] = yn.astype(npdt)
            return torch.from_numpy(pts).reshape(len(tt), *x.shape).to(x.device)
        xf, yf = _flat(x).to(torch.float64), _flat(y).to(torch.float64)
        ra, rb, theta, e1, e2 = plane_frame(xf, yf)
        r, phi = _PlanarPoints.apply(ra, rb, theta, self, tt.numpy(), spacing)
        pts = r[:, None] * (torch.cos(phi)[:, None] * e1 + torch.sin(phi)[:, None] * e2)
        pts = torch.where((tt == 0)[:, None], xf.expand_as(pts), pts)
        pts = torch.where((tt == 1)[:, None], yf.expand_as(pts), pts)
        return pts.to(dt).reshape(len(tt), *x.shape)

    def log(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Riemannian log: the Euclidean vector v at x along the geodesic's initial direction
        with NAO norm w(|x|) |v| = D(x, y). Shape and geometry dtype of x. (Gradient of
        D(x, .) at x is -w(|x|) v / |v| by the first variation formula.)"""
        ra, rb, theta, e1, e2 = plane_frame_np(self._check(x, "x"), self._check(y, "y"))
        sol = solve_planar(ra, rb, theta, self.d, self.n_grid)
        grad = float(sol.d_ra[0]) * e1 - float(sol.d_theta[0]) / ra * e2
        gnorm = math.sqrt(float((grad * grad).sum()))
        if gnorm == 0.0:
            return torch.zeros(x.shape, dtype=geometry_dtype(x))
        v = -grad / gnorm * (float(sol.length[0]) / float(self.weight(ra)))
        return torch.from_numpy(v).to(geometry_dtype(x)).reshape(x.shape)

    def exp(self, x: torch.Tensor, v: torch.Tensor, rtol: float = 1e-10) -> torch.Tensor:
        """Riemannian exp: follow the geodesic from x with initial velocity v for NAO length
        w(|x|) |v| (ODE in the plane span{x, v}: Snell's law  W(u) cos(alpha) = const, written as
        d alpha / dL = W'(u) cos(alpha) / W(u)^2). Defined while the path avoids the origin."""
        self._check(x, "x")
        s = self.shell
        xf, vf = _flat(x).double(), _flat(v).double()
        ra = float(xf.norm())
        e1 = xf / ra
        vr = float(torch.dot(vf, e1))
        vt_vec = vf - vr * e1
        vt = float(vt_vec.norm())
        if vt > 0:
            e2 = vt_vec / vt
        else:
            _, _, _, _, e2 = plane_frame(xf, xf)
        total = float(self.weight(ra)) * float(vf.norm()) / s.r0
        if total == 0.0:
            return x.to(geometry_dtype(x)).clone()

        def rhs(_, z):
            _phi, delta, alpha = z
            W, W1, _ = _w_terms(np.array(delta), s)
            return [math.cos(alpha) / W, math.sin(alpha) / W, W1 * math.cos(alpha) / W**2]

        z0 = [0.0, math.log(ra / s.r0), math.atan2(vr, vt)]
        out = solve_ivp(rhs, (0.0, total), z0, method="DOP853", rtol=rtol, atol=1e-13)
        phi, delta, _ = out.y[:, -1]
        r = s.r0 * math.exp(delta)
        y = r * (math.cos(phi) * e1 + math.sin(phi) * e2)
        return y.to(geometry_dtype(x)).reshape(x.shape)

    def length(self, path: torch.Tensor, n_sub: int = 16) -> torch.Tensor:
        """True NAO length of the polyline through path[0], ..., path[n-1] (any trailing shape):
        each straight segment is integrated by composite Gauss-Legendre (``n_sub`` panels of
        ``_Q`` nodes), with |x| along the segment from dot products. Float64 0-d tensor.
        This, not the paper's midpoint sum, is the yardstick for comparing paths."""
        p = path.detach().reshape(path.shape[0], -1).cpu()
        p = np.asarray((p if p.dtype in (torch.float32, torch.float64) else p.float()).numpy(),
                       dtype=np.float64)
        if p.shape[1] != self.d:
            raise ShapeError(f"path points have {p.shape[1]} entries, metric is for d = {self.d}")
        a, delta = p[:-1], p[1:] - p[:-1]
        aa = (a * a).sum(1)
        ad = (a * delta).sum(1)
        dd = (delta * delta).sum(1)
        edges = np.linspace(0.0, 1.0, n_sub + 1)
        s = (edges[:-1, None] + (edges[1:] - edges[:-1])[:, None] * _GS[None, :]).ravel()
        wq = np.tile(_GW / n_sub, n_sub)
        r = np.sqrt(np.maximum(aa[:, None] + 2 * s * ad[:, None] + s * s * dd[:, None], 0.0))
        w = chi.weight(torch.from_numpy(r), self.d).numpy()
        return torch.tensor(float(((w @ wq) * np.sqrt(dd)).sum()), dtype=torch.float64)
