"""``--height/--width`` on every command that renders or samples, ``--offload``, and
``sample --like FAMILY`` at a chosen size (issue 15 item 3)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from latentgeo.diffusion import load_model, render
from latentgeo.images import to_uint8
from latentgeo.io import load_latent, save_latent
from latentgeo.presets import FAMILY_SIZES, LATENT_SHAPES, latent_shape_like
from tests.conftest import assert_one_line_error
from tests.tiny_families import tiny_family_path
from tests.tiny_sd import tiny_sd_path


@pytest.mark.parametrize(("like", "height", "width", "shape"), [
    ("sd15", None, None, (4, 64, 64)), ("sd2", None, None, (4, 96, 96)),
    ("sdxl", None, None, (4, 128, 128)), ("sdxl", 832, 1216, (4, 104, 152)),
    ("sd3", 1024, 576, (16, 128, 72)), ("flux", 768, 1360, (16, 96, 170)),
    ("bundled", 32, None, (1, 32, 32)),
])
def test_sample_like_a_family_at_a_size(cli, tmp_path, like, height, width, shape):
    """The seed of a family at H x W pixels is (C, H/8, W/8): the VAE's 8x downsampling."""
    args = ["sample", "--like", like, "-o", tmp_path / "z.pt"]
    args += ["--height", str(height)] if height is not None else []
    args += ["--width", str(width)] if width is not None else []
    cli(*args)
    assert tuple(load_latent(tmp_path / "z.pt")[0].shape) == shape


def test_presets_at_default_size_are_the_documented_shapes():
    assert LATENT_SHAPES == {k: latent_shape_like(k) for k in FAMILY_SIZES}
    assert LATENT_SHAPES["flux"] == (16, 128, 128) and LATENT_SHAPES["bundled"] == (1, 32, 32)


@pytest.mark.parametrize(("args", "fragments"), [
    (["--like", "flux", "--height", "1000"], ["--height 1000", "multiple of 16"]),
    (["--like", "sdxl", "--width", "1001"], ["--width 1001", "multiple of 8"]),
    (["--like", "bundled", "--height", "64"], ["--height 64", "32x32"]),
    (["--shape", "4,8,8", "--width", "64"], ["--height/--width", "--like"]),
])
def test_sample_refuses_sizes_the_family_cannot_take(cli, tmp_path, args, fragments):
    r = cli("sample", *args, "-o", tmp_path / "z.pt", expect=None)
    assert_one_line_error(r, *fragments)
    assert not (tmp_path / "z.pt").exists()


def test_render_at_a_chosen_size_equals_the_library(cli, tmp_path):
    """``render --height 24 --width 16`` on a tiny SD pipeline: PNGs of that size, equal (to one
    8-bit level) to ``render`` of a backend loaded at that size, which test_families checks
    against StableDiffusionPipeline(height=24, width=16)."""
    b = load_model(str(tiny_sd_path()), height=24, width=16)
    z = torch.randn((1, *b.latent_shape), generator=torch.Generator().manual_seed(5))
    save_latent(tmp_path / "z.pt", z[0])
    cli("render", tmp_path / "z.pt", "-o", tmp_path / "out", "--model", tiny_sd_path(),
        "--prompt", "the dog", "--steps", "2", "--height", "24", "--width", "16")
    with Image.open(tmp_path / "out" / "z.png") as im:
        png = np.asarray(im.convert("RGB")).astype(int)
    ref = render(b, z, condition="the dog", steps=2)
    assert png.shape == (24, 16, 3)
    assert np.abs(png - to_uint8(ref[0]).astype(int)).max() <= 1


def test_seeds_of_another_size_are_refused_with_the_size(cli, tmp_path):
    """A seed sampled for the default size does not fit --height 24 --width 16: one line."""
    b = load_model(str(tiny_sd_path()))
    save_latent(tmp_path / "z.pt", torch.zeros(b.latent_shape).normal_())
    r = cli("render", tmp_path / "z.pt", "-o", tmp_path / "out", "--model", tiny_sd_path(),
            "--prompt", "x", "--steps", "1", "--height", "24", "--width", "16", expect=None)
    assert r.exit_code == 2 and "error:" in r.stderr
    assert not any((tmp_path / "out").glob("*.png")) if (tmp_path / "out").exists() else True


@pytest.mark.parametrize("command", ["interpolate", "centroid"])
def test_render_flag_of_geometry_commands_takes_the_size(cli, tmp_path, command):
    """``--render`` on interpolate/centroid loads the model at --height/--width (FLUX: 16s)."""
    path = tiny_family_path("flux-schnell")
    b = load_model(str(path), height=32, width=48)
    g = torch.Generator().manual_seed(0)
    for name in ("a", "b"):
        save_latent(tmp_path / f"{name}.pt", torch.randn(b.latent_shape, generator=g))
    extra = ["--points", "3"] if command == "interpolate" else ["-m", "normalized"]
    cli(command, tmp_path / "a.pt", tmp_path / "b.pt", *extra, "-o", tmp_path / "o.pt",
        "--render", tmp_path / "img", "--model", path, "--prompt", "a cat", "--steps", "1",
        "--height", "32", "--width", "48")
    pngs = sorted((tmp_path / "img").glob("*.png"))
    assert pngs
    with Image.open(pngs[0]) as im:
        assert im.size == (48, 32)


def test_offload_flag_reaches_the_loader(cli, tmp_path):
    """--offload on the CPU is refused by the loader with its one line (it needs a GPU)."""
    save_latent(tmp_path / "z.pt", torch.zeros(1, 32, 32).normal_())
    r = cli("render", tmp_path / "z.pt", "-o", tmp_path / "out", "--offload", expect=None)
    assert r.exit_code == 2 and "offload" in r.stderr.lower()
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
