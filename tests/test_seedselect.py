"""SeedSelect and the NAO start (issue 14): the match loss against a brute-force computation
through diffusers' own DDIM scheduler, render_grad's clean estimates, start seeds (centroid,
NAO paths, even split), batch == singles with the match reward, presets and the lr schedule."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from latentgeo import centroids, interpolation
from latentgeo.diffusion import load_model, render
from latentgeo.diffusion.inversion import invert_images
from latentgeo.diffusion.render import render_grad
from latentgeo.errors import InputError
from latentgeo.optimize import PRESETS, Reward, match_reward, optimize, resolve, start_seeds
from latentgeo.optimize.init import path_counts
from latentgeo.optimize.optimizers import OptimizerSpec, RowOptimizer
from latentgeo.optimize.rewards import SEEDSELECT_WEIGHTS
from tests.tiny_sd import TINY_PIXEL_LATENT, tiny_pixel_path


@pytest.fixture(scope="module")
def pix():
    return load_model(str(tiny_pixel_path()))


def gauss(n, shape, seed=0, dtype=torch.float32):
    return torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed), dtype=dtype)


def references(pix, n=4, seed=5):
    """Reference images of the tiny model: its own renders of random seeds."""
    return render(pix, gauss(n, pix.latent_shape, seed), steps=4)


class LinearFeatures(torch.nn.Module):
    """A fixed random linear feature map images -> (B, 6) (differentiable, row-independent)."""

    def __init__(self, d: int, seed: int = 3) -> None:
        super().__init__()
        self.register_buffer("w", gauss(1, (d, 6), seed)[0])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.flatten(1).to(self.w.dtype) @ self.w


# -- the loss against a brute-force computation ------------------------------------------------
def _diffusers_states(pix, z: torch.Tensor, steps: int):
    """Independent render with diffusers' DDIMScheduler: (final x0, pred_original_sample of
    every step), in float64 numpy."""
    import copy

    sched = copy.deepcopy(pix.scheduler)
    sched.set_timesteps(steps)
    x = z.clone()
    preds = []
    with torch.no_grad():
        for t in sched.timesteps:
            labels = torch.full((x.shape[0],), pix.null_class, dtype=torch.long)
            eps = pix.unet(x, t.expand(x.shape[0]), class_labels=labels).sample
            out = sched.step(eps, t, x)
            preds.append(out.pred_original_sample.clone())
            x = out.prev_sample
    return x, preds


def _brute_loss(feat_w: np.ndarray, estimates: list[np.ndarray], latent: np.ndarray,
                ref_images: np.ndarray, ref_latents: np.ndarray) -> list[float]:
    """SeedSelect's loss row by row with explicit sums (float64)."""
    ref_f = ref_images.reshape(len(ref_images), -1) @ feat_w
    c = ref_f.mean(0)
    c = c / math.sqrt(float((c * c).sum()))
    mean_lat = ref_latents.mean(0).reshape(-1)
    out = []
    for i in range(latent.shape[0]):
        sem = 0.0
        for w, img in zip(SEEDSELECT_WEIGHTS, estimates):
            f = img[i].reshape(-1) @ feat_w
            cos = float((f * c).sum()) / math.sqrt(float((f * f).sum()))
            sem += w * (1.0 - cos)
        d = latent[i].reshape(-1) - mean_lat
        out.append(10.0 * sem + float((d * d).sum()) / d.size)
    return out


