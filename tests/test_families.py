"""SDXL, SD3 and FLUX.1 (dev and schnell) through latentgeo, proven equal to diffusers' own
pipelines on tiny pipelines built offline (tests/tiny_families.py), saved and reloaded.

References, for the same seed: SDXL = ``StableDiffusionXLPipeline`` with
``DDIMScheduler.from_config(pipe.scheduler.config)``, eta 0; SD3 and FLUX = the pipeline
unchanged, FLUX called with the packed seed. Inversion is measured in float64.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from latentgeo.diffusion import load_model, render
from latentgeo.diffusion.inversion import invert, latent_rmse
from latentgeo.diffusion.sampler import sample
from latentgeo.errors import InputError, ModelError
from latentgeo.images import to_uint8
from latentgeo.io import save_latent
from tests.conftest import assert_one_line_error
from tests.tiny_families import TINY_LATENT, TINY_SIDE, tame_family_path, tiny_family_path
from tests.tiny_sd import tiny_pixel_path, tiny_sd_path

FAMILIES = ("sdxl", "sd3", "flux-dev", "flux-schnell")
CLASSES = {"sdxl": ("sdxl", "StableDiffusionXLPipeline"),
           "sd3": ("sd3", "StableDiffusion3Pipeline"),
           "flux-dev": ("flux", "FluxPipeline"), "flux-schnell": ("flux", "FluxPipeline")}
#: Guidance of the reference renders: CFG 3 for SDXL and SD3 (two network halves), the
#: embedded guidance 4 for FLUX.1-dev, none for schnell.
GUIDANCE = {"sdxl": 3.0, "sd3": 3.0, "flux-dev": 4.0, "flux-schnell": None}
#: Default seed shapes: sample_size * 2 pixels for SDXL/SD3; FluxPipeline's fixed 128 cells.
DEFAULT_LATENT = {"sdxl": TINY_LATENT, "sd3": TINY_LATENT, "flux-dev": (4, 128, 128),
                  "flux-schnell": (4, 128, 128)}
PROMPTS = ["the dog", "a red cat"]
_PIPES: dict[str, object] = {}


def seeds(shape, n=2, seed=0, dtype=torch.float32):
    return torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed), dtype=dtype)


def pipeline(family):
    """The diffusers pipeline of a tiny family folder (SDXL with DDIM from its config)."""
    if family not in _PIPES:
        from diffusers import DDIMScheduler, DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(str(tiny_family_path(family)),
                                                 local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        if family == "sdxl":
            pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        _PIPES[family] = pipe
    return _PIPES[family]


def reference(family, z, prompts, steps, guidance, side=TINY_SIDE, pipe=None):
    """Images (B, 3, side, side) from the family's own pipeline for unpacked seeds z."""
    from latentgeo.diffusion.backends.flux import pack

    pipe = pipe or pipeline(family)
    kw = {"num_inference_steps": steps, "output_type": "pt", "height": side, "width": side}
    if family == "sdxl":
        kw["eta"] = 0.0
    if guidance is not None:
        kw["guidance_scale"] = guidance
    if isinstance(prompts, str):
        kw["num_images_per_prompt"] = z.shape[0]
    latents = pack(z) if family.startswith("flux") else z
    with torch.no_grad():
        return pipe(prompts, latents=latents.clone(), **kw).images.float()


@pytest.mark.parametrize("name", FAMILIES)
def test_loads_with_default_and_chosen_sizes(name):
    path = str(tiny_family_path(name))
    b = load_model(path)
    assert (b.family, b.pipeline_class) == CLASSES[name] and b.conditioning == "text"
    assert b.latent_shape == DEFAULT_LATENT[name]
    assert b.image_size == (DEFAULT_LATENT[name][1] * 2, DEFAULT_LATENT[name][2] * 2)
    b = load_model(path, height=32, width=16)
    assert b.latent_shape == (4, 16, 8) and b.image_size == (32, 16)
    assert len(b.fingerprint()) == 16


