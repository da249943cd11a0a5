"""The rendering backend: loading, DDIM grid, guidance, shapes, errors (tiny models, CPU)."""

from __future__ import annotations

import json

import pytest
import torch

from latentgeo.backend import (
    bundled_path,
    eps_from_prediction,
    load_model,
    parse_device,
    parse_dtype,
    render,
)
from latentgeo.errors import InputError, ModelError, ShapeError
from tests.tiny_sd import TINY_PIXEL_LATENT, tiny_pixel_path


@pytest.fixture(scope="module")
def pix():
    return load_model(str(tiny_pixel_path()))


def seeds(n, shape, seed=0):
    return torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed))


def test_pixel_model_metadata(pix):
    assert pix.kind == "bundled"
    assert pix.latent_shape == TINY_PIXEL_LATENT
    assert pix.image_size == TINY_PIXEL_LATENT[1:] and pix.image_channels == 1
    assert (pix.num_classes, pix.null_class) == (10, 10)
    assert (pix.default_guidance, pix.default_steps) == (2.0, 10)
    ts, alphas, final = pix.timesteps(10)
    assert ts == sorted(ts, reverse=True) and len(ts) == 10
    assert alphas.dtype == torch.float64 and final == 1.0


def test_render_is_deterministic_bit_for_bit(pix):
    z = seeds(3, pix.latent_shape)
    a = render(pix, z, condition=[1, 2, 3], steps=3)
    b = render(pix, z.clone(), condition=[1, 2, 3], steps=3)
    assert a.shape == (3, *TINY_PIXEL_LATENT) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert 0.0 <= a.min() and a.max() <= 1.0


def test_batching_changes_only_rounding(pix):
    z = seeds(4, pix.latent_shape, seed=1)
    whole = render(pix, z, condition=5, steps=3, guidance=1.0)
    chunks = render(pix, z, condition=5, steps=3, guidance=1.0, batch_size=3)
    torch.testing.assert_close(whole, chunks, atol=1e-4, rtol=0)


def test_matches_diffusers_ddim_scheduler_loop(pix):
    """Our sampler == diffusers' DDIMScheduler.step loop (eta = 0) on the same network."""
    from diffusers import DDIMScheduler

    z = seeds(2, pix.latent_shape, seed=2)
    sched = DDIMScheduler.from_config(pix.scheduler.config)
    sched.set_timesteps(3)
    x = z.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            eps = pix.unet(x, t, class_labels=torch.full((2,), 10)).sample
            x = sched.step(eps, t, x, eta=0.0).prev_sample
    ref = ((x + 1) / 2).clamp(0, 1)
    torch.testing.assert_close(render(pix, z, condition=None, steps=3), ref, atol=1e-4, rtol=0)


def test_classifier_free_guidance_formula(pix):
    z = seeds(2, pix.latent_shape, seed=3)
    t = pix.timesteps(10)[0][3]
    g = 3.5
    guided = pix.noise_fn(7, g)(z, t)
    cond = pix.noise_fn(7, 1.0)(z, t)
    uncond = pix.noise_fn(None, 1.0)(z, t)
    torch.testing.assert_close(guided, uncond + g * (cond - uncond), atol=1e-5, rtol=1e-5)
    # None means the null class: guidance has nothing to amplify.
    torch.testing.assert_close(pix.noise_fn(None, g)(z, t), uncond)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_eps_from_prediction_closed_form(kind):
    gen = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 4, generator=gen), torch.randn(2, 4, generator=gen)
    a = 0.37
    x_t = a ** 0.5 * x0 + (1 - a) ** 0.5 * eps
    out = {"epsilon": eps, "v_prediction": a ** 0.5 * eps - (1 - a) ** 0.5 * x0,
           "sample": x0}[kind]
    torch.testing.assert_close(eps_from_prediction(out, x_t, a, kind), eps)


def test_encode_decode_pixel_roundtrip(pix):
    img = torch.rand((2, *TINY_PIXEL_LATENT), generator=torch.Generator().manual_seed(0))
    x0 = pix.encode(img)
    torch.testing.assert_close(x0, img * 2 - 1)
    torch.testing.assert_close(pix.decode(x0), img)
    with pytest.raises(ShapeError, match=r"\(2, 3, 16, 16\).*\(B, 1, 16, 16\)"):
        pix.encode(torch.rand(2, 3, 16, 16))


def test_wrong_seed_shape_names_both_shapes(pix):
    with pytest.raises(ShapeError, match=r"\(2, 4, 8, 8\).*\(1, 16, 16\)"):
        render(pix, torch.randn(2, 4, 8, 8))
    # One unbatched seed is accepted.
    assert render(pix, torch.randn(*TINY_PIXEL_LATENT), steps=2).shape == (1, 1, 16, 16)


def test_condition_errors(pix):
    with pytest.raises(InputError, match="--prompt"):
        render(pix, seeds(1, pix.latent_shape), condition="a dog", steps=2)
    with pytest.raises(InputError, match="0..9"):
        render(pix, seeds(1, pix.latent_shape), condition=10, steps=2)
    with pytest.raises(ShapeError):
        render(pix, seeds(2, pix.latent_shape), condition=[1], steps=2)
    with pytest.raises(InputError, match="steps"):
        pix.timesteps(0)


def test_unknown_model_id_fails_fast_offline():
    with pytest.raises(ModelError, match="no-such-org/no-such-model"):
        load_model("no-such-org/no-such-model-latentgeo")


def test_bad_model_paths(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(ModelError, match="is a file"):
        load_model(str(f))
    with pytest.raises(ModelError, match="model_index.json"):
        load_model(str(tmp_path))
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(ModelError, match="FluxPipeline"):
        load_model(str(tmp_path))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_device_is_a_model_error():
    with pytest.raises(ModelError, match="CUDA is not available"):
        parse_device("cuda")
    with pytest.raises(ModelError, match="unknown device"):
        parse_device("gpu0")


def test_parse_dtype():
    assert parse_dtype("fp16") is torch.float16 and parse_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(ModelError, match="float64x"):
        parse_dtype("float64x")


def test_bfloat16_network_keeps_float32_latents():
    b = load_model(str(tiny_pixel_path()), dtype="bfloat16")
    z = seeds(2, b.latent_shape, seed=4)
    eps = b.noise_fn(3, 2.0)(z, 500)
    assert eps.dtype == torch.float32 and torch.isfinite(eps).all()


@pytest.mark.skipif(not (bundled_path() / "latentgeo.json").is_file(),
                    reason="bundled weights not committed yet")
def test_bundled_model_renders_digits():
    b = load_model("bundled")
    assert b.kind == "bundled" and b.latent_shape == (1, 32, 32)
    assert b.num_classes == 10 and b.null_class == 10
    z = seeds(2, b.latent_shape, seed=5)
    a = render(b, z, condition=[3, 8], steps=3)
    assert a.shape == (2, 1, 32, 32)
    assert torch.equal(a, render(b, z, condition=[3, 8], steps=3))
