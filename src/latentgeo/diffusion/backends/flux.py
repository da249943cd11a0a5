"""FLUX.1 (schnell and dev): ``FluxTransformer2DModel`` + ``AutoencoderKL`` + CLIP + T5, sampled
by flow matching on packed latents (Black Forest Labs 2024; diffusers' ``FluxPipeline``).

* **Seeds stay unpacked.** A seed file holds (C, H/8, W/8) (C = ``in_channels`` / 4 = 16), the
  spatial layout the statistics need. The model function packs 2x2 patches into tokens,
  (B, C, h, w) -> (B, h/2 * w/2, 4C), exactly as ``FluxPipeline._pack_latents``, calls the
  transformer and unpacks its output. Packing is a permutation, so the Euler step on unpacked
  latents equals the pipeline's step on packed ones, and ``FluxPipeline(latents=pack(seed))``
  renders the same image.
* **Conditioning** as ``FluxPipeline.encode_prompt``: CLIP's pooled output (the prompt padded to
  77 tokens) as ``pooled_projections``; T5's last hidden state (padded to
  ``max_sequence_length`` = 512, the pipeline's default) as ``encoder_hidden_states``;
  ``txt_ids`` zeros (L, 3) and ``img_ids`` (h/2 * w/2, 3) = (0, row, column) of each patch.
* **Guidance.** FLUX.1-dev is guidance-distilled: the guidance scale (default 3.5) is an input
  of the transformer (``guidance_embeds`` in its config), one network call per step, whatever the
  prompt, so ``guidance`` here always means that embedded value. FLUX.1-schnell has no guidance
  input: ``guidance`` must be 1 (no guidance) or unset. No classifier-free guidance with a
  negative prompt (the pipeline's ``true_cfg_scale``) is offered.
* **Grid** as ``FluxPipeline.__call__``: ``set_timesteps(sigmas=linspace(1, 1/N, N), mu=mu)``
  with mu = ``calculate_shift`` of the packed sequence length (h/2)(w/2) (sigmas None when the
  config sets ``use_flow_sigmas``); the transformer gets ``timestep / 1000`` in the network
  dtype (:func:`latentgeo.diffusion.schedules.flow_grid`).
* **Sizes**: default ``FluxPipeline.default_sample_size`` (128) * 8 = 1024 pixels; height and
  width must be multiples of 8 * 2 = 16 (the VAE's factor times the 2x2 packing). Latents are
  z = scaling (vae_mean - shift) (:mod:`.latent`).

Default steps: 28 for guidance-distilled models (the pipeline's default), 4 for schnell-type
models (their model card's; the pipeline's own default of 28 is allowed but wasteful).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from latentgeo.diffusion.backends.base import freeze, pick_image_size, place
from latentgeo.diffusion.backends.latent import LatentBackend
from latentgeo.diffusion.backends.sd import vae_scale_factor
from latentgeo.diffusion.backends.sd3 import calculate_shift, flow_scheduler
from latentgeo.diffusion.grid import Grid
from latentgeo.diffusion.sampler import ModelFn
from latentgeo.diffusion.schedules import flow_grid
from latentgeo.errors import InputError, ModelError

#: ``FluxPipeline``'s defaults: T5 tokens, latent cells per side, steps and guidance for dev.
MAX_SEQUENCE_LENGTH = 512
DEFAULT_SAMPLE_SIZE = 128
DEV_STEPS, DEV_GUIDANCE = 28, 3.5
SCHNELL_STEPS = 4


def pack(x: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C): 2x2 patches as tokens, channel-major within a token
    (``FluxPipeline._pack_latents``). h and w must be even."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, h/2 * w/2, 4C) -> (B, C, h, w), the inverse of :func:`pack`."""
    b, _, c4 = x.shape
    x = x.reshape(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, h, w)


