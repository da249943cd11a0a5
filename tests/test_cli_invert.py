"""``latentgeo invert`` and ``invert_images`` on tiny pipelines: round trips, bad inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from latentgeo.io import load_latent
from tests.conftest import assert_one_line_error
from tests.tiny_sd import build_tiny_pixel, build_tiny_sd


def tame(unet_dir, factor=0.1):
    """Scale the UNet's output layer: the random tiny UNets have eps Jacobian gains ~10, far
    above a trained denoiser's (~1 / sqrt(1 - a_t) at most, ~1 typically), which makes the
    implicit inverse step ill-posed. Scaled by 0.1 their gain is ~1, like a real model."""
    from safetensors.torch import load_file, save_file

    f = next(unet_dir.glob("*.safetensors"))
    sd = load_file(str(f))
    for key in ("conv_out.weight", "conv_out.bias"):
        sd[key] = sd[key] * factor
    save_file(sd, str(f), metadata={"format": "pt"})


@pytest.fixture(scope="module")
def pixel_model(tmp_path_factory):
    path = build_tiny_pixel(tmp_path_factory.mktemp("models") / "pixel")
    tame(path / "unet")
    return path


@pytest.fixture(scope="module")
def sd_model(tmp_path_factory):
    path = build_tiny_sd(tmp_path_factory.mktemp("models") / "sd")
    tame(path / "unet")
    return path


def digit_png(path, size=16, seed=0, mode="L"):
    """A smooth blob on black, saved as an 8-bit (or other mode) PNG."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    cy, cx = rng.uniform(0.3, 0.7, 2)
    a = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 0.03)
    if mode == "I;16":
        Image.fromarray((a * 65535).astype(np.uint16)).save(path)
    elif mode == "RGBA":
        rgba = np.zeros((size, size, 4), dtype=np.uint8)
        rgba[..., :3] = 255
        rgba[..., 3] = (a * 255).astype(np.uint8)
        Image.fromarray(rgba, mode="RGBA").save(path)
    else:
        Image.fromarray((a * 255).astype(np.uint8), mode="L").convert(mode).save(path)
    return path


def test_invert_images_round_trips_tiny_sd(sd_model):
    """Tiny SD: VAE encode -> fixed-point inversion -> our DDIM sampler -> back to x0."""
    from latentgeo.diffusion import load_model
    from latentgeo.diffusion.inversion import check_roundtrip, invert_images

    backend = load_model(str(sd_model))
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, *backend_image_shape(backend), generator=g)
    fixed = invert_images(backend, images, condition="a dog", steps=5, fixed_point_iters=8)
    plain = invert_images(backend, images, condition="a dog", steps=5, fixed_point_iters=0)
    trip = check_roundtrip(backend, fixed.seeds, fixed.x0, images, "a dog", steps=5)
    trip0 = check_roundtrip(backend, plain.seeds, plain.x0, images, "a dog", steps=5)
    assert fixed.seeds.shape == (2, *backend.latent_shape)
    # Measured (5 steps, tol 1e-5 per step): fixed-point 2.5e-4 / 4.0e-4, plain 0.061 / 0.057.
    assert float(trip.latent_rmse.max()) < 1e-3, trip.latent_rmse
    assert float(trip.latent_rmse.max()) < 0.02 * float(trip0.latent_rmse.min())
    # Pixel PSNR is capped by the (random, untrained) VAE: compare with decode(encode(x)).
    cap = (backend.decode(fixed.x0) - images).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(10 * torch.log10(1 / cap.double()), trip.psnr, atol=0.05, rtol=0)
    # The renderer (latentgeo.diffusion.render) maps the seeds to the same images.
    from latentgeo.diffusion import render
    out = render(backend, fixed.seeds, condition="a dog", steps=5, guidance=1.0)
    torch.testing.assert_close(out, trip.images, atol=1e-5, rtol=0)


def backend_image_shape(backend):
    return (backend.image_channels, *backend.image_size)


def test_per_image_classes_equal_separate_calls(pixel_model):
    from latentgeo.diffusion import load_model
    from latentgeo.diffusion.inversion import invert_images

    backend = load_model(str(pixel_model))
    images = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    mixed = invert_images(backend, images, condition=[3, 5, 3], steps=5, fixed_point_iters=2)
    three = invert_images(backend, images[[0, 2]], condition=3, steps=5, fixed_point_iters=2)
    five = invert_images(backend, images[[1]], condition=5, steps=5, fixed_point_iters=2)
    torch.testing.assert_close(mixed.seeds[[0, 2]], three.seeds, atol=1e-6, rtol=0)
    torch.testing.assert_close(mixed.seeds[[1]], five.seeds, atol=1e-6, rtol=0)