@pytest.mark.parametrize("name", FAMILIES)
def test_render_equals_the_diffusers_pipeline(name):
    """render(seed) == the pipeline called with latents=seed, two prompts, 3 steps, <= 1e-4."""
    b = load_model(str(tiny_family_path(name)), height=TINY_SIDE, width=TINY_SIDE)
    z = seeds(TINY_LATENT)
    ours = render(b, z, condition=PROMPTS, steps=3, guidance=GUIDANCE[name])
    ref = reference(name, z, PROMPTS, 3, GUIDANCE[name])
    assert ours.shape == ref.shape == (2, 3, TINY_SIDE, TINY_SIDE)
    assert float((ours - ref).abs().max()) <= 1e-4
    assert float((ours[0] - ours[1]).abs().max()) > 1e-3   # the prompts matter


@pytest.mark.parametrize("name", FAMILIES)
def test_cli_render_at_the_default_size_equals_the_pipeline(name, cli, tmp_path):
    """``latentgeo render --model PATH`` at the pipeline's default size; PNGs are 8-bit, so the
    comparison is to the reference quantised the same way (at most one level apart)."""
    shape = DEFAULT_LATENT[name]
    steps = 1 if name.startswith("flux") else 2
    z = seeds(shape, n=1, seed=3)
    save_latent(tmp_path / "z.pt", z[0])
    args = ["render", tmp_path / "z.pt", "-o", tmp_path / "out", "--model",
            tiny_family_path(name), "--prompt", "the dog", "--steps", str(steps)]
    if GUIDANCE[name] is not None:
        args += ["--guidance", str(GUIDANCE[name])]
    cli(*args)
    with Image.open(tmp_path / "out" / "z.png") as im:
        png = np.asarray(im.convert("RGB")).astype(int)
    ref = reference(name, z, "the dog", steps, GUIDANCE[name], side=shape[1] * 2)
    assert png.shape == (shape[1] * 2, shape[2] * 2, 3)
    assert np.abs(png - to_uint8(ref[0]).astype(int)).max() <= 1


def test_sdxl_negative_half_follows_force_zeros_for_empty_prompt():
    """With force_zeros_for_empty_prompt the CFG negative is zeros, else the empty prompt;
    both equal the pipeline, and they differ from each other."""
    from latentgeo.diffusion.backends.sdxl import sdxl_backend

    pipe = pipeline("sdxl")
    z = seeds(TINY_LATENT, seed=5)
    outs = []
    for zeros in (True, False):
        pipe.register_to_config(force_zeros_for_empty_prompt=zeros)
        b = sdxl_backend(pipe, "tiny-sdxl", torch.device("cpu"), torch.float32)
        assert b.force_zeros_for_empty_prompt is zeros
        outs.append(render(b, z, condition="the dog", steps=2, guidance=4.0))
        ref = reference("sdxl", z, "the dog", 2, 4.0, pipe=pipe)
        assert float((outs[-1] - ref).abs().max()) <= 1e-4
    pipe.register_to_config(force_zeros_for_empty_prompt=True)
    assert float((outs[0] - outs[1]).abs().max()) > 1e-4


def test_sd3_dynamic_shifting_uses_the_pipelines_mu():
    """A scheduler config with use_dynamic_shifting: mu from the image sequence length, as
    StableDiffusion3Pipeline computes it (its max_shift default 1.16)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from latentgeo.diffusion.backends.sd3 import sd3_backend

    pipe = pipeline("sd3")
    plain = pipe.scheduler
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(plain.config,
                                                                 use_dynamic_shifting=True)
    try:
        b = sd3_backend(pipe, "tiny-sd3", torch.device("cpu"), torch.float32)
        z = seeds(TINY_LATENT, seed=6)
        ours = render(b, z, condition="the dog", steps=3, guidance=2.0)
        ref = reference("sd3", z, "the dog", 3, 2.0, pipe=pipe)
        assert float((ours - ref).abs().max()) <= 1e-4
        static = sd3_backend(pipe.__class__(**{**pipe.components, "scheduler": plain}),
                             "tiny-sd3", torch.device("cpu"), torch.float32)
        assert b.grid(3).src != static.grid(3).src
    finally:
        pipe.scheduler = plain


def test_sd_renders_at_a_chosen_size_like_its_pipeline():
    """SD 1.x/2.x: height/width other than the default, equal to StableDiffusionPipeline's."""
    from diffusers import StableDiffusionPipeline

    b = load_model(str(tiny_sd_path()), height=24, width=16)
    assert b.latent_shape == (4, 12, 8) and b.image_size == (24, 16)
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd_path()), local_files_only=True,
                                                   safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    z = seeds(b.latent_shape, seed=4)
    ours = render(b, z, condition="the dog", steps=2, guidance=3.0)
    ref = pipe("the dog", latents=z.clone(), num_inference_steps=2, guidance_scale=3.0,
               num_images_per_prompt=2, eta=0.0, output_type="pt", height=24, width=16).images
    assert float((ours - ref).abs().max()) <= 1e-4


