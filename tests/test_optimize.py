"""Seed optimisation: per-seed optimisers against torch.optim, the loop's gradient against
finite differences in float64, batch == singles, best iterate, NaN stops, rewards, presets."""

from __future__ import annotations

import math
import sys
import types

import pytest
import torch

from latentgeo.diffusion import load_model, render
from latentgeo.diffusion.render import render_grad
from latentgeo.errors import InputError
from latentgeo.optimize import PRESETS, Reward, optimize, parse_reward, resolve
from latentgeo.optimize.optimizers import OptimizerSpec, RowOptimizer, clip_rows, rescale_rows
from latentgeo.optimize.rewards import class_reward_per_seed, to_judge_input
from tests.tiny_sd import tiny_pixel_path


@pytest.fixture(scope="module")
def pix():
    return load_model(str(tiny_pixel_path()))


@pytest.fixture(scope="module")
def pix64():
    return load_model(str(tiny_pixel_path()), dtype="float64")


def seeds(n, shape, seed=0, dtype=torch.float32):
    return torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed), dtype=dtype)


def pixel_reward(weights: torch.Tensor):
    """A smooth reward: per-row inner product of the image with fixed weights (class-indexed
    when the condition is a list of ints)."""
    def fn(images, condition=None):
        w = weights.to(images.dtype)
        if isinstance(condition, list):
            w = torch.stack([torch.roll(w, int(c), dims=-1) for c in condition])
        return (images * w).flatten(1).sum(1)
    return Reward("python:test", fn)


# -- optimisers --------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", [OptimizerSpec("sgd", lr=0.3, momentum=0.9, nesterov=True),
                                  OptimizerSpec("sgd", lr=0.3, momentum=0.9, nesterov=False,
                                                weight_decay=0.1),
                                  OptimizerSpec("sgd", lr=0.3, momentum=0.0, nesterov=False),
                                  OptimizerSpec("adamw", lr=0.05, weight_decay=0.01)])
def test_row_optimizer_equals_torch_optim(spec):
    """Every row steps exactly as torch.optim with its own state; a row skipped at some steps
    equals a torch optimiser that saw only that row's steps."""
    x0 = seeds(3, (5,), seed=1, dtype=torch.float64)
    grads = [seeds(3, (5,), seed=10 + t, dtype=torch.float64) for t in range(6)]
    opt = RowOptimizer(spec, x0)
    x = x0.clone()
    skip = {1: {2, 3}}  # row 1 does not step at iterations 2 and 3
    for t, g in enumerate(grads):
        rows = torch.tensor([i for i in range(3) if t not in skip.get(i, set())])
        x = opt.step(x, g[rows], rows)
    for i in range(3):
        p = x0[i].clone().requires_grad_(True)
        if spec.name == "sgd":
            ref = torch.optim.SGD([p], lr=spec.lr, momentum=spec.momentum,
                                  nesterov=spec.nesterov, weight_decay=spec.weight_decay)
        else:
            ref = torch.optim.AdamW([p], lr=spec.lr, weight_decay=spec.weight_decay,
                                    betas=spec.betas, eps=spec.eps)
        for t, g in enumerate(grads):
            if t in skip.get(i, set()):
                continue
            p.grad = g[i].clone()
            ref.step()
        torch.testing.assert_close(x[i], p.detach(), rtol=1e-12, atol=1e-12)


def test_clip_and_rescale_rows():
    g = torch.stack([torch.full((4,), 3.0), torch.full((4,), 0.01), torch.zeros(4)])
    c = clip_rows(g, 0.1)
    for i in range(3):
        p = g[i].clone().requires_grad_(True)
        p.grad = g[i].clone()
        torch.nn.utils.clip_grad_norm_([p], 0.1)
        torch.testing.assert_close(c[i], p.grad)
    ref = torch.stack([torch.ones(4), 2 * torch.ones(4), torch.ones(4)])
    r = rescale_rows(g, ref)
    torch.testing.assert_close(r.norm(dim=1), torch.tensor([2.0, 4.0, 0.0]))
    assert torch.equal(clip_rows(g, None), g)


