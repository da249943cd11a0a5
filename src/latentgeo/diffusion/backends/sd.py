"""Stable Diffusion 1.x/2.x: ``UNet2DConditionModel`` + ``AutoencoderKL`` + one CLIP text encoder.

Conditioning as ``StableDiffusionPipeline.encode_prompt``: the prompt padded to the tokenizer's
``model_max_length``, the text encoder's last hidden state (with the attention mask where the
encoder's config asks for it) as ``encoder_hidden_states``; the unconditional half of
classifier-free guidance is the empty prompt. Seeds are (4, H/8, W/8); sampling is DDIM on the
pipeline's scheduler config (:func:`latentgeo.diffusion.schedules.ddim_grid`). Image sizes:
any multiple of 8 (the VAE's scale factor), default the UNet's ``sample_size`` * 8.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from latentgeo.diffusion.backends.base import cfg_combine, freeze, hw_of, pick_image_size, place
from latentgeo.diffusion.backends.latent import LatentBackend, vae_dtype
from latentgeo.diffusion.grid import Grid
from latentgeo.diffusion.sampler import ModelFn
from latentgeo.diffusion.schedules import ddim_grid, ddim_scheduler
from latentgeo.errors import ModelError

PIPELINES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "AltDiffusionPipeline")


def clip_embeddings(tokenizer: Any, text_encoder: Any, prompts: list[str],
                    device: torch.device) -> torch.Tensor:
    """Last hidden states (B, L, D) of a CLIP text encoder for prompts padded to the
    tokenizer's ``model_max_length`` (``StableDiffusionPipeline.encode_prompt``)."""
    tok = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt")
    mask = None
    if getattr(text_encoder.config, "use_attention_mask", False):
        mask = tok.attention_mask.to(device)
    return text_encoder(tok.input_ids.to(device), attention_mask=mask)[0]


@dataclass
class SDBackend(LatentBackend):
    unet: Any = field(default=None, repr=False)
    scheduler: Any = field(default=None, repr=False)
    text_encoder: Any = field(default=None, repr=False)
    tokenizer: Any = field(default=None, repr=False)

    def networks(self) -> Sequence[Any]:
        return [self.unet, self.vae, self.text_encoder]

    def grid(self, steps: int) -> Grid:
        steps = self.check_steps(steps, int(self.scheduler.config.num_train_timesteps))
        return ddim_grid(self.scheduler, steps)

    def embed(self, prompts: list[str]) -> torch.Tensor:
        """(B, L, D) prompt embeddings in the network dtype, cached per prompt."""
        rows = [self.cached(p, lambda p=p: clip_embeddings(
            self.tokenizer, self.text_encoder, [p], self.device)[0].to(self.dtype))
            for p in prompts]
        return torch.stack(rows)

    def model_fn(self, condition: Any = None, guidance: float | None = None) -> ModelFn:
        """model(x (B, 4, h, w), t) -> the UNet's output; ``condition`` a prompt, a list of
        prompts or None (the empty prompt)."""
        self.check_condition(condition)
        g = self.effective_guidance(condition, guidance)
        guided = g != 1.0

        def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            b = x.shape[0]
            x_in = x.to(self.device, self.dtype)
            context = self.embed(self.prompts(condition, b))
            if guided:
                context = torch.cat([context, self.embed([""] * b)])
                x_in = torch.cat([x_in, x_in])
            t_in = t.to(self.device).reshape(()).expand(x_in.shape[0])
            with self.token_scope(self.unet, t_in):
                out = self.unet(x_in, t_in, encoder_hidden_states=context,
                                return_dict=False)[0]
            if guided:
                out = cfg_combine(out, g)
            return out.to(x.device, x.dtype)

        return model


def vae_scale_factor(vae: Any) -> int:
    """Pixels per latent cell: 2 ** (number of VAE blocks - 1), as diffusers' pipelines compute
    ``vae_scale_factor`` (8 for every released SD, SDXL, SD3 and FLUX VAE)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def check_text_unet(unet: Any, name: str) -> int:
    """The latent channels of a text-to-image UNet; ModelError for inpainting/depth UNets
    (more input channels than output channels: image, mask or depth come with the seed)."""
    channels = int(unet.config.in_channels)
    if channels != int(unet.config.out_channels):
        raise ModelError(f"{name}: its UNet takes {channels} input channels but predicts "
                         f"{unet.config.out_channels} (an inpainting or depth model); only "
                         "text-to-image UNets are supported")
    return channels


def sd_backend(pipe: Any, name: str, device: torch.device, dtype: torch.dtype,
               height: int | None = None, width: int | None = None,
               offload: bool = False) -> SDBackend:
    """An :class:`SDBackend` from a loaded SD 1.x/2.x pipeline.

    height, width: image size in pixels, multiples of the VAE's scale factor (8); default
    ``unet.config.sample_size * 8`` as the pipeline's. Seeds are (4, height / 8, width / 8).
    offload: leave the networks on the CPU (model CPU offload, set up by the loader)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    unet, vae = getattr(pipe, "unet", None), getattr(pipe, "vae", None)
    if not (isinstance(unet, UNet2DConditionModel) and isinstance(vae, AutoencoderKL)
            and getattr(pipe, "text_encoder", None) is not None
            and getattr(pipe, "tokenizer", None) is not None):
        raise ModelError(f"{name}: not a Stable Diffusion pipeline (needs a "
                         "UNet2DConditionModel, an AutoencoderKL and a CLIP text encoder)")
    channels = check_text_unet(unet, name)
    f = vae_scale_factor(vae)
    default = hw_of(unet.config.sample_size, name)
    h, w = pick_image_size(height, width, (default[0] * f, default[1] * f), f, name,
                           "the VAE's scale factor")
    place(unet, device, dtype, offload)
    place(pipe.text_encoder, device, dtype, offload)
    place(vae, device, vae_dtype(vae, dtype), offload)
    freeze(unet, vae, pipe.text_encoder)
    return SDBackend(
        name=name, family="sd", latent_shape=(channels, h // f, w // f),
        image_size=(h, w), image_channels=int(vae.config.in_channels),
        device=device, dtype=dtype, default_guidance=7.5, default_steps=50,
        conditioning="text", pipeline_class=type(pipe).__name__, vae=vae, unet=unet,
        scheduler=ddim_scheduler(pipe.scheduler.config), text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer)