@pytest.mark.parametrize("name", FAMILIES)
def test_fixed_point_inversion_beats_plain_in_float64(name):
    """Round trip x0 -> seed -> sample(seed) in float64, 4 steps: fixed-point inversion's
    latent error >= 10x smaller than plain inversion's. The random tiny SDXL UNet's gain is
    far above a trained one's, so its output layer is scaled by 0.1 (tests/tiny_families.py,
    ``tame``); the SD3 and FLUX transformers invert as built. Measured (RMS, 2 images):
    SDXL 1.9e-4 vs 0.058, SD3 2.2e-6 vs 0.14, FLUX-dev 3.9e-5 vs 0.19, schnell 3.4e-5 vs
    0.21."""
    path = tame_family_path(name) if name == "sdxl" else tiny_family_path(name)
    b = load_model(str(path), dtype="float64", height=TINY_SIDE, width=TINY_SIDE)
    if hasattr(b, "max_sequence_length"):
        b.max_sequence_length = 32    # a shorter T5 context keeps the test fast
    images = torch.rand((2, 3, TINY_SIDE, TINY_SIDE), generator=torch.Generator().manual_seed(1))
    x0 = b.encode(images).double()
    model = b.model_fn("the dog", 1.0 if name in ("sdxl", "sd3") else None)
    grid = b.grid(4)
    fixed = invert(model, x0, grid, fixed_point_iters=10)
    plain = invert(model, x0, grid, fixed_point_iters=0)
    with torch.no_grad():
        err_fixed = latent_rmse(sample(model, fixed, grid), x0)
        err_plain = latent_rmse(sample(model, plain, grid), x0)
    assert fixed.dtype == torch.float64
    assert float(err_plain.min()) > 1e-3                  # plain inversion really drifts
    assert float((err_fixed * 10).max()) < float(err_plain.min()), (err_fixed, err_plain)


@pytest.mark.parametrize("name", ["sdxl", "sd3",
                                  pytest.param("flux-dev", marks=pytest.mark.slow)])
def test_cli_interpolate_and_centroid_render(name, cli, tmp_path):
    """``interpolate --render`` and ``centroid --render`` with --model PATH (default size;
    FLUX's is 256 pixels here, and quantising its GIF frames takes most of that test)."""
    shape = DEFAULT_LATENT[name]
    a, b = seeds(shape, n=2, seed=7)
    save_latent(tmp_path / "a.pt", a)
    save_latent(tmp_path / "b.pt", b)
    model = ["--model", tiny_family_path(name), "--prompt", "the dog", "--steps", "1"]
    cli("interpolate", tmp_path / "a.pt", tmp_path / "b.pt", "-o", tmp_path / "path.pt",
        "--method", "slerp", "--points", "3", "--render", tmp_path / "ri", *model)
    for f in ("step000.png", "step002.png", "strip.png", "path.gif"):
        assert (tmp_path / "ri" / f).is_file(), f
    r = cli("centroid", tmp_path / "a.pt", tmp_path / "b.pt", "-o", tmp_path / "c.pt",
            "--method", "normalized", "--render", tmp_path / "rc", "--json", *model)
    assert json.loads(r.stdout)["render"]["grid"].endswith("grid.png")
    with Image.open(tmp_path / "rc" / "centroid.png") as im:
        assert im.size == (shape[2] * 2, shape[1] * 2) and im.mode == "RGB"


