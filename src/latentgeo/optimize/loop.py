"""The seed-optimisation loop: maximise sum_j w_j r_j(render(z)) - lambda R(z) per seed.

Each seed follows its own trajectory (Eyring et al. 2024, ReNO, Algorithm 1; Hwang et al. 2025
for the rescaled regulariser): at iteration t the active seeds are rendered with gradients
(:func:`latentgeo.diffusion.render.render_grad`, every sampler step and the decoder
checkpointed), the objective J_t = sum_j w_j r_j - lambda R is evaluated, and the seed steps
along the gradient of -J:

    g = -(grad r - lambda * s * grad R),   s = |grad r| / |grad R|  when rescaling, else 1,
    g <- g min(1, clip / (|g| + 1e-6)),     z <- optimiser step (per-seed state).

Norms, clipping, the optimiser state and stopping are per seed (rows are independent through
the sampler, the decoder and the judges), so a batch gives the result of one seed at a time.
``iters`` steps are taken and iterates 0..iters evaluated; the returned seed is the iterate with
the highest J (ReNO keeps its best, not its last; the held-out reward never chooses). A
non-finite objective or gradient stops that seed; it keeps its best finite iterate.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from latentgeo.chi import norm_z_scores
from latentgeo.diffusion.render import render_grad
from latentgeo.errors import InputError
from latentgeo.optimize.optimizers import RowOptimizer, clip_rows, rescale_rows
from latentgeo.optimize.presets import Settings, resolve
from latentgeo.optimize.rewards import Reward, RewardFn, parse_reward
from latentgeo.regularizers import RANDOMISED, REGULARIZERS


@dataclass
class OptimizeResult:
    """``seeds``: the best iterate of each seed (B, *latent_shape), the input's dtype, CPU.
    ``log[i]``: one dict per evaluated iteration of seed i with keys iteration, objective,
    target (sum_j w_j r_j), rewards (each r_j), heldout (NaN without a held-out reward),
    regularizer (R, unweighted), norm_z (chi z-score of |z|), seconds (wall time of that
    iteration for the whole batch). ``best_iteration[i]`` indexes ``log[i]``;
    ``status[i]``: 'done', 'reached target' or why the seed stopped early.
    ``trajectory[i]``: (iteration, z) pairs kept every ``keep_every`` iterations.
    ``nfe[i]``: network evaluations spent on seed i, counted as forward calls with a backward
    counted as two: each evaluated iteration renders ``steps`` forward calls, and each one
    followed by a step adds 2 x ``steps`` for the backward, plus ``steps`` recomputed forwards
    when checkpointing (classifier-free guidance's batched pair counts as one call).
    ``steps``: the sampler steps the loop rendered with."""

    seeds: torch.Tensor
    settings: Settings
    rewards: list[str]
    weights: list[float]
    best_iteration: list[int]
    status: list[str]
    log: list[list[dict]]
    trajectory: list[list[tuple[int, torch.Tensor]]] = field(default_factory=list)
    nfe: list[int] = field(default_factory=list)
    steps: int = 0

    def before(self, i: int) -> dict:
        return self.log[i][0]

    def best(self, i: int) -> dict:
        return self.log[i][self.best_iteration[i]]


def _call(reward: Reward, fn: RewardFn, images: torch.Tensor, condition: Any,
          estimates: list[torch.Tensor] | None, latent: torch.Tensor | None) -> torch.Tensor:
    """``fn`` (the reward or its held-out twin) with the clean estimates it declared."""
    if not reward.estimates:
        return fn(images, condition)
    est = None if estimates is None else estimates[-reward.estimates:]
    return fn(images, condition, estimates=est, latent=latent)


def _combined(rewards: Sequence[Reward], weights: Sequence[float]
              ) -> Callable[..., torch.Tensor] | None:
    """The weighted sum of the rewards' held-out twins (None unless all have one)."""
    if any(r.heldout is None for r in rewards):
        return None

    def total(images: torch.Tensor, condition: Any,
              estimates: list[torch.Tensor] | None = None,
              latent: torch.Tensor | None = None) -> torch.Tensor:
        return sum(w * _call(r, r.heldout, images, condition, estimates, latent)
                   .to(torch.float64) for w, r in zip(weights, rewards))

    return total


def _reg_generator(seed: int, iteration: int) -> torch.Generator:
    """The same permutations for every seed at one iteration: a batch stays equal to singles."""
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + iteration)


