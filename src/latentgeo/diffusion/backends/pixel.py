"""Pixel-space models: a diffusers ``UNet2DModel`` on images in [-1, 1], no VAE.

* The bundled digit models (``--model bundled``: DDPM, v-prediction; ``--model bundled-flow``:
  rectified flow) and any folder in their format: ``unet/``, ``scheduler/`` and
  ``latentgeo.json`` (class count, null class, default guidance and steps). Class-conditional:
  label ``null_class`` is the unconditional model, so classifier-free guidance needs one network.
* Unconditional ``DDPMPipeline`` / ``DDIMPipeline`` folders and hub ids.

Seed = x_T (C, H, W) in pixel space; the image is (x_0 + 1) / 2. The scheduler decides the kind:
a ``FlowMatchEulerDiscreteScheduler`` samples on its own default grid (``set_timesteps(steps)``,
what a loop over its ``step`` does), anything else with deterministic DDIM.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from latentgeo.diffusion.backends.base import (
    Backend,
    cfg_combine,
    freeze,
    hw_of,
    to_model_range,
    to_unit_images,
)
from latentgeo.diffusion.grid import Grid
from latentgeo.diffusion.sampler import ModelFn
from latentgeo.diffusion.schedules import check_flow_scheduler, ddim_grid, ddim_scheduler, flow_grid
from latentgeo.errors import InputError, ModelError

FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler",)


@dataclass
class PixelBackend(Backend):
    """A pixel-space UNet2DModel, class-conditional (``num_classes`` > 0) or not."""

    unet: Any = field(default=None, repr=False)
    scheduler: Any = field(default=None, repr=False)
    flow: bool = False

    def networks(self) -> Sequence[Any]:
        return [self.unet]

    def grid(self, steps: int) -> Grid:
        n_train = int(self.scheduler.config.num_train_timesteps)
        steps = self.check_steps(steps, n_train)
        return flow_grid(self.scheduler, steps) if self.flow else ddim_grid(self.scheduler, steps)

    def _labels(self, condition: Any, batch: int) -> torch.Tensor:
        rows = [self.null_class if c is None else int(c) for c in self.per_row(condition, batch)]
        return torch.tensor(rows, dtype=torch.long, device=self.device)

    def model_fn(self, condition: Any = None, guidance: float | None = None) -> ModelFn:
        """model(x (B, C, H, W), t) -> the UNet's output (epsilon / v / x0 / flow velocity) in
        x's dtype. Class labels: ``condition`` (int, list of ints, None = null class);
        guidance g != 1 batches [conditional; null] and combines them."""
        self.check_condition(condition)
        g = self.effective_guidance(condition, guidance)
        guided = g != 1.0

        def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            b = x.shape[0]
            x_in = x.to(self.device, self.dtype)
            extra: dict[str, Any] = {}
            if self.conditioning == "class":
                labels = self._labels(condition, b)
                if guided:
                    labels = torch.cat([labels, self._labels(None, b)])
                extra["class_labels"] = labels
            if guided:
                x_in = torch.cat([x_in, x_in])
            t_in = t.to(self.device).reshape(()).expand(x_in.shape[0])
            with self.token_scope(self.unet, t_in):
                out = self.unet(x_in, t_in, **extra, return_dict=False)[0]
            if guided:
                out = cfg_combine(out, g)
            return out.to(x.device, x.dtype)

        return model

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W) in [0, 1] -> x_0 = 2 images - 1 (float32)."""
        self.check_images(images)
        return to_model_range(images)

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """x_0 (B, C, H, W) -> images (x_0 + 1) / 2 clamped to [0, 1], float32, x0's device."""
        return to_unit_images(x0)


def pixel_backend(unet: Any, scheduler: Any, name: str, device: torch.device,
                  dtype: torch.dtype, meta: dict, pipeline_class: str,
                  height: int | None = None, width: int | None = None) -> PixelBackend:
    """A :class:`PixelBackend` from a loaded UNet2DModel, its scheduler and latentgeo.json
    metadata (``{}`` for a plain diffusers pipeline: unconditional, guidance 1, 50 steps).

    height, width: a pixel model renders only at the size it was trained on (its UNet's
    ``sample_size``); None means that size, any other value is refused."""
    hw = hw_of(unet.config.sample_size, name)
    for label, value, trained in (("height", height, hw[0]), ("width", width, hw[1])):
        if value is not None and value != trained:
            raise InputError(f"{label} {value}: {name} is a pixel-space model trained at "
                             f"{hw[0]}x{hw[1]} and renders only at that size")
    unet = unet.to(device, dtype)
    freeze(unet)
    flow = type(scheduler).__name__ in FLOW_SCHEDULERS
    if flow:
        check_flow_scheduler(scheduler, name)
    else:
        scheduler = ddim_scheduler(scheduler.config)
    try:
        num_classes = int(meta.get("num_classes") or 0)
        null_class = meta.get("null_class")
        null_class = None if null_class is None else int(null_class)
        guidance = float(meta.get("guidance", 1.0))
        steps = int(meta.get("steps", 50))
    except (TypeError, ValueError):
        raise ModelError(f"{name}: latentgeo.json has a non-numeric num_classes, null_class, "
                         "guidance or steps") from None
    if num_classes < 0 or steps < 1 or not torch.isfinite(torch.tensor(guidance)):
        raise ModelError(f"{name}: latentgeo.json has an invalid num_classes, steps or guidance")
    embeds = unet.config.num_class_embeds
    if not num_classes and embeds is not None:
        raise ModelError(f"{name}: the UNet is class-conditional (num_class_embeds={embeds}) "
                         "but the folder declares no classes (latentgeo.json num_classes and "
                         "null_class)")
    if num_classes and (embeds is None or null_class is None
                        or not 0 <= null_class < int(embeds) or num_classes > int(embeds)):
        raise ModelError(f"{name}: latentgeo.json declares {num_classes} classes, null class "
                         f"{null_class}, but the UNet has num_class_embeds={embeds}")
    channels = int(unet.config.in_channels)
    if int(unet.config.out_channels) != channels:
        raise ModelError(f"{name}: the UNet maps {channels} channels to "
                         f"{unet.config.out_channels}; a pixel model must keep them equal")
    return PixelBackend(
        name=name, family="pixel", latent_shape=(channels, *hw), image_size=hw,
        image_channels=channels, device=device, dtype=dtype, default_guidance=guidance,
        default_steps=steps, conditioning="class" if num_classes else "none",
        num_classes=num_classes, null_class=null_class if num_classes else None,
        pipeline_class=pipeline_class, unet=unet, scheduler=scheduler, flow=flow)


def pixel_backend_from_pipeline(pipe: Any, name: str, device: torch.device,
                                dtype: torch.dtype, height: int | None = None,
                                width: int | None = None, offload: bool = False
                                ) -> PixelBackend:
    """An unconditional :class:`PixelBackend` from a loaded ``DDPMPipeline`` /
    ``DDIMPipeline`` (sampled with deterministic DDIM on its scheduler config). Sizes as
    :func:`pixel_backend`; ``offload`` is refused (one small network: nothing to offload)."""
    from diffusers import UNet2DModel

    if offload:
        raise ModelError(f"{name}: CPU offload is for large multi-network pipelines; a pixel "
                         "model is one small UNet")
    if not isinstance(getattr(pipe, "unet", None), UNet2DModel):
        raise ModelError(f"{name}: {type(pipe).__name__} without a UNet2DModel")
    return pixel_backend(pipe.unet, pipe.scheduler, name, device, dtype, {},
                         type(pipe).__name__, height=height, width=width)