# -- sizes, refusals, offload ----------------------------------------------------------------
@pytest.mark.parametrize("name, height, width, fragment", [
    ("sdxl", 15, None, "height 15: "),          # the tiny VAE's scale factor is 2
    ("sd3", 16, 18, "width 18: "),              # 2 (VAE) x 2 (patch)
    ("flux-dev", 18, 16, "height 18: "),        # 2 (VAE) x 2 (packing)
    ("sd3", 80, 16, "at most 64"),              # pos_embed_max_size 16 x 2 x 2
])
def test_sizes_are_checked_per_family(name, height, width, fragment):
    with pytest.raises(InputError, match=fragment) as e:
        load_model(str(tiny_family_path(name)), height=height, width=width)
    assert "--" not in str(e.value)


def test_pixel_models_render_only_at_their_trained_size():
    assert load_model(str(tiny_pixel_path()), height=16, width=16).latent_shape == (1, 16, 16)
    with pytest.raises(InputError, match="height 32: .* trained at 16x16") as e:
        load_model(str(tiny_pixel_path()), height=32)
    assert "--" not in str(e.value)
    with pytest.raises(InputError, match="width 13: .*multiple of 2"):   # SD: the VAE's factor
        load_model(str(tiny_sd_path()), height=12, width=13)


def test_offload_is_refused_clearly_where_it_cannot_work(monkeypatch):
    from latentgeo.diffusion import loading

    monkeypatch.setattr(loading, "accelerate_available", lambda: False)
    with pytest.raises(ModelError, match="accelerate"):
        load_model(str(tiny_sd_path()), offload=True)
    monkeypatch.setattr(loading, "accelerate_available", lambda: True)
    with pytest.raises(ModelError, match="device cpu"):
        load_model(str(tiny_sd_path()), "cpu", offload=True)
    monkeypatch.setattr(loading, "check_offload", lambda spec, dev: None)
    with pytest.raises(ModelError, match="one small UNet"):
        load_model(str(tiny_pixel_path()), offload=True)


def test_offload_leaves_networks_on_the_cpu_and_hands_over_to_diffusers(monkeypatch):
    """The loader's side of offload: networks stay on the CPU in the requested dtype and the
    pipeline's ``enable_model_cpu_offload`` gets the device (the hooks themselves are
    accelerate's; they run on GPU machines only)."""
    from diffusers import StableDiffusionXLPipeline

    from latentgeo.diffusion import loading

    calls = []
    monkeypatch.setattr(loading, "check_offload", lambda spec, dev: None)
    monkeypatch.setattr(StableDiffusionXLPipeline, "enable_model_cpu_offload",
                        lambda self, device=None: calls.append(device))
    b = load_model(str(tiny_family_path("sdxl")), dtype="bfloat16", offload=True)
    assert calls == [torch.device("cpu")]
    assert b.unet.dtype == torch.bfloat16 and b.unet.device.type == "cpu"