# -- the differentiable render and the loop's gradient ----------------------------------------
def test_render_grad_matches_finite_differences_float64(pix64):
    """d reward(render(z)) / dz through every sampler step (checkpointed) and the decoder,
    against central differences, float64 network and arithmetic."""
    z = seeds(1, pix64.latent_shape, seed=3, dtype=torch.float64)
    w = seeds(1, (1, 16, 16), seed=4, dtype=torch.float64)[0]

    def f(x):
        images, _ = render_grad(pix64, x, condition=2, steps=3, guidance=2.0)
        return (images.to(torch.float64) * w).sum()

    zz = z.clone().requires_grad_(True)
    f(zz).backward()
    idx = torch.randperm(z.numel(), generator=torch.Generator().manual_seed(0))[:12]
    h = 1e-6
    for j in idx.tolist():
        e = torch.zeros_like(z).view(-1)
        e[j] = h
        e = e.view_as(z)
        with torch.no_grad():
            fd = (f(z + e) - f(z - e)) / (2 * h)
        assert abs(float(zz.grad.view(-1)[j]) - float(fd)) < 1e-6 * (1 + abs(float(fd)))


def _graph_retention(images):
    """The number of autograd nodes reachable from ``images``."""
    seen, stack = set(), [images.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        stack.extend(n for n, _ in node.next_functions)
    return len(seen)


@pytest.mark.parametrize("steps", [2, 7])
def test_checkpointed_render_grad_keeps_one_seed_per_step(pix, steps):
    """Memory that does not grow with the number of steps, as a property (no timing, no RSS):
    after the checkpointed forward, the graph holds one node per sampler step plus the decoder's
    and the seed's, and the only tensors saved for backward are each step's input and the
    decoder's (one seed-sized tensor each); nothing of the network's activations. Without
    checkpointing the saved bytes are many seeds per step (the check can see retention)."""
    z = seeds(3, pix.latent_shape, seed=8)
    seed_bytes = z.numel() * z.element_size()
    saved: dict[bool, int] = {}
    nodes: dict[bool, int] = {}
    for ckpt in (True, False):
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        zz = z.clone().requires_grad_(True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            images, _ = render_grad(pix, zz, condition=[1, 2, 3], steps=steps, checkpoint=ckpt)
        saved[ckpt], nodes[ckpt] = total, _graph_retention(images)
        images.sum().backward()  # still differentiable after the hooks are gone
        assert torch.isfinite(zz.grad).all()
    assert saved[True] == (steps + 1) * seed_bytes
    assert nodes[True] == steps + 2  # steps + decoder + the seed's AccumulateGrad
    assert saved[False] > 10 * steps * seed_bytes
    assert nodes[False] > 10 * steps


def test_checkpointing_refuses_a_model_tensor_that_needs_gradients(pix):
    """Checkpointing differentiates with respect to its input only: a trainable tensor inside
    the recomputed function is refused (never silently given no gradient); with checkpoint
    False its gradient flows."""
    from latentgeo.diffusion.recompute import recompute

    w = torch.tensor(2.0, requires_grad=True)
    x = torch.ones(3, requires_grad=True)
    with pytest.raises(ValueError, match="require gradients"):
        recompute(lambda v: v * w, x).sum().backward()
    recompute(lambda v: v * w, x.detach()).sum().backward()  # x needs none: plain call
    assert float(w.grad) == 3.0
    # under an outer torch.autograd.grad (the loop's call), the checkpointed gradient is exact
    (g,) = torch.autograd.grad(recompute(lambda v: (v ** 2, v.sin()), x)[0].sum(), x)
    torch.testing.assert_close(g, 2 * x.detach())


def test_loop_step_is_the_objective_gradient_float64(pix64):
    """One plain SGD step of the loop (no momentum, no clip): (z0 - z1) / lr equals the finite
    difference gradient of -J = -(reward - lambda R) in float64."""
    z = seeds(1, pix64.latent_shape, seed=5, dtype=torch.float64)
    w = seeds(1, (1, 16, 16), seed=6, dtype=torch.float64)[0]
    reward = pixel_reward(w)
    lam, lr = 0.5, 1e-3
    s = resolve("reno", lr=lr, momentum=0.0, clip=math.inf, iters=1, reg="kl", reg_weight=lam)
    res = optimize(pix64, z, [reward], condition=1, steps=3, settings=s, keep_every=1)
    z1 = res.trajectory[0][1][1]
    step = (z[0] - z1) / lr

    from latentgeo.regularizers import kl

    def neg_j(x):
        images, _ = render_grad(pix64, x, condition=1, steps=3)
        return -(reward(images).sum() - lam * kl(x[0]))

    h = 1e-6
    idx = torch.randperm(z.numel(), generator=torch.Generator().manual_seed(1))[:10]
    for j in idx.tolist():
        e = torch.zeros_like(z).view(-1)
        e[j] = h
        e = e.view_as(z)
        with torch.no_grad():
            fd = float((neg_j(z + e) - neg_j(z - e)) / (2 * h))
        assert abs(float(step.view(-1)[j]) - fd) < 1e-6 * (1 + abs(fd))
    # The log's objective at iteration 0 is J(z0).
    assert abs(res.log[0][0]["objective"] + float(neg_j(z))) < 1e-9


@pytest.mark.parametrize("preset,reg", [("reno", "norm"), ("reno", "mpgr"), ("dno", "dno")])
def test_batch_equals_single_seeds(pix, preset, reg):
    """4 seeds with 4 targets optimise exactly as 4 single-seed runs (per-seed clipping,
    rescaled regulariser, optimiser state, best iterate)."""
    z = seeds(4, pix.latent_shape, seed=7)
    w = seeds(1, (1, 16, 16), seed=8)[0]
    s = resolve(preset, iters=3, reg=reg, reg_weight=1.0, rescale=True)
    labels = [0, 3, 5, 7]
    batch = optimize(pix, z, [pixel_reward(w)], steps=3, settings=s, reward_condition=labels)
    for i in range(4):
        one = optimize(pix, z[i:i + 1], [pixel_reward(w)], steps=3, settings=s,
                       reward_condition=labels[i:i + 1])
        torch.testing.assert_close(batch.seeds[i], one.seeds[0], rtol=0, atol=1e-6)
        assert batch.best_iteration[i] == one.best_iteration[0]
        for a, b in zip(batch.log[i], one.log[0]):
            assert abs(a["objective"] - b["objective"]) < 1e-4


def test_best_iterate_by_objective_and_log(pix):
    z = seeds(3, pix.latent_shape, seed=9)
    w = seeds(1, (1, 16, 16), seed=10)[0]
    s = resolve("reno", iters=4, lr=50.0)  # large steps: the last iterate is not always best
    res = optimize(pix, z, [pixel_reward(w)], weights=[2.0], steps=3, settings=s, keep_every=1)
    for i in range(3):
        objs = [e["objective"] for e in res.log[i]]
        assert len(objs) == 5 and res.best_iteration[i] == max(range(5), key=objs.__getitem__)
        zt = dict(res.trajectory[i])[res.best_iteration[i]]
        assert torch.equal(res.seeds[i], zt)
        e = res.log[i][0]
        assert set(e) == {"iteration", "objective", "target", "rewards", "heldout",
                          "regularizer", "norm_z", "seconds"}
        assert abs(e["target"] - 2 * e["rewards"][0]) < 1e-9 and math.isnan(e["heldout"])
        assert abs(e["objective"] - (e["target"] - 0.01 * e["regularizer"])) < 1e-6
    # The rendered best seed gives back the logged target reward.
    i = 0
    img = render(pix, res.seeds[i:i + 1], steps=3)
    assert abs(2 * float(pixel_reward(w)(img)[0]) - res.best(i)["target"]) < 1e-4


def test_nan_stops_only_that_seed_and_keeps_its_best(pix):
    z = seeds(3, pix.latent_shape, seed=11)
    w = seeds(1, (1, 16, 16), seed=12)[0]
    calls = {"n": 0}

    def fn(images, condition):
        calls["n"] += 1
        out = (images * w).flatten(1).sum(1)
        if calls["n"] >= 3:  # from iteration 2 on, the seed labelled 'bad' gives NaN
            out = torch.where(torch.tensor([c == "bad" for c in condition]),
                              torch.full_like(out, float("nan")), out)
        return out

    s = resolve("reno", iters=4)
    res = optimize(pix, z, [Reward("python:nan", fn)], steps=3, settings=s,
                   reward_condition=["ok", "bad", "ok"])
    assert res.status[1].startswith("stopped: non-finite objective at iteration 2")
    assert len(res.log[1]) == 3 and res.best_iteration[1] <= 1
    assert torch.isfinite(res.seeds).all()
    assert res.status[0] == res.status[2] == "done" and len(res.log[0]) == 5
    ref = optimize(pix, z[[0, 2]], [pixel_reward(w)], steps=3, settings=s)
    torch.testing.assert_close(res.seeds[[0, 2]], ref.seeds, rtol=0, atol=1e-6)


def test_stop_at_target(pix):
    z = seeds(2, pix.latent_shape, seed=13)
    w = seeds(1, (1, 16, 16), seed=14)[0]
    res = optimize(pix, z, [pixel_reward(w)], steps=2, settings=resolve("reno", iters=3),
                   stop_at=-1e9)
    assert res.status == ["reached target"] * 2 and all(len(lg) == 1 for lg in res.log)


def test_class_reward_improves_judge_a_and_logs_judge_b(pix):
    z = seeds(2, pix.latent_shape, seed=15)
    res = optimize(pix, z, ["class:3"], steps=2, settings=resolve("reno", iters=3))
    for lg in res.log:
        assert all(math.isfinite(e["heldout"]) and e["heldout"] <= 0 for e in lg)
        assert max(e["target"] for e in lg) >= lg[0]["target"]
    per_seed = optimize(pix, z, [class_reward_per_seed()], steps=2,
                        settings=resolve("reno", iters=0), reward_condition=[3, 3])
    assert [lg[0]["target"] for lg in per_seed.log] == [lg[0]["target"] for lg in res.log]


def test_judge_input_resizes_and_differentiates():
    x = torch.rand(2, 3, 16, 16, requires_grad=True)
    y = to_judge_input(x)
    assert y.shape == (2, 1, 32, 32)
    y.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


# -- rewards and presets -----------------------------------------------------------------------
def test_reward_registry_errors(pix):
    with pytest.raises(InputError, match="class:N, clip:TEXT, python:MODULE:FUNCTION"):
        parse_reward("aesthetic")
    with pytest.raises(InputError, match="digit 0-9"):
        parse_reward("class:12")
    sd = types.SimpleNamespace(family="sd", image_channels=3, name="tiny-sd")
    with pytest.raises(InputError, match="needs a digit model"):
        parse_reward("class:3", sd)
    with pytest.raises(InputError, match="model=PATH"):
        parse_reward("clip:a dog")
    with pytest.raises(InputError, match="cannot import"):
        parse_reward("python:no_such_module_xyz:f")
    with pytest.raises(InputError, match="MODULE:FUNCTION"):
        parse_reward("python:onlyone")


def test_python_reward_and_shape_check(pix, monkeypatch):
    mod = types.ModuleType("lg_user_reward")
    mod.good = lambda images, condition: images.flatten(1).mean(1)
    mod.bad = lambda images, condition: images.mean()
    monkeypatch.setitem(sys.modules, "lg_user_reward", mod)
    z = seeds(2, pix.latent_shape)
    res = optimize(pix, z, ["python:lg_user_reward:good"], steps=2,
                   settings=resolve("reno", iters=1))
    assert res.rewards == ["python:lg_user_reward:good"]
    with pytest.raises(InputError, match="expected a tensor of shape \\(2,\\)"):
        optimize(pix, z, ["python:lg_user_reward:bad"], steps=2,
                 settings=resolve("reno", iters=1))


def test_presets_and_overrides():
    assert set(PRESETS) == {"default", "reno", "mpgr", "dno", "seedselect", "nao-seedselect"}
    from latentgeo.optimize.presets import DEFAULT_REG

    dflt = PRESETS["default"]
    assert (dflt.reg, dflt.reg_weight, dflt.rescale, dflt.iters, dflt.clip) == \
        (*DEFAULT_REG, True, 50, 0.1)
    assert resolve() == dflt
    r = PRESETS["reno"]
    assert (r.optimizer.name, r.optimizer.lr, r.optimizer.momentum, r.optimizer.nesterov,
            r.clip, r.iters, r.reg, r.reg_weight, r.rescale) == \
        ("sgd", 5.0, 0.9, True, 0.1, 50, "norm", 0.01, False)
    m = PRESETS["mpgr"]
    assert (m.clip, m.iters, m.reg, m.rescale) == (0.01, 500, "mpgr", True)
    d = PRESETS["dno"]
    assert (d.optimizer.name, d.optimizer.lr, d.clip, d.reg, d.reg_weight, d.iters) == \
        ("adamw", 0.01, 1.0, "dno", 1.0, 50)
    s = resolve("dno", lr=0.1, iters=7, reg="none", clip=math.inf)
    assert (s.optimizer.lr, s.iters, s.reg, s.clip) == (0.1, 7, "none", None)
    with pytest.raises(InputError, match="default, reno, mpgr, dno, seedselect"):
        resolve("nope")
    with pytest.raises(InputError, match="moment\\+spectral"):
        resolve("reno", reg="nope")
    with pytest.raises(InputError, match="sgd, adamw"):
        resolve("reno", optimizer="lbfgs")