def optimize(backend: Any, seeds: torch.Tensor, rewards: Sequence[Reward | str],
             weights: Sequence[float] | None = None, condition: Any = None,
             steps: int | None = None, guidance: float | None = None,
             settings: Settings | None = None, heldout: RewardFn | None = None,
             stop_at: float | None = None, reg_seed: int = 0, checkpoint: bool = True,
             reward_condition: Any = None,
             keep_every: int | None = None,
             callback: Callable[[int, list[int], list[dict]], None] | None = None
             ) -> OptimizeResult:
    """Optimise seeds (B, *latent_shape) of ``backend`` for ``rewards`` (module docstring).

    rewards: :class:`Reward` objects or specs (``class:3``); weights: one per reward (default
    1). condition/steps/guidance: as for :func:`latentgeo.diffusion.render` (a list condition
    has one entry per seed); steps/guidance None: the settings' (then the model's default).
    A reward with ``estimates`` = k > 0 (``match``) makes the loop render with
    ``render_grad(..., estimates=k)`` and pass it the decoded clean estimates of the last k
    sampler states and the final clean latent (:class:`Reward`).
    settings: :func:`latentgeo.optimize.presets.resolve` (default
    ``default``: the ``reno`` loop with the regulariser the reward-hacking table chose).
    heldout: ``f(images, condition) -> (B,)`` logged, never optimised (default: the
    weighted sum of each reward's held-out twin, when all have one). stop_at: a seed stops once
    its target reward reaches it. reg_seed: seeds the random permutations of ``dno``/``mpgr``.
    reward_condition: what the rewards receive as ``condition`` (default: ``condition``); a
    list gives one entry per seed (e.g. a target class per seed of an unconditional model).
    checkpoint: per-step and decoder gradient checkpointing (a memory tool: same numbers).
    callback(t, seed indices, log records) after every iteration.
    """
    settings = resolve("default") if settings is None else settings
    settings.check()
    rewards = [parse_reward(r, backend) if isinstance(r, str) else r for r in rewards]
    if not rewards:
        raise InputError("no reward given (e.g. class:3, clip:TEXT, python:MODULE:FUNCTION)")
    weights = [1.0] * len(rewards) if weights is None else [float(w) for w in weights]
    if len(weights) != len(rewards):
        raise InputError(f"{len(weights)} reward weights for {len(rewards)} rewards")
    if not all(math.isfinite(w) for w in weights):
        raise InputError(f"reward weights {weights}: must be finite numbers")
    x = backend.check_seeds(seeds)
    b = x.shape[0]
    per_seed = isinstance(condition, (list, tuple))
    conds = backend.per_row(condition, b) if per_seed else None
    if reward_condition is None:
        reward_condition = condition
    r_per_seed = isinstance(reward_condition, (list, tuple))
    r_conds = backend.per_row(reward_condition, b) if r_per_seed else None
    backend.check_condition(condition)
    heldout_fn = heldout if heldout is not None else _combined(rewards, weights)
    own_heldout = heldout is None
    steps = settings.steps if steps is None else steps
    guidance = settings.guidance if guidance is None else guidance
    n_steps = backend.default_steps if steps is None else int(steps)
    k_est = min(max(r.estimates for r in rewards), n_steps + 1)  # a short grid has fewer
    nfe = [0] * b
    reg_fn, lam = REGULARIZERS[settings.reg], settings.reg_weight
    randomised = settings.reg in RANDOMISED

    z = x.detach().to(backend.device).clone()
    opt = RowOptimizer(settings.optimizer, z)
    active = torch.ones(b, dtype=torch.bool)
    best_j = torch.full((b,), -math.inf, dtype=torch.float64)
    best_z = z.clone()
    best_it = [0] * b
    status = ["done"] * b
    log: list[list[dict]] = [[] for _ in range(b)]
    trajectory: list[list[tuple[int, torch.Tensor]]] = [[] for _ in range(b)]

    for t in range(settings.iters + 1):
        rows = active.nonzero().squeeze(1)
        if rows.numel() == 0:
            break
        t0 = time.perf_counter()
        last = t == settings.iters
        cond = [conds[i] for i in rows.tolist()] if per_seed else condition
        r_cond = [r_conds[i] for i in rows.tolist()] if r_per_seed else reward_condition
        with torch.enable_grad():
            za = z[rows].clone().requires_grad_(True)
            est: list[torch.Tensor] | None = None
            if k_est:
                images, x0, est = render_grad(backend, za, cond, steps, guidance,
                                              checkpoint=checkpoint, estimates=k_est)
            else:
                images, x0 = render_grad(backend, za, cond, steps, guidance,
                                         checkpoint=checkpoint)
            parts = [r(images, r_cond, est, x0) if r.estimates else r(images, r_cond)
                     for r in rewards]
            target = sum(w * p.to(torch.float64) for w, p in zip(weights, parts))
            regs = torch.stack([reg_fn(za[k], generator=_reg_generator(reg_seed, t))
                                if randomised else reg_fn(za[k]) for k in range(len(rows))])
            objective = (target - lam * regs.to(torch.float64)).detach().cpu()
            grad = None
            if not last:
                g_r = torch.autograd.grad(target.sum(), za, allow_unused=True)[0]
                g_r = torch.zeros_like(za) if g_r is None else g_r
                g_reg = torch.zeros_like(za)
                if lam > 0:
                    g = torch.autograd.grad(regs.sum(), za, allow_unused=True)[0]
                    g_reg = g_reg if g is None else g
                    if settings.rescale:
                        g_reg = rescale_rows(g_reg, g_r)
                grad = clip_rows(-(g_r - lam * g_reg), settings.clip).detach()
        with torch.no_grad():
            if heldout_fn is None:
                held = None
            elif own_heldout and k_est:
                held = heldout_fn(images.detach(), r_cond,
                                  [e.detach() for e in est] if est is not None else None,
                                  x0.detach()).detach().cpu()
            else:
                held = heldout_fn(images.detach(), r_cond).detach().cpu()
        per_eval = n_steps + (0 if last else 2 * n_steps + (n_steps if checkpoint else 0))
        for i in rows.tolist():
            nfe[i] += per_eval
        zd = za.detach()
        nz = norm_z_scores(zd).cpu()
        finite = torch.isfinite(objective)
        grad_ok = torch.ones(len(rows), dtype=torch.bool) if grad is None else \
            torch.isfinite(grad).flatten(1).all(1).cpu()
        step_rows, step_k = [], []
        seconds = None
        for k, i in enumerate(rows.tolist()):
            if finite[k] and objective[k] > best_j[i]:
                best_j[i] = objective[k]
                best_z[i] = zd[k]
                best_it[i] = t
            if keep_every and (t % keep_every == 0 or last):
                trajectory[i].append((t, zd[k].cpu().clone()))
            if not finite[k]:
                status[i] = (f"stopped: non-finite objective at iteration {t}; kept iteration "
                             f"{best_it[i]}" if best_j[i] > -math.inf else
                             f"stopped: non-finite objective at iteration {t}; no finite "
                             "iterate, returned the input seed")
                active[i] = False
            elif not grad_ok[k]:
                status[i] = (f"stopped: non-finite gradient at iteration {t}; kept iteration "
                             f"{best_it[i]}")
                active[i] = False
            elif stop_at is not None and float(target[k].detach()) >= stop_at:
                status[i] = "reached target"
                active[i] = False
            elif not last:
                step_rows.append(i)
                step_k.append(k)
        if step_rows:
            z = opt.step(z, grad[step_k], torch.tensor(step_rows, device=z.device))
        seconds = time.perf_counter() - t0
        records = []
        for k, i in enumerate(rows.tolist()):
            rec = {"iteration": t, "objective": float(objective[k]),
                   "target": float(target[k].detach()),
                   "rewards": [float(p[k].detach()) for p in parts],
                   "heldout": float(held[k]) if held is not None else float("nan"),
                   "regularizer": float(regs[k].detach()), "norm_z": float(nz[k]),
                   "seconds": seconds}
            log[i].append(rec)
            records.append(rec)
        if callback is not None:
            callback(t, rows.tolist(), records)
    return OptimizeResult(best_z.cpu().to(x.dtype), settings, [r.spec for r in rewards],
                          weights, best_it, status, log, trajectory if keep_every else [],
                          nfe, n_steps)