def test_refused_pipeline_classes_name_the_reason(tmp_path):
    for cls, reason in (("FluxFillPipeline", "384 input channels"),
                        ("StableDiffusionXLImg2ImgPipeline", "refiner"),
                        ("StableDiffusionXLInpaintPipeline", "9 input channels")):
        (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": cls}))
        with pytest.raises(ModelError, match=reason):
            load_model(str(tmp_path))


def test_mis_shaped_networks_are_refused_not_run():
    """An SDXL UNet whose added embedding does not take the six time ids (a refiner's), and a
    FLUX transformer with extra input channels (Fill/Control), are refused by name."""
    from latentgeo.diffusion.backends.flux import flux_backend
    from latentgeo.diffusion.backends.sdxl import sdxl_backend

    cpu = torch.device("cpu")
    pipe = pipeline("sdxl")
    pipe.unet.register_to_config(addition_time_embed_dim=5)
    try:
        with pytest.raises(ModelError, match="refiner"):
            sdxl_backend(pipe, "x", cpu, torch.float32)
    finally:
        pipe.unet.register_to_config(addition_time_embed_dim=4)
    flux = pipeline("flux-schnell")
    flux.transformer.register_to_config(out_channels=8)
    try:
        with pytest.raises(ModelError, match="Fill/Control"):
            flux_backend(flux, "x", cpu, torch.float32)
    finally:
        flux.transformer.register_to_config(out_channels=None)


def test_flux_packing_is_the_pipelines_and_invertible():
    from diffusers import FluxPipeline

    from latentgeo.diffusion.backends.flux import pack, patch_ids, unpack

    z = seeds((4, 6, 10), n=3)
    p = pack(z)
    assert torch.equal(p, FluxPipeline._pack_latents(z, 3, 4, 6, 10))
    assert torch.equal(unpack(p, 6, 10), z)
    assert torch.equal(unpack(p, 6, 10), FluxPipeline._unpack_latents(p, 6, 10, 1))
    ids = FluxPipeline._prepare_latent_image_ids(1, 3, 5, torch.device("cpu"), torch.float32)
    assert torch.equal(patch_ids(3, 5, torch.device("cpu"), torch.float32), ids)


def test_flux_guidance_semantics():
    """dev: the embedded guidance applies with or without a prompt (one network call);
    schnell: no guidance input, so only 1 (or nothing) is accepted."""
    dev = load_model(str(tiny_family_path("flux-dev")), height=TINY_SIDE, width=TINY_SIDE)
    schnell = load_model(str(tiny_family_path("flux-schnell")), height=TINY_SIDE,
                         width=TINY_SIDE)
    assert (dev.default_guidance, dev.default_steps) == (3.5, 28)
    assert (schnell.default_guidance, schnell.default_steps) == (1.0, 4)
    z = seeds(TINY_LATENT, n=1)
    t = dev.grid(4).timesteps[1]
    assert not torch.allclose(dev.model_fn(None, 2.0)(z, t), dev.model_fn(None, 5.0)(z, t))
    assert torch.equal(schnell.model_fn("a", 1.0)(z, t), schnell.model_fn("a")(z, t))
    with pytest.raises(InputError, match="guidance 3.5: .*no guidance input") as e:
        schnell.model_fn("a", 3.5)
    assert "--" not in str(e.value)


def test_sample_like_presets_cover_the_families(cli, tmp_path):
    from latentgeo.io import load_latent

    for like, shape in (("sdxl", (4, 128, 128)), ("sd3", (16, 128, 128)),
                        ("flux", (16, 128, 128))):
        cli("sample", "--like", like, "-o", tmp_path / f"{like}.pt")
        assert tuple(load_latent(tmp_path / f"{like}.pt")[0].shape) == shape
    r = cli("sample", "--like", "nope", "-o", tmp_path / "z.pt", expect=None)
    assert_one_line_error(r, "flux")


def test_gpu_benchmark_skips_cleanly_and_measures_a_local_folder(tmp_path, capsys):
    """benchmarks/gpu_families.py: an id that is not cached is listed as skipped; a local
    pipeline folder is measured (here the tiny SD3 on the CPU in float32: equal to the
    pipeline, fixed-point inversion well ahead of plain)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "gpu_families", Path(__file__).parents[1] / "benchmarks" / "gpu_families.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.main(["--model", "no-such-org/no-such-model-latentgeo", "--device", "cuda"])
    assert rows[0]["status"].startswith("skipped: ")
    rows = bench.main(["--model", str(tiny_family_path("sd3")), "--device", "cpu", "--dtype",
                       "float32", "--size", "16", "--steps", "3", "--json",
                       str(tmp_path / "rows.json")])
    row = json.loads((tmp_path / "rows.json").read_text())[0]
    assert rows[0]["status"] == row["status"] == "ok" and row["family"] == "sd3"
    assert row["max_abs_diff"] <= 1e-4 and row["ratio"] >= 10
    assert "1 model(s) measured, 0 skipped" in capsys.readouterr().out
