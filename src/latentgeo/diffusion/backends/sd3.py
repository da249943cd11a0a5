"""Stable Diffusion 3 / 3.5: ``SD3Transformer2DModel`` (MMDiT) + ``AutoencoderKL`` + two CLIP
text encoders and T5, sampled by flow matching (Esser et al. 2024).

Conditioning as ``StableDiffusion3Pipeline.encode_prompt``:

* both CLIP encoders (``CLIPTextModelWithProjection``) see the prompt padded to the first
  tokenizer's ``model_max_length`` (77); their *penultimate* hidden states are concatenated on the
  feature axis, zero-padded to T5's width and put before T5's last hidden state (the prompt padded
  to ``max_sequence_length`` tokens, 256 by default; zeros when the pipeline has no T5):
  ``encoder_hidden_states`` (B, 77 + 256, 4096);
* their pooled (projected) outputs, concatenated, are ``pooled_projections`` (B, 2048);
* the unconditional half of classifier-free guidance is the empty prompt encoded the same way.

The network predicts the flow velocity v = noise - x0 (x_s = (1 - s) x0 + s noise); it is called
at ``scheduler.timesteps[i]`` (= 1000 s). The grid is ``FlowMatchEulerDiscreteScheduler``'s after
``set_timesteps(steps)``, or ``set_timesteps(steps, mu=mu)`` when its config sets
``use_dynamic_shifting``, with mu from the image sequence length (h / p) (w / p) exactly as the
pipeline's ``calculate_shift`` (:func:`latentgeo.diffusion.schedules.flow_grid`). Latents are
z = scaling (vae_mean - shift) (:mod:`.latent`), seeds (16, H/8, W/8), default H = W =
``transformer.config.sample_size`` * 8 = 1024; H and W must be multiples of 8 * patch size = 16.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from latentgeo.diffusion.backends.base import cfg_combine, freeze, hw_of, pick_image_size, place
from latentgeo.diffusion.backends.latent import LatentBackend
from latentgeo.diffusion.backends.sd import vae_scale_factor
from latentgeo.diffusion.grid import Grid
from latentgeo.diffusion.sampler import ModelFn
from latentgeo.diffusion.schedules import check_flow_scheduler, flow_grid
from latentgeo.errors import InputError, ModelError

#: ``StableDiffusion3Pipeline.__call__``'s defaults.
MAX_SEQUENCE_LENGTH = 256
DEFAULT_STEPS = 28
DEFAULT_GUIDANCE = 7.0


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
                    base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """mu of resolution-dependent timestep shifting: linear in the image sequence length from
    base_shift at base_seq_len to max_shift at max_seq_len (Esser et al. 2024, Sec. 5.3.2;
    diffusers' ``calculate_shift``, the same float arithmetic)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


def clip_penultimate(tokenizer: Any, encoder: Any, prompt: str, max_length: int,
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(penultimate hidden states (L, D), pooled projection (P,)) of one prompt
    (``StableDiffusion3Pipeline._get_clip_prompt_embeds``)."""
    ids = tokenizer([prompt], padding="max_length", max_length=max_length, truncation=True,
                    return_tensors="pt").input_ids
    out = encoder(ids.to(device), output_hidden_states=True)
    return out.hidden_states[-2][0], out[0][0]


def t5_hidden(tokenizer: Any, encoder: Any, prompt: str, max_length: int,
              device: torch.device) -> torch.Tensor:
    """T5's last hidden state (max_length, D) for one prompt padded to ``max_length``."""
    ids = tokenizer([prompt], padding="max_length", max_length=max_length, truncation=True,
                    add_special_tokens=True, return_tensors="pt").input_ids
    return encoder(ids.to(device))[0][0]


def flow_scheduler(scheduler: Any, name: str) -> Any:
    """A fresh ``FlowMatchEulerDiscreteScheduler`` from the pipeline's scheduler (its config,
    so the pipeline's own scheduler state is left alone); other schedulers and stochastic
    configs are refused."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if not isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        raise ModelError(f"{name}: its scheduler is {type(scheduler).__name__}; latentgeo "
                         "samples flow models with FlowMatchEulerDiscreteScheduler")
    check_flow_scheduler(scheduler, name)
    return FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)


@dataclass
class SD3Backend(LatentBackend):
    transformer: Any = field(default=None, repr=False)
    scheduler: Any = field(default=None, repr=False)
    tokenizers: tuple[Any, ...] = field(default=(), repr=False)
    text_encoders: tuple[Any, ...] = field(default=(), repr=False)
    max_sequence_length: int = MAX_SEQUENCE_LENGTH

    def networks(self) -> Sequence[Any]:
        return [self.transformer, self.vae, *[e for e in self.text_encoders if e is not None]]

    def grid(self, steps: int) -> Grid:
        steps = self.check_steps(steps, int(self.scheduler.config.num_train_timesteps))
        cfg = self.scheduler.config
        kwargs: dict[str, Any] = {}
        if cfg.get("use_dynamic_shifting", None):
            p = int(self.transformer.config.patch_size)
            seq_len = (self.latent_shape[1] // p) * (self.latent_shape[2] // p)
            kwargs["mu"] = calculate_shift(seq_len, cfg.get("base_image_seq_len", 256),
                                           cfg.get("max_image_seq_len", 4096),
                                           cfg.get("base_shift", 0.5),
                                           cfg.get("max_shift", 1.16))
        return flow_grid(self.scheduler, steps, **kwargs)

    def _encode(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(context (77 + max_sequence_length, D_t5), pooled (P1 + P2,)) of one prompt."""
        tok1, tok2, tok3 = self.tokenizers
        enc1, enc2, enc3 = self.text_encoders
        n = int(tok1.model_max_length)
        h1, p1 = clip_penultimate(tok1, enc1, prompt, n, self.device)
        h2, p2 = clip_penultimate(tok2, enc2, prompt, n, self.device)
        clip = torch.cat([h1, h2], dim=-1)
        if enc3 is None:
            t5 = torch.zeros((self.max_sequence_length,
                              int(self.transformer.config.joint_attention_dim)),
                             device=self.device, dtype=clip.dtype)
        else:
            t5 = t5_hidden(tok3, enc3, prompt, self.max_sequence_length, self.device)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return torch.cat([clip, t5.to(clip.dtype)], dim=-2), torch.cat([p1, p2], dim=-1)

    def embed_pair(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(context (B, L, D), pooled (B, P)) in the network dtype, cached per prompt and
        ``max_sequence_length``."""
        rows = [self.cached((p, self.max_sequence_length), lambda p=p: tuple(
            t.to(self.dtype) for t in self._encode(p))) for p in prompts]
        return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])

    def model_fn(self, condition: Any = None, guidance: float | None = None) -> ModelFn:
        """model(x (B, C, h, w), t) -> the transformer's velocity; ``condition`` a prompt, a list
        of prompts or None (the empty prompt); guidance != 1 batches [prompt; empty prompt]."""
        self.check_condition(condition)
        g = self.effective_guidance(condition, guidance)
        guided = g != 1.0

        def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            b = x.shape[0]
            x_in = x.to(self.device, self.dtype)
            context, pooled = self.embed_pair(self.prompts(condition, b))
            if guided:
                neg_context, neg_pooled = self.embed_pair([""] * b)
                context = torch.cat([context, neg_context])
                pooled = torch.cat([pooled, neg_pooled])
                x_in = torch.cat([x_in, x_in])
            t_in = t.to(self.device).reshape(()).expand(x_in.shape[0])
            out = self.transformer(hidden_states=x_in, timestep=t_in,
                                   encoder_hidden_states=context, pooled_projections=pooled,
                                   return_dict=False)[0]
            if guided:
                out = cfg_combine(out, g)
            return out.to(x.device, x.dtype)

        return model


def sd3_backend(pipe: Any, name: str, device: torch.device, dtype: torch.dtype,
                height: int | None = None, width: int | None = None,
                offload: bool = False) -> SD3Backend:
    """An :class:`SD3Backend` from a loaded ``StableDiffusion3Pipeline`` (module docstring).

    height, width: pixels, multiples of the VAE's scale factor times the patch size (16);
    default ``transformer.config.sample_size`` * 8 as the pipeline's."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    transformer, vae = getattr(pipe, "transformer", None), getattr(pipe, "vae", None)
    encoders = tuple(getattr(pipe, k, None) for k in
                     ("text_encoder", "text_encoder_2", "text_encoder_3"))
    tokenizers = tuple(getattr(pipe, k, None) for k in ("tokenizer", "tokenizer_2",
                                                        "tokenizer_3"))
    if not (isinstance(transformer, SD3Transformer2DModel) and isinstance(vae, AutoencoderKL)
            and all(e is not None for e in encoders[:2])
            and all(t is not None for t in tokenizers[:2])):
        raise ModelError(f"{name}: not a Stable Diffusion 3 pipeline (needs an "
                         "SD3Transformer2DModel, an AutoencoderKL and two CLIP text encoders)")
    if (encoders[2] is None) != (tokenizers[2] is None):
        raise ModelError(f"{name}: has a T5 text encoder without its tokenizer, or the reverse")
    channels = int(transformer.config.in_channels)
    if int(transformer.config.out_channels or channels) != channels:
        raise ModelError(f"{name}: its transformer takes {channels} channels but predicts "
                         f"{transformer.config.out_channels}; only text-to-image models are "
                         "supported")
    f = vae_scale_factor(vae)
    p = int(transformer.config.patch_size)
    default = hw_of(transformer.config.sample_size, name)
    h, w = pick_image_size(height, width, (default[0] * f, default[1] * f), f * p, name,
                           f"the VAE's scale factor {f} times the patch size {p}")
    limit = transformer.config.get("pos_embed_max_size", None)
    if limit is not None and max(h, w) > int(limit) * p * f:
        side = "height" if h >= w else "width"
        raise InputError(f"{side} {max(h, w)}: {name} supports at most {int(limit) * p * f} "
                         "pixels (its positional embedding's pos_embed_max_size)")
    place(transformer, device, dtype, offload)
    for enc in encoders:
        place(enc, device, dtype, offload)
    place(vae, device, dtype, offload)
    freeze(transformer, vae, *encoders)
    return SD3Backend(
        name=name, family="sd3", latent_shape=(channels, h // f, w // f), image_size=(h, w),
        image_channels=int(vae.config.in_channels), device=device, dtype=dtype,
        default_guidance=DEFAULT_GUIDANCE, default_steps=DEFAULT_STEPS, conditioning="text",
        pipeline_class=type(pipe).__name__, vae=vae, transformer=transformer,
        scheduler=flow_scheduler(pipe.scheduler, name), tokenizers=tokenizers,
        text_encoders=encoders)