def test_match_loss_equals_brute_force_through_diffusers_ddim(pix):
    """The reward the loop computes (render_grad's last 3 clean estimates, decoded; features
    of a fixed linear map; appearance on the final latent) == minus the loss computed by hand
    from diffusers' own DDIM step outputs (pred_original_sample of steps S-2 and S-1, the
    final sample), for every row."""
    steps = 6
    refs = references(pix, 3)
    feats = LinearFeatures(int(np.prod(refs.shape[1:])))
    reward = match_reward(pix, refs, feats)
    assert reward.estimates == 3 and reward.heldout is None
    z = gauss(3, pix.latent_shape, 11)
    with torch.no_grad():
        images, x0, est = render_grad(pix, z, steps=steps, estimates=3)
        got = reward(images, None, est, x0).double()
    assert est[-1] is images and len(est) == 3
    x_final, preds = _diffusers_states(pix, z, steps)
    dec = [((p + 1) / 2).clamp(0, 1).double().numpy() for p in (preds[-2], preds[-1], x_final)]
    want = _brute_loss(feats.w.double().numpy(), dec, x_final.double().numpy(),
                       refs.double().numpy(), (2 * refs - 1).double().numpy())
    np.testing.assert_allclose(-got.numpy(), want, rtol=2e-5, atol=2e-5)
    # Called without estimates (a benchmark scoring final images), every term is the image.
    plain = reward(images)
    with torch.no_grad():
        same = reward(images, None, [images] * 3, pix.encode(images))
    torch.testing.assert_close(plain, same)


class _RawDecode:
    """The backend with an identity decoder: render_grad's estimates are then the raw clean
    estimates (no clamp hiding their differences)."""

    def __init__(self, backend):
        self._b = backend

    def __getattr__(self, name):
        return getattr(self._b, name)

    def decode(self, x0):
        return x0


