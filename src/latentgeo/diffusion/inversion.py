"""Inversion: the seed x_T that :func:`latentgeo.diffusion.sampler.sample` maps back to x_0.

Every deterministic step of a grid (:mod:`latentgeo.diffusion.grid`) reads

    x_dst = f(x, out) = A x + B out,      out = model(x, t),

with float64 scalars A > 0 and B (DDIM eta = 0 for variance-preserving models, Song et al. 2021,
Eq. 12; Euler for flow matching, where A = 1 and B = s' - s). It is affine in x for a fixed
``out``, so for a known x_dst the exact inverse step is the solution of

    x = G(x) := (x_dst - B model(x, t)) / A,

an implicit equation because the network must be evaluated at the *unknown* noisier point.

* **Plain inversion** evaluates the network at the known, less noisy point instead and applies
  the step with the levels swapped: x ~ A' x_dst + B' model(x_dst, t'), where (A', B') step
  from dst to src, forming x0/eps (or v) at x_dst's own level. For VP models t' = t, exactly
  diffusers' ``DDIMInverseScheduler`` (Dhariwal & Nichol 2021, App. F; Song et al. 2021, Eq. 13);
  for flow models t' is dst's own time (forward Euler run backwards). One network call per
  step; each step is off by B (out(x) - out(x_dst)), and the round trip drifts.
* **Fixed-point inversion** (Pan et al. 2023, "Effective real image editing with accelerated
  iterative diffusion inversion", Eq. 6; Garibi et al. 2024, ReNoise) starts from the plain
  estimate and iterates x <- G(x). At convergence the forward step reproduces x_dst exactly, so
  the sampler maps the seed back to x_0.

The forward residual of an iterate costs no extra network call beyond the one that refines it:

    f(x, model(x)) - x_dst = A (x - G(x)).

Iterations stop per sample once its RMS residual is <= ``tol``; converged samples leave the
batch, so they cost no further network calls. The iteration x <- G(x) is accelerated by
Anderson mixing (Walker & Ni 2011; as in Pan et al. 2023) over the last few iterates, the plain
estimate's G(x_dst) included, so the first refinement already extrapolates.

``invert_images`` wraps the core for a model backend (:mod:`latentgeo.diffusion.backends`, used
only through ``encode``, ``decode``, ``grid``, ``model_fn``); the core imports no diffusers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from latentgeo.diffusion.grid import Grid, estimate_coefficients, step_coefficients
from latentgeo.diffusion.sampler import ModelFn, sample
from latentgeo.errors import InputError, ShapeError

#: Default fixed-point tolerance on the per-sample RMS forward residual, keyed by dtype.
TOL: dict[torch.dtype, float] = {torch.float32: 1e-5, torch.float64: 1e-12}


@dataclass
class InversionInfo:
    """Diagnostics of one :func:`invert` call (B samples, S steps, in inversion order, i.e.
    index 0 is the grid's *last* step, the one next to the clean data).

    nfe:       int64 (B,), network evaluations spent on each sample.
    calls:     number of model calls (each on the still-active rows of the batch).
    residual:  float64 (S, B), RMS forward residual |f(x, out(x)) - x_dst| / sqrt(D) of the
               last *measured* iterate of each step (NaN where none was measured, i.e. for plain
               inversion). Where the step converged, that iterate is the one returned; otherwise
               the returned iterate is one (unmeasured) update newer.
    iters:     int64 (S, B), fixed-point iterations (extra network calls) used per step.
    converged: bool (S, B), the step's residual reached ``tol``.
    """

    nfe: torch.Tensor
    calls: int
    residual: torch.Tensor
    iters: torch.Tensor
    converged: torch.Tensor
    tol: float = field(default=0.0)

    @property
    def max_residual(self) -> torch.Tensor:
        """float64 (B,): worst measured step residual per sample (0 where none measured)."""
        r = torch.nan_to_num(self.residual, nan=0.0)
        return r.max(dim=0).values


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x.detach().flatten(1).to(torch.float64).pow(2).mean(dim=1).sqrt()


def anderson_mix(xs: list[torch.Tensor], gs: list[torch.Tensor]) -> torch.Tensor:
    """One type-II Anderson step (Walker & Ni 2011, Eq. 2.1; used for diffusion inversion by
    Pan et al. 2023) from iterates x_j and map values G(x_j), j = 0..m (oldest first).

    With residuals f_j = G(x_j) - x_j and differences dF_j = f_{j+1} - f_j, dG_j likewise:
    gamma = argmin |f_m - dF gamma|_2 per sample, x_new = G(x_m) - dG gamma.
    xs, gs: lists of (n, D) tensors; returns (n, D) in their dtype. With one pair it is the plain
    fixed-point update G(x_0). The least squares are solved per sample in float64.
    """
    if len(xs) == 1:
        return gs[0]
    x = torch.stack(xs, dim=-1).to(torch.float64)       # (n, D, m + 1)
    g = torch.stack(gs, dim=-1).to(torch.float64)
    f = g - x
    df, dg = f.diff(dim=-1), g.diff(dim=-1)             # (n, D, m)
    gram = df.transpose(1, 2) @ df                        # (n, m, m)
    rhs = df.transpose(1, 2) @ f[..., -1:]                # (n, m, 1)
    m = gram.shape[-1]
    scale = gram.diagonal(dim1=1, dim2=2).sum(-1).clamp_min(1e-300)[:, None, None]
    eye = torch.eye(m, dtype=torch.float64, device=gram.device)
    gamma = torch.linalg.solve(gram + (1e-13 * scale + 1e-200) * eye, rhs)
    mixed = (g[..., -1:] - dg @ gamma)[..., 0]
    # Degenerate history (residual differences at rounding level): plain update G(x_m).
    ok = torch.isfinite(mixed).all(dim=1, keepdim=True) & (scale[:, 0] > 1e-200)
    return torch.where(ok, mixed, g[..., -1]).to(xs[0].dtype)


@torch.no_grad()
def invert(model: ModelFn, x0: torch.Tensor, grid: Grid, fixed_point_iters: int = 3,
           tol: float | None = None, callback: Callable[[int, torch.Tensor], None] | None = None,
           anderson: int = 2, return_info: bool = False
           ) -> torch.Tensor | tuple[torch.Tensor, InversionInfo]:
    """Invert :func:`~latentgeo.diffusion.sampler.sample` on ``grid``: the seed x_T with
    sample(model, x_T, grid) = x0.

    Each inverse step solves x = G(x) := (x_dst - B model(x, t)) / A (module docstring): the
    plain estimate first, then up to ``fixed_point_iters`` refinements, each one network call,
    stopping per sample once the forward residual A (x - G(x)) has RMS <= tol.

    Args:
        model: model(x (b, *shape), t) -> raw output (b, *shape); called on subsets of the batch
            (rows are independent), so it must not depend on the batch composition.
        x0: (B, *shape) float32 or float64, the clean latents (the grid's final level).
        grid: exactly the grid rendering uses.
        fixed_point_iters: extra network calls per step refining x (Pan et al. 2023, Eq. 6);
            0 is plain inversion (one call per step).
        tol: per-sample RMS forward residual at which refinement stops (default ``TOL[dtype]``).
        callback: ``callback(i, x)`` after each inverse step i = 0..S-1 (x: (B, *shape)).
        anderson: Anderson acceleration depth m (``anderson_mix`` over the last m + 1 iterates,
            the plain estimate's G(x_dst) included); 0 = Picard iteration x <- G(x).
        return_info: also return an :class:`InversionInfo`.

    Returns:
        seeds (B, *shape) in x0's dtype, or ``(seeds, info)``. Deterministic.
    """
    if fixed_point_iters < 0:
        raise InputError(f"fixed_point_iters must be >= 0, got {fixed_point_iters}")
    if anderson < 0:
        raise InputError(f"anderson must be >= 0, got {anderson}")
    if x0.ndim < 2:
        raise ShapeError(f"x0 must be batched (B, ...), got shape {tuple(x0.shape)}")
    if not torch.is_floating_point(x0):
        raise InputError(f"x0 has dtype {x0.dtype}, expected float32 or float64")
    tol = TOL.get(x0.dtype, TOL[torch.float32]) if tol is None else float(tol)
    # What the fixed point holds constant: the raw output, except for x0-prediction, whose
    # map x -> out(x) is near the identity at low noise, so holding it makes G expansive;
    # there the noise estimate eps = c3 x + c4 out is held instead (the same step, rewritten).
    held = "epsilon" if grid.prediction == "sample" else grid.prediction

    def to_held(out: torch.Tensor, x: torch.Tensor, level: tuple[float, float]) -> torch.Tensor:
        if held == grid.prediction:
            return out
        _, _, c3, c4 = estimate_coefficients(grid.prediction, *level)
        return c3 * x + c4 * out

    if any(step_coefficients(held, grid.src[i], grid.dst[i])[0] <= 0.0
           for i in range(len(grid))):
        raise InputError("this grid cannot be inverted: one of its steps ignores its input")
    b, n_steps = x0.shape[0], len(grid)
    nfe = torch.zeros(b, dtype=torch.int64)
    residual = torch.full((n_steps, b), float("nan"), dtype=torch.float64)
    iters = torch.zeros((n_steps, b), dtype=torch.int64)
    converged = torch.zeros((n_steps, b), dtype=torch.bool)
    calls = 0

    def out_at(x: torch.Tensor, t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        nfe[rows.cpu()] += 1
        out = model(x, t)
        if out.shape != x.shape:
            raise ShapeError(f"model returned shape {tuple(out.shape)} for input "
                             f"{tuple(x.shape)}")
        return out.to(x.dtype)

    shape = x0.shape
    x = x0
    all_rows = torch.arange(b, device=x0.device)
    for k, i in enumerate(reversed(range(n_steps))):
        x_dst = x
        t = grid.timesteps[i]
        src, dst = grid.src[i], grid.dst[i]
        a, bb = step_coefficients(held, src, dst)
        a_plain, b_plain = step_coefficients(held, dst, src)

        def G(x_rows: torch.Tensor, rows: torch.Tensor, t: torch.Tensor = t, a: float = a,
              bb: float = bb, x_dst: torch.Tensor = x_dst,
              src: tuple[float, float] = src) -> torch.Tensor:
            return (x_dst[rows] - bb * to_held(out_at(x_rows, t, rows), x_rows, src)) / a

        # 1. Plain inversion: the output at the known, less noisy point, stepped dst -> src.
        g = a_plain * x_dst + b_plain * to_held(out_at(x_dst, grid.plain_timesteps[i], all_rows),
                                                x_dst, dst)
        hist_x, hist_g = [x_dst.flatten(1)], [g.flatten(1)]   # Anderson history, all rows
        x = g
        rows = all_rows
        # 2. Refinement x <- G(x) (Anderson-mixed) on the rows still above tol.
        for j in range(fixed_point_iters):
            xr = x[rows]
            g_new = G(xr, rows)
            r = a * _rms(xr - g_new)   # forward residual of xr
            residual[k, rows.cpu()] = r.cpu()
            iters[k, rows.cpu()] = j + 1
            done = r <= tol
            converged[k, rows[done].cpu()] = True
            if anderson:
                for h, new in ((hist_x, xr), (hist_g, g_new)):
                    full = h[-1].clone()
                    full[rows] = new.flatten(1)
                    h.append(full)
                    del h[:-(anderson + 1)]
            keep = ~done.to(rows.device)
            rows = rows[keep]
            if rows.numel() == 0:
                break
            if anderson:
                x_new = anderson_mix([h[rows] for h in hist_x], [h[rows] for h in hist_g])
            else:
                x_new = g_new[keep]
            x = x.clone()
            x[rows] = x_new.reshape(-1, *shape[1:])
        if callback is not None:
            callback(k, x)
    if not return_info:
        return x
    return x, InversionInfo(nfe=nfe, calls=calls, residual=residual, iters=iters,
                            converged=converged, tol=tol)


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image PSNR = 10 log10(range^2 / MSE) in dB; a, b (B, ...) -> float64 (B,).

    Identical images give +inf.
    """
    mse = (a.detach().to(torch.float64) - b.detach().to(torch.float64)).flatten(1).pow(2).mean(1)
    return 10.0 * torch.log10(data_range ** 2 / mse)


def latent_rmse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample RMS difference sqrt(mean((a - b)^2)); a, b (B, ...) -> float64 (B,)."""
    return _rms(a.to(torch.float64) - b.to(torch.float64))


def group_conditions(condition: Any, n: int) -> list[tuple[Any, list[int]]]:
    """Split a per-item condition list into (condition, row indices) groups, first-seen order;
    a single condition (or None) is one group of all n rows."""
    if not isinstance(condition, (list, tuple)):
        return [(condition, list(range(n)))]
    if len(condition) != n:
        raise ShapeError(f"{len(condition)} conditions for {n} images")
    groups: dict[Any, list[int]] = {}
    for i, c in enumerate(condition):
        groups.setdefault(c, []).append(i)
    return list(groups.items())


@dataclass
class ImageInversion:
    """Result of :func:`invert_images` for B images.

    seeds:   float32 (B, *latent_shape).
    x0:      float32 (B, *latent_shape), the encoded images the seeds were inverted from.
    nfe:     int64 (B,) network evaluations per image (CFG's batched pair counts as one).
    max_residual: float64 (B,) worst measured fixed-point step residual (0 for plain).
    converged_steps: int64 (B,) inverse steps whose residual reached ``tol``.
    residual: float64 (S, B) per inverse step (index 0 next to the clean image) the last
        measured forward residual (NaN for plain inversion; see :class:`InversionInfo`).
    steps, guidance, fixed_point_iters: the settings used.
    """

    seeds: torch.Tensor
    x0: torch.Tensor
    nfe: torch.Tensor
    max_residual: torch.Tensor
    converged_steps: torch.Tensor
    residual: torch.Tensor
    steps: int
    guidance: float
    fixed_point_iters: int


def invert_images(backend: Any, images: torch.Tensor, condition: Any = None,
                  steps: int | None = None, guidance: float = 1.0, fixed_point_iters: int = 3,
                  tol: float | None = None, anderson: int = 2, batch_size: int = 16,
                  callback: Callable[..., None] | None = None) -> ImageInversion:
    """Images -> seeds for a model backend: x0 = backend.encode(images), then :func:`invert`
    on ``backend.grid(steps)`` with ``backend.model_fn(condition, guidance)``.

    images: (B, image_channels, H, W) float in [0, 1] at the backend's image size.
    condition: None (unconditional: null class / empty prompt), one condition, or one per image.
    guidance: 1.0 by default (no classifier-free guidance: the sampler is then invertible
        without amplifying errors). ``callback(advance=1)`` is called once per inverse step and
        batch chunk. Latents and seeds are float32.
    """
    if images.ndim != 4:
        raise ShapeError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    steps = int(steps if steps is not None else backend.default_steps)
    grid = backend.grid(steps)
    n = images.shape[0]
    seeds = torch.empty((n, *backend.latent_shape), dtype=torch.float32)
    x0_all = torch.empty_like(seeds)
    nfe = torch.zeros(n, dtype=torch.int64)
    max_res = torch.zeros(n, dtype=torch.float64)
    conv = torch.zeros(n, dtype=torch.int64)
    residual = torch.full((len(grid), n), float("nan"), dtype=torch.float64)
    step_cb = None if callback is None else (lambda i, x: callback(advance=1))
    with torch.no_grad():
        for cond, rows in group_conditions(condition, n):
            model = backend.model_fn(cond, guidance)
            for start in range(0, len(rows), batch_size):
                idx = torch.tensor(rows[start:start + batch_size], dtype=torch.int64)
                x0 = backend.encode(images[idx]).to("cpu", torch.float32)
                z, info = invert(model, x0.to(backend.device), grid,
                                 fixed_point_iters=fixed_point_iters, tol=tol, anderson=anderson,
                                 callback=step_cb, return_info=True)
                seeds[idx] = z.to("cpu", torch.float32)
                x0_all[idx] = x0
                nfe[idx] = info.nfe
                max_res[idx] = info.max_residual
                conv[idx] = info.converged.sum(dim=0)
                residual[:, idx] = info.residual
    return ImageInversion(seeds=seeds, x0=x0_all, nfe=nfe, max_residual=max_res,
                          converged_steps=conv, residual=residual, steps=steps,
                          guidance=float(guidance), fixed_point_iters=fixed_point_iters)


@dataclass
class RoundTrip:
    """:func:`check_roundtrip` result: float64 (B,) latent RMSE and pixel PSNR (dB), renders."""

    latent_rmse: torch.Tensor
    psnr: torch.Tensor
    images: torch.Tensor


def check_roundtrip(backend: Any, seeds: torch.Tensor, x0: torch.Tensor, images: torch.Tensor,
                    condition: Any = None, steps: int | None = None, guidance: float = 1.0,
                    batch_size: int = 16,
                    callback: Callable[..., None] | None = None) -> RoundTrip:
    """Render seeds back with the same sampler and compare.

    Latent error: RMS(sample(seeds) - x0) per image. Pixel PSNR: between
    backend.decode(sample(seeds)) and the input images in [0, 1]; for latent models the VAE
    caps it (compare with PSNR(decode(x0), images)).
    """
    steps = int(steps if steps is not None else backend.default_steps)
    grid = backend.grid(steps)
    n = seeds.shape[0]
    x_hat = torch.empty((n, *x0.shape[1:]), dtype=torch.float32)
    out = torch.empty((n, *images.shape[1:]), dtype=torch.float32)
    step_cb = None if callback is None else (lambda i, x, x0: callback(advance=1))
    with torch.no_grad():
        for cond, rows in group_conditions(condition, n):
            model = backend.model_fn(cond, guidance)
            for start in range(0, len(rows), batch_size):
                idx = torch.tensor(rows[start:start + batch_size], dtype=torch.int64)
                xs = sample(model, seeds[idx].to(backend.device, torch.float32), grid,
                            callback=step_cb)
                x_hat[idx] = xs.to("cpu", torch.float32)
                out[idx] = backend.decode(xs).to("cpu", torch.float32)
    return RoundTrip(latent_rmse=latent_rmse(x_hat, x0), psnr=psnr(out, images.float()),
                     images=out)
