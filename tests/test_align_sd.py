"""Soft tokens on tiny Stable Diffusion / SDXL pipelines: where the tokens go, training changes
the output, the file round-trips, another pipeline refuses it."""

from __future__ import annotations

import pytest
import torch

from latentgeo.align import attach, load_tokens, new_tokens, save_tokens, train_tokens
from latentgeo.diffusion import load_model, render
from latentgeo.errors import ModelError
from tests.tiny_families import tiny_family_path
from tests.tiny_sd import TINY_SD_IMAGE, TINY_SD_LATENT, tiny_pixel_path, tiny_sd_path

PROMPTS = ["the dog", "a red cat", "a photo of grass"]


@pytest.fixture(scope="module")
def sd():
    return load_model(str(tiny_sd_path()))


@pytest.fixture(scope="module")
def trained(sd):
    images = torch.rand(6, *TINY_SD_IMAGE, generator=torch.Generator().manual_seed(0))
    return train_tokens(sd, images, PROMPTS * 2, steps=3, batch_size=3, lr=0.05)


def contexts_seen(backend, tokens, condition, guidance=2.0):
    """encoder_hidden_states every cross-attention block of the UNet receives, by block."""
    seen: dict[str, torch.Tensor] = {}
    unet = backend.unet
    blocks = {f"down{i}": b for i, b in enumerate(unet.down_blocks)}
    blocks.update({"mid": unet.mid_block},
                  **{f"up{i}": b for i, b in enumerate(unet.up_blocks)})
    handles = []
    for name, block in blocks.items():
        if getattr(block, "has_cross_attention", False):
            def grab(m, args, kwargs, out, name=name):  # after every pre-hook, ours included
                seen[name] = kwargs["encoder_hidden_states"]
            handles.append(block.register_forward_hook(grab, with_kwargs=True))
    attach(backend, tokens)
    try:
        with torch.no_grad():
            backend.model_fn(condition, guidance)(torch.zeros(1, *backend.latent_shape),
                                                  torch.tensor(500))
    finally:
        attach(backend, None)
        for h in handles:
            h.remove()
    return seen


def test_tokens_go_after_bos_in_the_down_blocks_only(sd):
    tokens = new_tokens(sd, init_std=1.0, generator=torch.Generator().manual_seed(1))
    assert tokens.points == ("down",) and tokens.values.shape == (1, 4, 16)
    plain = contexts_seen(sd, None, "the dog")
    with_tokens = contexts_seen(sd, tokens, "the dog")
    for name, ctx in with_tokens.items():
        base = plain[name]
        if name.startswith("down"):
            assert ctx.shape[1] == base.shape[1] + 4
            torch.testing.assert_close(ctx[:, :1], base[:, :1])       # BOS kept first
            for row in ctx:                                           # both guidance halves
                torch.testing.assert_close(row[1:5], tokens.values[0])
            torch.testing.assert_close(ctx[:, 5:], base[:, 1:])       # the prompt follows
        else:
            torch.testing.assert_close(ctx, base)                     # up blocks untouched


def test_sdxl_tokens_go_to_down_and_mid_blocks():
    sdxl = load_model(str(tiny_family_path("sdxl")))
    tokens = new_tokens(sdxl, init_std=1.0, generator=torch.Generator().manual_seed(2))
    assert tokens.points == ("down", "mid")
    plain = contexts_seen(sdxl, None, "the dog")
    with_tokens = contexts_seen(sdxl, tokens, "the dog")
    grown = {n for n in with_tokens if with_tokens[n].shape[1] == plain[n].shape[1] + 4}
    assert "mid" in grown and any(n.startswith("down") for n in grown)
    assert not any(n.startswith("up") for n in grown)
    z = torch.randn(1, *sdxl.latent_shape, generator=torch.Generator().manual_seed(3))
    a = render(sdxl, z, "the dog", steps=2, guidance=2.0)
    attach(sdxl, tokens)
    try:
        b = render(sdxl, z, "the dog", steps=2, guidance=2.0)
    finally:
        attach(sdxl, None)
    assert not torch.equal(a, b)


def test_training_changes_the_output_and_only_the_tokens(sd, trained):
    assert trained.tokens.kind == "cross-attention" and len(trained.history) == 3
    assert all(not p.requires_grad for p in sd.unet.parameters())
    z = torch.randn(2, *TINY_SD_LATENT, generator=torch.Generator().manual_seed(4))
    plain = render(sd, z, "the dog", steps=3, guidance=1.0)
    attach(sd, trained.tokens)
    try:
        tok = render(sd, z, "the dog", steps=3, guidance=1.0)
    finally:
        attach(sd, None)
    assert (tok - plain).abs().max() > 1e-4


def test_file_round_trip_renders_the_same(sd, trained, tmp_path):
    path = save_tokens(tmp_path / "sd.safetensors", trained.tokens)
    back = load_tokens(path)
    assert back.meta["family"] == "sd" and back.meta["loss"] == "softrepa"
    assert back.points == ("down",) and back.meta["steps"] == "3"
    z = torch.randn(1, *TINY_SD_LATENT, generator=torch.Generator().manual_seed(5))
    attach(sd, trained.tokens)
    try:
        a = render(sd, z, "a red cat", steps=3, guidance=2.0)
        attach(sd, back)
        b = render(sd, z, "a red cat", steps=3, guidance=2.0)
    finally:
        attach(sd, None)
    assert torch.equal(a, b)


def test_other_pipelines_refuse_the_tokens(trained, tmp_path):
    path = save_tokens(tmp_path / "sd.safetensors", trained.tokens)
    tokens = load_tokens(path)
    for other in (load_model(str(tiny_family_path("sdxl"))), load_model(str(tiny_pixel_path()))):
        with pytest.raises(ModelError, match="trained for") as e:
            attach(other, tokens, str(path))
        assert "\n" not in str(e.value)


def test_agsm_trains_on_sd(sd):
    images = torch.rand(3, *TINY_SD_IMAGE, generator=torch.Generator().manual_seed(6))
    result = train_tokens(sd, images, PROMPTS, loss="agsm", steps=2, batch_size=3)
    assert result.negative is not None and result.tokens.meta["bank"] == "positive"
    assert not torch.equal(result.tokens.values, result.negative.values)


def test_flow_models_are_refused():
    sd3 = load_model(str(tiny_family_path("sd3")))
    with pytest.raises(ModelError, match="soft tokens"):
        new_tokens(sd3)
