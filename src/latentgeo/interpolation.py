"""Interpolation between two seeds: one signature, one registry.

Every interpolator is ``f(a, b, t, **opts) -> (len(t), *a.shape)``: a and b are single latents
of the same shape (any float dtype; geometry runs in float32/float64, see
``numerics.geometry_dtype``), t a sequence or 1-d tensor of fractions in [0, 1]. t = 0 and
t = 1 return a and b exactly. ``INTERPOLATORS`` maps CLI names to functions; ``SPACINGS``
(from ``spacings``) names where ``nao`` puts its frames along the exact geodesic.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from latentgeo.errors import InputError, ShapeError
from latentgeo.metric import NAOMetric, plane_frame
from latentgeo.numerics import eps as dtype_eps
from latentgeo.numerics import geometry_dtype
from latentgeo.spacings import DEFAULT_SPACING
from latentgeo.spacings import SPACINGS as SPACINGS  # re-exported: the spacing registry

Interpolator = Callable[..., torch.Tensor]


def _prepare(a: torch.Tensor, b: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor,
                                                           torch.Tensor]:
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        raise InputError("interpolation endpoints must be tensors")
    if a.shape != b.shape:
        raise ShapeError(f"endpoints differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    dt = geometry_dtype(a)
    tt = torch.as_tensor(t, dtype=dt).reshape(-1)
    if tt.numel() == 0:
        raise InputError("t is empty")
    if not bool(((tt >= 0) & (tt <= 1)).all()):
        raise InputError("t must lie in [0, 1]")
    return a.to(dt), b.to(dt), tt


def _exact_ends(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, t: torch.Tensor
                ) -> torch.Tensor:
    shape = (-1,) + (1,) * a.ndim
    out = torch.where((t == 0).reshape(shape), a.unsqueeze(0).expand_as(out), out)
    return torch.where((t == 1).reshape(shape), b.unsqueeze(0).expand_as(out), out)


def steps(n: int) -> torch.Tensor:
    """n equally spaced fractions 0, 1/(n-1), ..., 1 (float64); n >= 2."""
    if n < 2:
        raise InputError(f"a path needs at least 2 points (the two endpoints), got {n}")
    return torch.linspace(0.0, 1.0, n, dtype=torch.float64)


def lerp(a: torch.Tensor, b: torch.Tensor, t: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Linear interpolation (1 - t) a + t b. Shapes (len(t), *a.shape)."""
    a, b, tt = _prepare(a, b, t)
    w = tt.reshape((-1,) + (1,) * a.ndim)
    return _exact_ends((1 - w) * a + w * b, a, b, tt)


