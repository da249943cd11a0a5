"""What latent text-to-image families share: the VAE between images and latents, prompt caches.

The latent of an image is the VAE posterior *mean* (deterministic, no sampling), normalised as
the family's pipeline normalises it before sampling; decoding undoes that and maps the VAE's
[-1, 1] output to [0, 1] (diffusers' ``VaeImageProcessor.postprocess``):

    SD 1.x/2.x, SDXL:  z = scaling * mean               x = vae.decode(z / scaling)
    SDXL with latents_mean/std in the VAE config:
                       z = scaling * (mean - m) / s      x = vae.decode(z s / scaling + m)
    SD3, FLUX:         z = scaling * (mean - shift)      x = vae.decode(z / scaling + shift)

A float16 VAE whose config says ``force_upcast`` (SDXL's overflows in float16) runs in float32,
as diffusers upcasts it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from latentgeo.diffusion.backends.base import Backend, to_model_range, to_unit_images


def vae_dtype(vae: Any, dtype: torch.dtype) -> torch.dtype:
    """The dtype the VAE should run in: float32 for a float16 VAE that needs upcasting."""
    if dtype == torch.float16 and bool(getattr(vae.config, "force_upcast", False)):
        return torch.float32
    return dtype


@dataclass
class LatentBackend(Backend):
    """A backend with a VAE (``vae``) and a per-prompt embedding cache."""

    vae: Any = field(default=None, repr=False)
    _prompt_cache: dict[Any, Any] = field(default_factory=dict, repr=False)

    def _vae_norm(self, like: torch.Tensor) -> tuple[torch.Tensor | float, torch.Tensor | float,
                                                     float]:
        """(mean, std, scaling) of the latent normalisation: z = scaling (mean_vae - m) / s."""
        cfg = self.vae.config
        scaling = float(cfg.scaling_factor)
        m, s = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
        if m is not None and s is not None:
            shape = (1, -1, 1, 1)
            return (torch.tensor(m, device=like.device, dtype=like.dtype).view(shape),
                    torch.tensor(s, device=like.device, dtype=like.dtype).view(shape), scaling)
        shift = getattr(cfg, "shift_factor", None)
        return float(shift or 0.0), 1.0, scaling

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [0, 1] -> clean latents (B, *latent_shape) float32: the VAE
        posterior mean, normalised (module docstring)."""
        self.check_images(images)
        x = to_model_range(images).to(self.device, self.vae.dtype)
        mean = self.vae.encode(x).latent_dist.mean.to(torch.float32)
        m, s, scaling = self._vae_norm(mean)
        return ((mean - m) * scaling / s).to(images.device)

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Clean latents (B, *latent_shape) -> images (B, 3, H, W) float32 in [0, 1] on x0's
        device (module docstring)."""
        z = x0.to(self.device, torch.float32)
        m, s, scaling = self._vae_norm(z)
        z = z * s / scaling + m
        image = self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0]
        return to_unit_images(image).to(x0.device)

    def cached(self, key: Any, compute: Any) -> Any:
        """The prompt embeddings for ``key``, computed once per backend (no gradients)."""
        if key not in self._prompt_cache:
            with torch.no_grad():
                self._prompt_cache[key] = compute()
        return self._prompt_cache[key]

    def prompts(self, condition: Any, batch: int) -> list[str]:
        """One prompt per row; None is the empty prompt."""
        return ["" if c is None else str(c) for c in self.per_row(condition, batch)]
