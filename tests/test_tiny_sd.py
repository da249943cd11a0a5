"""A tiny Stable Diffusion pipeline (built in a temp dir, reloaded with from_pretrained)
rendered through the same backend and the same ``latentgeo render`` command."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from latentgeo.diffusion import load_model, render
from latentgeo.io import save_latent
from tests.conftest import assert_one_line_error
from tests.tiny_sd import TINY_SD_IMAGE, TINY_SD_LATENT, tiny_sd_path


@pytest.fixture(scope="module")
def sd():
    return load_model(str(tiny_sd_path()))


def test_loads_as_sd_kind(sd):
    assert sd.kind == "sd" and sd.pipeline_class == "StableDiffusionPipeline"
    assert sd.latent_shape == TINY_SD_LATENT
    assert (sd.image_channels, *sd.image_size) == TINY_SD_IMAGE
    assert type(sd.scheduler).__name__ == "DDIMScheduler"


def test_render_matches_the_diffusers_pipeline(sd):
    """Our loop over the pipeline's parts == pipe(prompt, latents=seed) with DDIM, eta = 0."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd_path()), local_files_only=True,
                                                   safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    z = torch.randn((2, *TINY_SD_LATENT), generator=torch.Generator().manual_seed(0))
    ours = render(sd, z, condition="the dog", steps=3, guidance=3.0)
    ref = pipe("the dog", latents=z.clone(), num_inference_steps=3, guidance_scale=3.0,
               num_images_per_prompt=2, eta=0.0, output_type="pt").images
    torch.testing.assert_close(ours, ref.float(), atol=1e-4, rtol=0)
    assert torch.equal(ours, render(sd, z, condition="the dog", steps=3, guidance=3.0))


def test_encode_is_deterministic_vae_mean(sd):
    img = torch.rand((1, *TINY_SD_IMAGE), generator=torch.Generator().manual_seed(1))
    a, b = sd.encode(img), sd.encode(img)
    assert a.shape == (1, *TINY_SD_LATENT) and torch.equal(a, b)
    assert sd.decode(a).shape == (1, *TINY_SD_IMAGE)


def test_cli_render_with_model_path(cli, tmp_path):
    z = torch.randn((2, *TINY_SD_LATENT), generator=torch.Generator().manual_seed(2))
    save_latent(tmp_path / "z.pt", z)
    out = tmp_path / "out"
    cli("render", tmp_path / "z.pt", "-o", out, "--model", tiny_sd_path(), "--prompt",
        "the dog", "--steps", "2", "--grid")
    with Image.open(out / "z_000.png") as im:
        assert im.mode == "RGB" and im.size == TINY_SD_IMAGE[1:]
    assert (out / "grid.png").exists()
    r = cli("render", tmp_path / "z.pt", "-o", tmp_path / "o2", "--model", tiny_sd_path(),
            "--class", "3", expect=2)
    assert_one_line_error(r, "--prompt", "not --class")