def slerp(a: torch.Tensor, b: torch.Tensor, t: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Spherical interpolation (Shoemake 1985) of the flattened latents:
    sin((1-t) theta)/sin(theta) a + sin(t theta)/sin(theta) b, theta = angle(a, b).

    Identical directions use the limit (1-t) a + t b (finite values and gradients); antipodal
    inputs (every great circle is a geodesic) rotate a through a fixed orthogonal direction
    with the norm interpolated linearly, so values and gradients stay finite.
    """
    a, b, tt = _prepare(a, b, t)
    af, bf = a.reshape(-1), b.reshape(-1)
    ra, rb, theta, e1, e2 = plane_frame(af, bf)
    w = tt[:, None]
    s = torch.sin(theta)
    small = s < 1e-4
    s_safe = torch.where(small, torch.ones_like(s), s)
    # Taylor limit of sin(x theta)/sin(theta) ~ x (1 + (1 - x^2) theta^2 / 6) near theta = 0.
    th2 = theta * theta
    ca = torch.where(small, (1 - w) * (1 + (1 - (1 - w) ** 2) * th2 / 6),
                     torch.sin((1 - w) * theta) / s_safe)
    cb = torch.where(small, w * (1 + (1 - w * w) * th2 / 6), torch.sin(w * theta) / s_safe)
    out = ca * af + cb * bf
    anti = bool(theta > math.pi - 1e-4) and bool(s < 1e-4)
    if anti:  # rotate through e2; radius interpolated linearly
        r = (1 - w) * ra + w * rb
        ang = w * theta
        out = r * (torch.cos(ang) * e1 + torch.sin(ang) * e2)
    return _exact_ends(out.reshape(len(tt), *a.shape), a, b, tt)


def nlerp(a: torch.Tensor, b: torch.Tensor, t: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Normalised lerp: the lerp point rescaled to the interpolated norm (1-t)|a| + t|b|.

    Where the lerp point is 0 (antipodal inputs of equal norm at t = 1/2) the slerp point is
    used instead, so values and gradients stay finite.
    """
    a, b, tt = _prepare(a, b, t)
    w = tt.reshape((-1,) + (1,) * a.ndim)
    p = (1 - w) * a + w * b
    n = p.flatten(1).norm(dim=1).reshape(w.shape)
    target = (1 - w) * a.norm() + w * b.norm()
    tiny = dtype_eps(a.dtype) * (a.norm() + b.norm())
    ok = n > tiny
    out = torch.where(ok, p * target / torch.where(ok, n, torch.ones_like(n)),
                      slerp(a, b, tt))
    return _exact_ends(out, a, b, tt)


def cog(a: torch.Tensor, b: torch.Tensor, t: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Gaussian-preserving combination ((1-t) a + t b) / sqrt((1-t)^2 + t^2)
    (Bodin et al., arXiv 2408.08558): for independent a, b ~ N(0, I) the result is N(0, I)."""
    a, b, tt = _prepare(a, b, t)
    w = tt.reshape((-1,) + (1,) * a.ndim)
    out = ((1 - w) * a + w * b) / torch.sqrt((1 - w) ** 2 + w**2)
    return _exact_ends(out, a, b, tt)


def nao(a: torch.Tensor, b: torch.Tensor, t: Sequence[float] | torch.Tensor,
        spacing: str = DEFAULT_SPACING, n_grid: int | None = None) -> torch.Tensor:
    """The exact NAO geodesic (Samuel et al. 2023), solved in the plane span{a, b}.

    The curve is the exact geodesic whatever the spacing; ``spacing`` (``SPACINGS``) only
    chooses where the frames sit on it: at fractions t of its Euclidean arc length
    (``'euclidean'``, default: frames spread along the content change; their polyline's true
    NAO length stays within 1.1x the geodesic distance off the shell), of its NAO arc length
    (``'nao'``; off the chi shell this bunches the frames on the radial legs next to the
    endpoints), or of the angle from a (``'angle'``). ``n_grid``: segments of the planar
    solver (see ``metric``). Differentiable in a and b. Shapes (len(t), *a.shape).
    """
    a, b, tt = _prepare(a, b, t)
    metric = NAOMetric(a.numel(), **({"n_grid": n_grid} if n_grid else {}))
    return metric.geodesic(a, b, tt.to(torch.float64), spacing=spacing)


def nao_reference(a: torch.Tensor, b: torch.Tensor, t: Sequence[float] | torch.Tensor,
                  n_points: int = 50, lr: float = 0.01, max_iters: int = 10_000,
                  patience: int = 100, rtol: float = 1e-6, dtype: torch.dtype | None = None,
                  callback: Callable[[int, float], None] | None = None,
                  return_path: bool = False) -> torch.Tensor:
    """The paper's discretised NAO optimiser (official main.py), re-implemented without its
    hard-coded device and printing; runs on a's device.

    The path is n_points points p_0 = a, ..., p_{n-1} = b, initialised on the line; the
    interior points minimise, with Adam(lr), the midpoint NAO length

        sum_k w(|(p_k + p_{k+1}) / 2|) |p_{k+1} - p_k|  +  sum_k relu(|p_{k+1} - p_k| - eps),

    eps = 2 |a - b| / n_points, w = -log chi_d (computed in the shell-relative form of
    ``metric``, stable in float32). Early stopping (our choice; the paper only says
    "until convergence"): stop when the loss has not improved by a relative ``rtol`` for
    ``patience`` iterations, or at ``max_iters``. ``callback(iteration, loss)`` each step.

    Returns the path resampled at fractions t of its true NAO length (len(t), *a.shape), or with
    ``return_path`` the raw (n_points, *a.shape) optimised polyline.
    """
    a, b, tt = _prepare(a, b, t)
    dt = dtype or a.dtype
    d = a.numel()
    af, bf = a.reshape(-1).to(dt), b.reshape(-1).to(dt)
    s = torch.linspace(0, 1, n_points, dtype=dt, device=af.device)[1:-1, None]
    inner = ((1 - s) * af + s * bf).clone().requires_grad_(True)
    eps = 2 * float((af - bf).norm()) / n_points
    weight = _torch_weight(d)
    def loss_fn() -> torch.Tensor:
        path = torch.cat([af[None], inner, bf[None]])
        seg_len = (path[1:] - path[:-1]).norm(dim=1)
        mid = (path[1:] + path[:-1]) / 2
        return (weight(mid.norm(dim=1)) * seg_len).sum() + torch.relu(seg_len - eps).sum()

    adam_until_stale(loss_fn, [inner], lr, max_iters, patience, rtol, callback)
    path = torch.cat([af[None], inner.detach(), bf[None]]).to(a.dtype)
    if return_path:
        return path.reshape(n_points, *a.shape)
    return resample_polyline(path, tt, NAOMetric(d)).reshape(len(tt), *a.shape)


def adam_until_stale(loss_fn: Callable[[], torch.Tensor], params: list[torch.Tensor], lr: float,
                     max_iters: int, patience: int, rtol: float,
                     callback: Callable[[int, float], None] | None = None) -> None:
    """Minimise ``loss_fn()`` over ``params`` in place with Adam(lr), as the NAO paper's
    optimisers do; stop after ``patience`` iterations without a relative improvement of
    ``rtol``, or at ``max_iters``. ``callback(iteration, loss)`` after each step."""
    opt = torch.optim.Adam(params, lr=lr)
    best, stale = math.inf, 0
    for it in range(max_iters):
        opt.zero_grad()
        loss = loss_fn()
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


def _torch_weight(d: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """w(r) = w(r0) + (d-1) [(expm1(2 delta) - 2 delta)/2 - 0] in torch, delta = log(r/r0):
    -log chi_d(r) without the cancellation of its two large terms (differentiable)."""
    from latentgeo.metric import shell

    s = shell(d)

    def w(r: torch.Tensor) -> torch.Tensor:
        delta = torch.log(r / s.r0)
        return s.w0 + s.A * (torch.expm1(2 * delta) - 2 * delta) / 2

    return w


def resample_polyline(path: torch.Tensor, t: torch.Tensor, metric: NAOMetric) -> torch.Tensor:
    """Points at fractions t of the true NAO length of a polyline (n, d) -> (len(t), d).

    Within a segment, the position is linear in the segment's share of NAO length."""
    p = path.reshape(path.shape[0], -1)
    seg = torch.stack([metric.length(p[k:k + 2]) for k in range(p.shape[0] - 1)])
    cum = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(seg, 0)])
    target = t.to(torch.float64) * cum[-1]
    k = torch.clamp(torch.searchsorted(cum, target, right=True) - 1, 0, len(seg) - 1)
    frac = ((target - cum[k]) / torch.where(seg[k] > 0, seg[k], torch.ones_like(seg[k])))
    frac = frac.clamp(0, 1).to(p.dtype)[:, None]
    out = (1 - frac) * p[k] + frac * p[k + 1]
    out = torch.where((t == 0)[:, None], p[0].expand_as(out), out)
    return torch.where((t == 1)[:, None], p[-1].expand_as(out), out)


#: name -> interpolator, the API's and the CLI's ``--method`` choices.
INTERPOLATORS: dict[str, Interpolator] = {
    "lerp": lerp,
    "slerp": slerp,
    "nlerp": nlerp,
    "cog": cog,
    "nao": nao,
    "nao-reference": nao_reference,
}


def get_interpolator(name: str) -> Interpolator:
    """Look a method up by name; unknown names are refused with the list of valid ones."""
    if name not in INTERPOLATORS:
        raise InputError(f"unknown interpolation method {name!r} "
                         f"(choose from {', '.join(INTERPOLATORS)})")
    return INTERPOLATORS[name]