def patch_ids(rows: int, cols: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(rows * cols, 3) position ids (0, row, column) of the packed tokens, row-major
    (``FluxPipeline._prepare_latent_image_ids``)."""
    ids = torch.zeros(rows, cols, 3)
    ids[..., 1] = torch.arange(rows)[:, None]
    ids[..., 2] = torch.arange(cols)[None, :]
    return ids.reshape(rows * cols, 3).to(device=device, dtype=dtype)


@dataclass
class FluxBackend(LatentBackend):
    transformer: Any = field(default=None, repr=False)
    scheduler: Any = field(default=None, repr=False)
    tokenizer: Any = field(default=None, repr=False)
    text_encoder: Any = field(default=None, repr=False)
    tokenizer_2: Any = field(default=None, repr=False)
    text_encoder_2: Any = field(default=None, repr=False)
    guidance_embeds: bool = False
    max_sequence_length: int = MAX_SEQUENCE_LENGTH

    def networks(self) -> Sequence[Any]:
        return [self.transformer, self.vae, self.text_encoder, self.text_encoder_2]

    def grid(self, steps: int) -> Grid:
        n = self.check_steps(steps, int(self.scheduler.config.num_train_timesteps))
        cfg = self.scheduler.config
        sigmas = None if cfg.get("use_flow_sigmas", False) else np.linspace(1.0, 1 / n, n)
        seq_len = (self.latent_shape[1] // 2) * (self.latent_shape[2] // 2)
        mu = calculate_shift(seq_len, cfg.get("base_image_seq_len", 256),
                             cfg.get("max_image_seq_len", 4096), cfg.get("base_shift", 0.5),
                             cfg.get("max_shift", 1.15))
        return flow_grid(self.scheduler, n, sigmas=sigmas, mu=mu)

    def effective_guidance(self, condition: Any, guidance: float | None) -> float:
        """dev: the embedded guidance (default 3.5), with or without a prompt. schnell: 1 (no
        guidance input); any other value is refused."""
        if self.guidance_embeds:
            return self.guidance_or_default(guidance)
        if guidance is not None and float(guidance) != 1.0:
            raise InputError(f"guidance {guidance:g}: {self.name} has no guidance input (a "
                             "timestep-distilled FLUX model such as FLUX.1-schnell); use 1 or "
                             "leave it unset")
        return 1.0

    def _encode(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(T5 context (max_sequence_length, D), CLIP pooled (P,)) of one prompt."""
        ids = self.tokenizer([prompt], padding="max_length",
                             max_length=int(self.tokenizer.model_max_length), truncation=True,
                             return_tensors="pt").input_ids
        pooled = self.text_encoder(ids.to(self.device), output_hidden_states=False).pooler_output
        ids2 = self.tokenizer_2([prompt], padding="max_length",
                                max_length=self.max_sequence_length, truncation=True,
                                return_tensors="pt").input_ids
        context = self.text_encoder_2(ids2.to(self.device), output_hidden_states=False)[0]
        return context[0], pooled[0]

    def embed_pair(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(context (B, L, D), pooled (B, P)) in the network dtype, cached per prompt and
        ``max_sequence_length``."""
        rows = [self.cached((p, self.max_sequence_length), lambda p=p: tuple(
            t.to(self.dtype) for t in self._encode(p))) for p in prompts]
        return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])

    def model_fn(self, condition: Any = None, guidance: float | None = None) -> ModelFn:
        """model(x (B, C, h, w) unpacked, t) -> the transformer's velocity, unpacked, in x's
        dtype; ``condition`` a prompt, a list of prompts or None (the empty prompt)."""
        self.check_condition(condition)
        g = self.effective_guidance(condition, guidance)

        def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            b, _, h, w = x.shape
            context, pooled = self.embed_pair(self.prompts(condition, b))
            embedded = None
            if self.guidance_embeds:
                embedded = torch.full([1], g, device=self.device, dtype=torch.float32).expand(b)
            timestep = t.to(self.device).reshape(()).expand(b).to(self.dtype)
            out = self.transformer(
                hidden_states=pack(x.to(self.device, self.dtype)), timestep=timestep / 1000,
                guidance=embedded, pooled_projections=pooled, encoder_hidden_states=context,
                txt_ids=torch.zeros(context.shape[1], 3, device=self.device, dtype=self.dtype),
                img_ids=patch_ids(h // 2, w // 2, self.device, self.dtype),
                return_dict=False)[0]
            return unpack(out, h, w).to(x.device, x.dtype)

        return model


def flux_backend(pipe: Any, name: str, device: torch.device, dtype: torch.dtype,
                 height: int | None = None, width: int | None = None,
                 offload: bool = False) -> FluxBackend:
    """A :class:`FluxBackend` from a loaded ``FluxPipeline`` (module docstring).

    height, width: pixels, multiples of 16 (the VAE's factor times the 2x2 packing); default
    ``default_sample_size`` (128) * 8 = 1024 as the pipeline's."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    transformer, vae = getattr(pipe, "transformer", None), getattr(pipe, "vae", None)
    parts = [getattr(pipe, k, None) for k in ("tokenizer", "text_encoder", "tokenizer_2",
                                              "text_encoder_2")]
    if not (isinstance(transformer, FluxTransformer2DModel) and isinstance(vae, AutoencoderKL)
            and all(p is not None for p in parts)):
        raise ModelError(f"{name}: not a FLUX.1 pipeline (needs a FluxTransformer2DModel, an "
                         "AutoencoderKL, a CLIP and a T5 text encoder)")
    packed = int(transformer.config.in_channels)
    if int(transformer.config.out_channels or packed) != packed or packed % 4:
        raise ModelError(f"{name}: its transformer takes {packed} packed channels but predicts "
                         f"{transformer.config.out_channels} (a Fill/Control model); only "
                         "text-to-image models are supported")
    f = vae_scale_factor(vae)
    side = int(getattr(pipe, "default_sample_size", DEFAULT_SAMPLE_SIZE)) * f
    h, w = pick_image_size(height, width, (side, side), 2 * f, name,
                           f"the VAE's scale factor {f} times the 2x2 packing")
    guided = bool(transformer.config.guidance_embeds)
    place(transformer, device, dtype, offload)
    for enc in (parts[1], parts[3]):
        place(enc, device, dtype, offload)
    place(vae, device, dtype, offload)
    freeze(transformer, vae, parts[1], parts[3])
    return FluxBackend(
        name=name, family="flux", latent_shape=(packed // 4, h // f, w // f), image_size=(h, w),
        image_channels=int(vae.config.in_channels), device=device, dtype=dtype,
        default_guidance=DEV_GUIDANCE if guided else 1.0,
        default_steps=DEV_STEPS if guided else SCHNELL_STEPS, conditioning="text",
        pipeline_class=type(pipe).__name__, vae=vae, transformer=transformer,
        scheduler=flow_scheduler(pipe.scheduler, name), tokenizer=parts[0],
        text_encoder=parts[1], tokenizer_2=parts[2], text_encoder_2=parts[3],
        guidance_embeds=guided)
