"""Tiny SDXL, SD3 and FLUX.1 pipelines built from scratch in a temp dir (no network), for tests.

Each builder makes the family's diffusers pipeline from tiny configs of its real classes (the
sizes of diffusers' own fast tests, shrunk), with tokenizers written here: CLIP BPE from
vocab.json/merges.txt (:func:`tests.tiny_sd.write_tiny_clip_vocab`) and T5 from a ``tokenizers``
Unigram model (:func:`tiny_t5_tokenizer`), then saves it with ``save_pretrained``. Weights are
random, fixed by ``torch.manual_seed(0)``. Every VAE has two blocks, so its scale factor is 2
(the real models' is 8), and 4 latent channels (the real SD3/FLUX have 16).

``tame``: a random tiny UNet has an output Jacobian gain far above a trained denoiser's, which
makes the implicit inverse step ill-posed; the SDXL inversion test scales its output layer by
0.1 (as tests/test_cli_invert.py does for the tiny UNets) and says so. The SD3 and FLUX
transformers invert as built.

============  ==============================  =========================  ==================
family        pipeline                        seed (C, h, w)             image
============  ==============================  =========================  ==================
sdxl          StableDiffusionXLPipeline       (4, 8, 8)                  (3, 16, 16)
sd3           StableDiffusion3Pipeline        (4, 8, 8) (patch 2)        (3, 16, 16)
flux-dev      FluxPipeline (guidance_embeds)  (4, 8, 8) -> 16 tokens     (3, 16, 16) (*)
flux-schnell  FluxPipeline                    (4, 8, 8) -> 16 tokens     (3, 16, 16) (*)
============  ==============================  =========================  ==================

(*) FluxPipeline's default size is fixed at 128 latent cells per side (256 pixels here); the
tests pass height = width = 16 where they can.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tests.tiny_sd import _cached, write_tiny_clip_vocab

TINY_LATENT = (4, 8, 8)
TINY_IMAGE = (3, 16, 16)
TINY_SIDE = 16
CLIP_LEN = 16
T5_WORDS = ("the", "a", "dog", "cat", "photo", "of", "red", "blue", "on", "grass", "digit")


def tiny_t5_tokenizer():
    """A T5 tokenizer (transformers' ``T5TokenizerFast``) over a ``tokenizers`` Unigram model
    built here: pad, eos, unk, the word boundary, single letters and a few whole words."""
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -4.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    vocab += [("\u2581" + c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    vocab += [("\u2581" + w, -1.0) for w in T5_WORDS]
    return T5TokenizerFast(vocab=vocab, extra_ids=0)


def tiny_t5(d_model: int, vocab_size: int):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    return T5EncoderModel(T5Config(
        vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
        relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0,
        eos_token_id=1))


def clip_tokenizer(path: Path):
    from transformers import CLIPTokenizer

    vocab_path, merges_path = write_tiny_clip_vocab(path.parent / f"{path.name}-tokenizer-src")
    return CLIPTokenizer(vocab=str(vocab_path), merges=str(merges_path),
                         model_max_length=CLIP_LEN)


def clip_config(vocab_size: int, hidden: int = 16, projection: int = 16):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=32,
                          num_hidden_layers=2, num_attention_heads=2,
                          max_position_embeddings=CLIP_LEN, bos_token_id=0, eos_token_id=1,
                          pad_token_id=1, projection_dim=projection)


def tiny_vae(**kw):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=TINY_LATENT[0], block_out_channels=(8, 16),
        layers_per_block=1, norm_num_groups=4, sample_size=TINY_SIDE,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), mid_block_add_attention=False,
        **kw)


#: The scheduler config of stabilityai/stable-diffusion-xl-base-1.0: an Euler scheduler that
#: carries SD's DDIM/PNDM keys, so ``DDIMScheduler.from_config`` of it does not clip x0.
SDXL_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear",
    "num_train_timesteps": 1000, "prediction_type": "epsilon", "sample_max_value": 1.0,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False}


def build_tiny_sdxl(path: str | Path) -> Path:
    """StableDiffusionXLPipeline: CLIPTextModel + CLIPTextModelWithProjection (hidden 16 each,
    so the UNet's cross-attention width is 32), text_time added embedding (6 time ids x 4 + 16
    pooled = 40), SDXL base's scheduler config and a VAE with latents_mean/std and
    force_upcast."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    path = Path(path)
    tokenizer = clip_tokenizer(path)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=TINY_LATENT[1], in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(8, 16), norm_num_groups=4, cross_attention_dim=32,
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=4, projection_class_embeddings_input_dim=6 * 4 + 16,
        transformer_layers_per_block=(1, 1),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(clip_config(len(tokenizer)))
    torch.manual_seed(1)
    text_encoder_2 = CLIPTextModelWithProjection(clip_config(len(tokenizer)))
    vae = tiny_vae(force_upcast=True, latents_mean=[0.1, -0.2, 0.05, 0.0],
                   latents_std=[0.9, 1.1, 1.0, 0.8])
    scheduler = EulerDiscreteScheduler.from_config(SDXL_SCHEDULER)
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer, unet=unet, scheduler=scheduler, add_watermarker=False)
    pipe.save_pretrained(path)
    return path