def test_render_grad_estimates_are_diffusers_pred_original_samples(pix):
    """The k clean estimates are those of the states after steps S-k..S-1: diffusers'
    pred_original_sample of steps S-k+1..S-1, then the final sample (they differ clearly)."""
    z = gauss(3, pix.latent_shape, 11)
    with torch.no_grad():
        _, x0, est = render_grad(_RawDecode(pix), z, steps=5, estimates=4)
    x_final, preds = _diffusers_states(pix, z, 5)
    for got, want in zip(est, [*preds[-3:], x_final]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert float((preds[-3] - preds[-2]).abs().max()) > 1e-2
    torch.testing.assert_close(x0, x_final, rtol=1e-4, atol=1e-4)


def test_render_grad_estimates_default_path_unchanged(pix):
    z = gauss(2, pix.latent_shape, 2)
    with torch.no_grad():
        a = render_grad(pix, z, steps=4)
        b = render_grad(pix, z, steps=4, estimates=2)
    assert len(a) == 2 and len(b) == 3
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
    with pytest.raises(InputError, match="6 clean estimates"):
        render_grad(pix, z, steps=4, estimates=6)
    with torch.no_grad():  # all S + 1 states: the first is the seed's own clean estimate
        _, _, est = render_grad(_RawDecode(pix), z, steps=2, estimates=3)
    _, preds = _diffusers_states(pix, z, 2)
    torch.testing.assert_close(est[0], preds[0], rtol=1e-4, atol=1e-4)


def test_match_reward_judge_features_and_heldout_on_the_digit_model():
    """Default features on a 1-channel pixel model: judge A; held-out twin: judge B; the
    reference images' own renders score best against themselves (semantic 0)."""
    from latentgeo.classifier import load_judge
    from latentgeo.optimize.rewards import seedselect_terms, to_judge_input

    pix = load_model(str(tiny_pixel_path()))
    refs = references(pix, 2)
    reward = match_reward(pix, refs)
    assert reward.heldout is not None
    judge = load_judge("a")
    with torch.no_grad():
        sem, app = seedselect_terms(lambda x: judge.features(to_judge_input(x)), [refs[:1]] * 3,
                                    pix.encode(refs[:1]), judge.features(
                                        to_judge_input(refs)).mean(0), pix.encode(refs).mean(0))
        torch.testing.assert_close(reward(refs[:1]).double(), -(10 * sem + app))


def test_match_spec_reads_a_folder_and_warns_on_unreadable_files(pix, tmp_path):
    from latentgeo.images import load_image_folder, save_image
    from latentgeo.optimize import parse_reward

    refs = references(pix, 2)
    for i, img in enumerate(refs):
        save_image(tmp_path / f"r{i}.png", img)
    (tmp_path / "zz.png").write_bytes(b"broken")
    with pytest.warns(UserWarning, match="zz.png"):
        reward = parse_reward(f"match:{tmp_path}", pix)
    assert reward.spec == f"match:{tmp_path}" and reward.estimates == 3
    images, paths, problems = load_image_folder(tmp_path, 16, 1)
    assert [p.name for p in paths] == ["r0.png", "r1.png"] and len(problems) == 1
    same = match_reward(pix, images)
    z = gauss(2, pix.latent_shape, 1)
    with torch.no_grad():
        imgs, x0, est = render_grad(pix, z, steps=3, estimates=3)
        torch.testing.assert_close(reward(imgs, None, est, x0), same(imgs, None, est, x0))
    with pytest.raises(InputError, match="no such directory"):
        parse_reward(f"match:{tmp_path / 'nowhere'}", pix)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no image files"):
        parse_reward(f"match:{tmp_path / 'empty'}", pix)


def test_match_needs_a_feature_model_off_the_digit_models():
    from tests.tiny_sd import tiny_sd_path

    sd = load_model(str(tiny_sd_path()))
    with pytest.raises(InputError, match="feature_model"):
        match_reward(sd, torch.rand(2, 3, 16, 16))


# -- start seeds --------------------------------------------------------------------------------
@pytest.mark.parametrize("n,m", [(7, 3), (8, 3), (2, 3), (1, 2)])
def test_start_seeds_centroid_then_nao_paths(pix, n, m):
    refs = references(pix, m, seed=7)
    st = start_seeds(pix, refs, n, "nao", steps=5)
    inv = invert_images(pix, refs, steps=5)
    torch.testing.assert_close(st.inverted, inv.seeds)
    assert st.nfe == int(inv.nfe.sum()) > 0
    c = centroids.nao(inv.seeds.double())
    assert st.seeds.shape == (n, *TINY_PIXEL_LATENT)
    torch.testing.assert_close(st.seeds[0].double(), c, rtol=1e-5, atol=1e-5)
    counts = path_counts(n, m)
    assert sum(counts) == n - 1 and max(counts) - min(counts) <= 1
    assert [st.path.count(i) for i in range(m)] == counts
    k = 1
    for i, p in enumerate(counts):
        if p:
            t = [j / (p + 1) for j in range(1, p + 1)]
            want = interpolation.nao(c, inv.seeds[i].double(), t).float()
            torch.testing.assert_close(st.seeds[k:k + p], want, rtol=1e-5, atol=1e-5)
            assert st.fraction[k:k + p] == pytest.approx(t)
        k += p
    for s in st.seeds:  # never a reference's own inversion
        assert min(float((s - r).norm()) for r in inv.seeds) > 1e-3


def test_start_seeds_other_centroids_random_and_errors(pix):
    refs = references(pix, 3, seed=8)
    st = start_seeds(pix, refs, 4, "normalized", steps=5)
    torch.testing.assert_close(st.seeds[0].double(), centroids.normalized(st.inverted.double()),
                               rtol=1e-6, atol=1e-6)
    again = start_seeds(pix, None, 4, "normalized", steps=5, inverted=st.inverted,
                        inversion_nfe=st.nfe)
    torch.testing.assert_close(again.seeds, st.seeds)
    assert again.nfe == st.nfe
    r1 = start_seeds(pix, None, 3, "random", seed=4)
    r2 = start_seeds(pix, None, 3, "random", seed=4)
    assert r1.nfe == 0 and torch.equal(r1.seeds, r2.seeds)
    torch.testing.assert_close(r1.seeds, gauss(3, pix.latent_shape, 4))
    with pytest.raises(InputError, match="at least 2"):
        start_seeds(pix, refs[:1], 4, "nao", steps=5)
    with pytest.raises(InputError, match="unknown centroid"):
        start_seeds(pix, refs, 4, "median", steps=5)


# -- the loop --------------------------------------------------------------------------------------
@pytest.mark.parametrize("features", ["linear", "judge"])
def test_batch_equals_singles_with_the_match_reward(pix, features):
    refs = references(pix, 3)
    reward = match_reward(pix, refs, LinearFeatures(int(np.prod(refs.shape[1:])))
                          if features == "linear" else None)
    z = gauss(3, pix.latent_shape, 9)
    settings = resolve("seedselect", iters=4, steps=4)
    batch = optimize(pix, z, [reward], settings=settings)
    for i in range(3):
        one = optimize(pix, z[i:i + 1], [reward], settings=settings)
        torch.testing.assert_close(batch.seeds[i:i + 1], one.seeds, rtol=1e-5, atol=1e-6)
        for key in ("target", "heldout"):
            assert [r[key] for r in batch.log[i]] == pytest.approx(
                [r[key] for r in one.log[0]], rel=1e-5, abs=1e-6, nan_ok=True)
    assert batch.steps == 4
    # 4 steps: 5 evaluations x 4 forwards + 4 steps x (2 x 4 backward + 4 recomputed)
    assert batch.nfe == [5 * 4 + 4 * 12] * 3
    assert all(lg[batch.best_iteration[i]]["target"] >= lg[0]["target"]
               for i, lg in enumerate(batch.log))


def test_loop_passes_estimates_only_to_rewards_that_ask(pix):
    seen = {}

    def plain(images, condition):
        return images.flatten(1).mean(1)

    def wants(images, condition, estimates=None, latent=None):
        seen["n"], seen["latent"] = len(estimates), tuple(latent.shape)
        return -sum((e - 0.5).pow(2).flatten(1).mean(1) for e in estimates)

    res = optimize(pix, gauss(2, pix.latent_shape), [Reward("python:a", plain),
                                                   Reward("python:b", wants, estimates=2)],
                   steps=3, settings=resolve("reno", iters=1))
    assert seen == {"n": 2, "latent": (2, *TINY_PIXEL_LATENT)}
    assert len(res.log[0]) == 2


# -- presets and the lr schedule ------------------------------------------------------------------
def test_seedselect_presets():
    s = PRESETS["seedselect"]
    assert (s.optimizer.name, s.optimizer.lr, s.optimizer.decay_at, s.optimizer.decay,
            s.optimizer.weight_decay, s.iters, s.steps, s.guidance, s.clip, s.reg,
            s.reg_weight) == ("adamw", 0.1, 3, 0.1, 0.01, 30, 20, None, None, "none", 0.0)
    n = PRESETS["nao-seedselect"]
    assert (n.optimizer.name, n.optimizer.lr, n.optimizer.decay_at, n.optimizer.decay,
            n.iters, n.steps, n.guidance, n.clip, n.reg) == \
        ("adamw", 0.05, 3, 0.1, 5, 20, 1.0, None, "none")
    r = resolve("seedselect", steps=8, guidance=2.0, lr=0.2)
    assert (r.steps, r.guidance, r.optimizer.lr, r.optimizer.decay_at) == (8, 2.0, 0.2, 3)
    with pytest.raises(InputError, match="steps 0"):
        resolve("seedselect", steps=0)


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_lr_schedule_equals_torch_with_lr_changed_at_step_3(name):
    """SeedSelect's schedule (its code sets param_group lr = lr / 10 before loop index 3):
    each row equals torch.optim with that change, rows stepping on their own counts."""
    spec = OptimizerSpec(name, lr=0.1, weight_decay=0.01, decay_at=3, decay=0.1)
    x0 = gauss(2, (5,), 1, torch.float64)
    grads = [gauss(2, (5,), 20 + t, torch.float64) for t in range(6)]
    opt = RowOptimizer(spec, x0)
    x = x0.clone()
    for t, g in enumerate(grads):
        rows = torch.tensor([0, 1] if t != 1 else [0])  # row 1 skips iteration 1
        x = opt.step(x, g[rows], rows)
    for i in range(2):
        p = x0[i].clone().requires_grad_(True)
        ref = (torch.optim.AdamW([p], lr=0.1, weight_decay=0.01) if name == "adamw" else
               torch.optim.SGD([p], lr=0.1, momentum=spec.momentum, nesterov=True,
                               weight_decay=0.01))
        k = 0
        for t, g in enumerate(grads):
            if i == 1 and t == 1:
                continue
            if k == 3:
                for group in ref.param_groups:
                    group["lr"] = 0.1 / 10
            p.grad = g[i].clone()
            ref.step()
            k += 1
        torch.testing.assert_close(x[i], p.detach(), rtol=1e-12, atol=1e-12)
    with pytest.raises(InputError, match="decay"):
        OptimizerSpec("adamw", decay_at=-1).check()