def test_cli_invert_directory_glob_check_json(cli, pixel_model, tmp_path):
    src = tmp_path / "imgs"
    src.mkdir()
    for i in range(2):
        digit_png(src / f"d{i}.png", seed=i)
    digit_png(tmp_path / "extra.png", size=40, seed=5)  # resized to 16x16
    out = tmp_path / "seeds"
    r = cli("invert", str(src), str(tmp_path / "ex*.png"), "-o", f"{out}/", "--model",
            str(pixel_model), "--steps", "5", "--fixed-point", "4", "--check", "--json",
            "--class", "3")
    res = json.loads(r.stdout)
    assert [row["image"] for row in res["results"]] == [
        str(src / "d0.png"), str(src / "d1.png"), str(tmp_path / "extra.png")]
    assert res["method"] == "ddim-fixed-point-4" and res["skipped"] == []
    for row in res["results"]:
        assert row["latent_rmse"] < 1e-3 and row["psnr_db"] > 40
        assert row["nfe"] <= 5 * 5
    seed, meta = load_latent(out / "d0.safetensors")
    assert seed.shape == (1, 16, 16) and seed.dtype == torch.float32
    assert meta["source"] == str(src / "d0.png") and meta["class"] == "3"
    assert meta["steps"] == "5" and meta["method"] == "ddim-fixed-point-4"
    assert meta["model"] == str(pixel_model)
    # Refuses to overwrite without --force, and writes nothing new.
    r = cli("invert", str(src), "-o", f"{out}/", "--model", str(pixel_model), "--steps", "2",
            expect=None)
    assert_one_line_error(r, "d0.safetensors", "--force")


def test_cli_invert_to_one_batch_file_pt(cli, pixel_model, tmp_path):
    a, b = digit_png(tmp_path / "a.png", seed=1), digit_png(tmp_path / "b.png", seed=2)
    r = cli("invert", str(a), str(b), "-o", str(tmp_path / "s.pt"), "--model",
            str(pixel_model), "--steps", "3", "--fixed-point", "0")
    assert "ddim" in r.stdout
    seeds, meta = load_latent(tmp_path / "s.pt")
    assert seeds.shape == (2, 1, 16, 16)
    assert json.loads(meta["source"]) == [str(a), str(b)] and meta["method"] == "ddim"


def test_cli_bad_inputs_skipped_good_ones_written(cli, pixel_model, tmp_path):
    good = digit_png(tmp_path / "good.png")
    deep = digit_png(tmp_path / "deep16.png", mode="I;16")
    rgba = digit_png(tmp_path / "alpha.png", mode="RGBA")
    text = tmp_path / "notes.png"
    text.write_text("this is not an image\n")
    tiny = tmp_path / "tiny.png"
    Image.fromarray(np.full((1, 1), 200, np.uint8)).save(tiny)
    missing = tmp_path / "missing.png"
    out = tmp_path / "seeds"
    r = cli("invert", good, deep, rgba, text, tiny, missing, "-o", f"{out}/", "--model",
            str(pixel_model), "--steps", "3", "--json", expect=2)
    res = json.loads(r.stdout)
    assert [row["image"] for row in res["results"]] == [str(good), str(deep), str(rgba)]
    assert sorted(p.name for p in out.iterdir()) == [
        "alpha.safetensors", "deep16.safetensors", "good.safetensors",
        "manifest-00000-of-00001.jsonl"]  # no temp files left
    from latentgeo.jobs import merge_manifests

    summary = merge_manifests(out)  # the two unreadable images are the manifest's failures
    assert sorted(r["input"] for r in summary.failed) == sorted([str(text), str(tiny)])
    err = r.stderr
    for bad in (text, tiny, missing):
        assert str(bad) in err
    assert "not an image" in err and "1x1" in err and "no such file" in err
    assert err.strip().splitlines()[-1].startswith("error: 3 input(s) skipped")
    # 16-bit and RGBA inputs were converted, not clipped: 16-bit equals its 8-bit twin closely,
    # RGBA (white ink, alpha = digit) composites onto black, equal to the grey digit.
    from latentgeo.images import load_image
    g = load_image(good, 16, 1)
    assert (load_image(deep, 16, 1) - g).abs().max() < 3 / 255
    assert (load_image(rgba, 16, 1) - g).abs().max() < 3 / 255


def test_cli_single_bad_input_is_one_line_error(cli, pixel_model, tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("hello")
    out = tmp_path / "seeds"
    r = cli("invert", text, "-o", f"{out}/", "--model", str(pixel_model), expect=None)
    assert_one_line_error(r, "notes.png", "not an image")
    assert not out.exists()
    r = cli("invert", str(tmp_path / "nope*.png"), "-o", f"{out}/", "--model",
            str(pixel_model), expect=None)
    assert_one_line_error(r, "nope*.png", "no files match")
    r = cli("invert", text, tmp_path / "gone.png", "-o", f"{out}/", "--model",
            str(pixel_model), expect=None)
    assert r.exit_code == 2 and "none of the 2 input(s)" in r.stderr.splitlines()[-1]
    assert not out.exists()


def test_cli_wrong_condition_for_model(cli, pixel_model, tmp_path):
    good = digit_png(tmp_path / "good.png")
    r = cli("invert", good, "-o", f"{tmp_path}/s/", "--model", str(pixel_model), "--prompt",
            "a cat", expect=None)
    assert_one_line_error(r, "--prompt")
    r = cli("invert", good, "-o", f"{tmp_path}/s/", "--model", str(pixel_model), "--format",
            "npy", expect=None)
    assert_one_line_error(r, "--format")