def build_tiny_sd3(path: str | Path) -> Path:
    """StableDiffusion3Pipeline: two CLIPTextModelWithProjection (hidden 16, projection 16:
    pooled 32), T5 (d_model 48, so the CLIP context is zero-padded from 32 to 48), an MMDiT
    with patch size 2, SD3's scheduler config (shift 3) and VAE scaling/shift factors."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection

    path = Path(path)
    tokenizer = clip_tokenizer(path)
    t5_tokenizer = tiny_t5_tokenizer()
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=TINY_LATENT[1], patch_size=2, in_channels=4, out_channels=4, num_layers=1,
        attention_head_dim=8, num_attention_heads=2, caption_projection_dim=16,
        joint_attention_dim=48, pooled_projection_dim=32, pos_embed_max_size=16)
    torch.manual_seed(0)
    text_encoder = CLIPTextModelWithProjection(clip_config(len(tokenizer)))
    torch.manual_seed(1)
    text_encoder_2 = CLIPTextModelWithProjection(clip_config(len(tokenizer)))
    text_encoder_3 = tiny_t5(48, len(t5_tokenizer))
    vae = tiny_vae(use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609,
                   scaling_factor=1.5305)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer, text_encoder_3=text_encoder_3, tokenizer_3=t5_tokenizer)
    pipe.save_pretrained(path)
    return path


def build_tiny_flux(path: str | Path, guidance_embeds: bool = True) -> Path:
    """FluxPipeline: CLIPTextModel (pooled 16), T5 (d_model 48), a FluxTransformer2DModel on
    packed 4-channel latents (16 = 4 x 2 x 2 input channels), with the guidance embedding of
    FLUX.1-dev and its dynamic-shift scheduler (``guidance_embeds``) or without, with
    FLUX.1-schnell's shift-1 scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    path = Path(path)
    tokenizer = clip_tokenizer(path)
    t5_tokenizer = tiny_t5_tokenizer()
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4 * TINY_LATENT[0], num_layers=1, num_single_layers=1,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=48,
        pooled_projection_dim=16, guidance_embeds=guidance_embeds, axes_dims_rope=[4, 4, 8])
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(clip_config(len(tokenizer)))
    text_encoder_2 = tiny_t5(48, len(t5_tokenizer))
    vae = tiny_vae(use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.1159,
                   scaling_factor=0.3611)
    if guidance_embeds:    # FLUX.1-dev's scheduler config
        scheduler = FlowMatchEulerDiscreteScheduler(
            shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
            base_image_seq_len=256, max_image_seq_len=4096)
    else:                  # FLUX.1-schnell's
        scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    pipe = FluxPipeline(transformer=transformer, scheduler=scheduler, vae=vae,
                        text_encoder=text_encoder, tokenizer=tokenizer,
                        text_encoder_2=text_encoder_2, tokenizer_2=t5_tokenizer)
    pipe.save_pretrained(path)
    return path


def tame(model_dir: Path, keys: tuple[str, ...], factor: float = 0.1) -> None:
    """Scale the output layer's weights (``keys``) in a saved network folder by ``factor``
    (module docstring: makes a random tiny network's gain that of a trained one)."""
    from safetensors.torch import load_file, save_file

    f = next(Path(model_dir).glob("*.safetensors"))
    sd = load_file(str(f))
    for key in keys:
        sd[key] = sd[key] * factor
    save_file(sd, str(f), metadata={"format": "pt"})


OUTPUT_LAYERS = {"sdxl": ("unet", ("conv_out.weight", "conv_out.bias")),
                 "sd3": ("transformer", ("proj_out.weight", "proj_out.bias")),
                 "flux-dev": ("transformer", ("proj_out.weight", "proj_out.bias")),
                 "flux-schnell": ("transformer", ("proj_out.weight", "proj_out.bias"))}

BUILDERS = {"sdxl": build_tiny_sdxl, "sd3": build_tiny_sd3, "flux-dev": build_tiny_flux,
            "flux-schnell": lambda p: build_tiny_flux(p, guidance_embeds=False)}


def tiny_family_path(family: str) -> Path:
    """Path of a tiny pipeline folder of ``family`` (a key of :data:`BUILDERS`), built once per
    test session."""
    return _cached(family, BUILDERS[family])


def tame_family_path(family: str) -> Path:
    """The same tiny pipeline with its output layer scaled by 0.1 (:func:`tame`)."""
    def build(path: Path) -> Path:
        BUILDERS[family](path)
        folder, keys = OUTPUT_LAYERS[family]
        tame(path / folder, keys)
        return path

    return _cached(f"{family}-tame", build)
