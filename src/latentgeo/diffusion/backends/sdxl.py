"""Stable Diffusion XL: ``UNet2DConditionModel`` + ``AutoencoderKL`` + two CLIP text encoders.

Conditioning as ``StableDiffusionXLPipeline.encode_prompt`` and ``__call__`` (Podell et al. 2023):

* each prompt is padded to its tokenizer's ``model_max_length`` and run through both encoders
  (``CLIPTextModel`` and ``CLIPTextModelWithProjection``; the first may be absent); their
  *penultimate* hidden states are concatenated on the feature axis as
  ``encoder_hidden_states`` (B, 77, 768 + 1280 for SDXL base);
* the pooled output of the encoder whose first output is 2-D (the projection model) becomes
  ``added_cond_kwargs["text_embeds"]``, and ``added_cond_kwargs["time_ids"]`` is
  (original size, crop top-left, target size) = (H, W, 0, 0, H, W), the pipeline's defaults;
* the unconditional half of classifier-free guidance is all zeros (embeddings and pooled
  embeddings) when the pipeline's config says ``force_zeros_for_empty_prompt`` (SDXL base),
  else the encoded empty prompt; it gets the same time ids.

Seeds are (4, H/8, W/8), default H = W = ``unet.config.sample_size`` * 8 = 1024. Sampling is
deterministic DDIM on the pipeline's scheduler config (SDXL ships an Euler scheduler whose betas
DDIM reuses; :func:`latentgeo.diffusion.schedules.ddim_grid`). The VAE: a float16 VAE with
``force_upcast`` runs in float32, as diffusers upcasts it before decoding; ``latents_mean`` /
``latents_std`` in its config are applied (:mod:`.latent`). Refused: UNets with extra input
channels (inpainting), UNets whose added embedding does not take the six time ids (the refiner's
aesthetic-score ids) and guidance-distilled UNets (``time_cond_proj_dim``, LCM).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from latentgeo.diffusion.backends.base import cfg_combine, freeze, hw_of, pick_image_size, place
from latentgeo.diffusion.backends.latent import vae_dtype
from latentgeo.diffusion.backends.sd import SDBackend, check_text_unet, vae_scale_factor
from latentgeo.diffusion.sampler import ModelFn
from latentgeo.diffusion.schedules import ddim_scheduler
from latentgeo.errors import ModelError


def sdxl_embeddings(tokenizers: Sequence[Any], text_encoders: Sequence[Any], prompt: str,
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(context (L, D1 + D2), pooled (P,)) of one prompt, as
    ``StableDiffusionXLPipeline.encode_prompt``: penultimate hidden states of every encoder,
    concatenated; the pooled output of the encoder whose first output is 2-D."""
    hidden, pooled = [], None
    for tokenizer, encoder in zip(tokenizers, text_encoders):
        ids = tokenizer([prompt], padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        out = encoder(ids.to(device), output_hidden_states=True)
        if pooled is None and out[0].ndim == 2:
            pooled = out[0]
        hidden.append(out.hidden_states[-2])
    if pooled is None:
        raise ModelError("no SDXL text encoder returned a pooled embedding")
    return torch.cat(hidden, dim=-1)[0], pooled[0]


@dataclass
class SDXLBackend(SDBackend):
    """SD's UNet, VAE and DDIM grid with SDXL's two encoders and added conditions."""

    tokenizers: tuple[Any, ...] = field(default=(), repr=False)
    text_encoders: tuple[Any, ...] = field(default=(), repr=False)
    force_zeros_for_empty_prompt: bool = True

    def networks(self) -> Sequence[Any]:
        return [self.unet, self.vae, *self.text_encoders]

    def time_ids(self, batch: int) -> torch.Tensor:
        """(B, 6) float: (original H, W, crop top, left, target H, W) = (H, W, 0, 0, H, W)."""
        h, w = self.image_size
        ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=self.dtype, device=self.device)
        return ids.expand(batch, 6)

    def embed_pair(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(context (B, L, D), pooled (B, P)) in the network dtype, cached per prompt."""
        rows = [self.cached(p, lambda p=p: tuple(
            t.to(self.dtype) for t in sdxl_embeddings(self.tokenizers, self.text_encoders, p,
                                                      self.device)))
            for p in prompts]
        return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])

    def negative(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The unconditional half of CFG: zeros under ``force_zeros_for_empty_prompt``, else
        the empty prompt (``encode_prompt`` with no negative prompt)."""
        context, pooled = self.embed_pair([""] * batch)
        if self.force_zeros_for_empty_prompt:
            return torch.zeros_like(context), torch.zeros_like(pooled)
        return context, pooled

    def model_fn(self, condition: Any = None, guidance: float | None = None) -> ModelFn:
        """model(x (B, 4, h, w), t) -> the UNet's output; ``condition`` a prompt, a list of
        prompts or None (the empty prompt)."""
        self.check_condition(condition)
        g = self.effective_guidance(condition, guidance)
        guided = g != 1.0

        def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            b = x.shape[0]
            x_in = x.to(self.device, self.dtype)
            context, pooled = self.embed_pair(self.prompts(condition, b))
            if guided:
                neg_context, neg_pooled = self.negative(b)
                context = torch.cat([context, neg_context])
                pooled = torch.cat([pooled, neg_pooled])
                x_in = torch.cat([x_in, x_in])
            added = {"text_embeds": pooled, "time_ids": self.time_ids(x_in.shape[0])}
            t_in = t.to(self.device).reshape(()).expand(x_in.shape[0])
            with self.token_scope(self.unet, t_in):
                out = self.unet(x_in, t_in, encoder_hidden_states=context,
                                added_cond_kwargs=added, return_dict=False)[0]
            if guided:
                out = cfg_combine(out, g)
            return out.to(x.device, x.dtype)

        return model


def sdxl_backend(pipe: Any, name: str, device: torch.device, dtype: torch.dtype,
                 height: int | None = None, width: int | None = None,
                 offload: bool = False) -> SDXLBackend:
    """An :class:`SDXLBackend` from a loaded ``StableDiffusionXLPipeline`` (module docstring).

    height, width: pixels, multiples of the VAE's scale factor (8); default
    ``unet.config.sample_size`` * 8 as the pipeline's (1024 for SDXL base)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    unet, vae = getattr(pipe, "unet", None), getattr(pipe, "vae", None)
    encoder_2 = getattr(pipe, "text_encoder_2", None)
    if not (isinstance(unet, UNet2DConditionModel) and isinstance(vae, AutoencoderKL)
            and encoder_2 is not None and getattr(pipe, "tokenizer_2", None) is not None):
        raise ModelError(f"{name}: not an SDXL pipeline (needs a UNet2DConditionModel, an "
                         "AutoencoderKL and a second CLIP text encoder with projection)")
    channels = check_text_unet(unet, name)
    if unet.config.addition_embed_type != "text_time":
        raise ModelError(f"{name}: its UNet has addition_embed_type="
                         f"{unet.config.addition_embed_type!r}, not SDXL's 'text_time'")
    if unet.config.time_cond_proj_dim is not None:
        raise ModelError(f"{name}: its UNet is guidance-distilled (time_cond_proj_dim, an LCM "
                         "model), which samples with its own scheduler, not DDIM")
    expected = int(unet.add_embedding.linear_1.in_features)
    passed = 6 * int(unet.config.addition_time_embed_dim) + int(encoder_2.config.projection_dim)
    if expected != passed:
        raise ModelError(f"{name}: its UNet's added embedding takes {expected} inputs, not the "
                         f"{passed} of six time ids and the pooled text embedding (an SDXL "
                         "refiner's aesthetic-score ids are not supported)")
    f = vae_scale_factor(vae)
    default = hw_of(unet.config.sample_size, name)
    h, w = pick_image_size(height, width, (default[0] * f, default[1] * f), f, name,
                           "the VAE's scale factor")
    tokenizers = (pipe.tokenizer, pipe.tokenizer_2) if pipe.tokenizer is not None \
        else (pipe.tokenizer_2,)
    encoders = (pipe.text_encoder, encoder_2) if pipe.tokenizer is not None else (encoder_2,)
    place(unet, device, dtype, offload)
    for enc in encoders:
        place(enc, device, dtype, offload)
    place(vae, device, vae_dtype(vae, dtype), offload)
    freeze(unet, vae, *encoders)
    return SDXLBackend(
        name=name, family="sdxl", latent_shape=(channels, h // f, w // f), image_size=(h, w),
        image_channels=int(vae.config.in_channels), device=device, dtype=dtype,
        default_guidance=5.0, default_steps=50, conditioning="text",
        pipeline_class=type(pipe).__name__, vae=vae, unet=unet,
        scheduler=ddim_scheduler(pipe.scheduler.config), text_encoder=encoders[0],
        tokenizer=tokenizers[0], tokenizers=tokenizers, text_encoders=encoders,
        force_zeros_for_empty_prompt=bool(pipe.config.get("force_zeros_for_empty_prompt",
                                                         True)))
