"""Models behind one small interface: seeds in, images out, on exactly the DDIM grid we invert.

Two kinds of model
------------------
* ``bundled`` / ``pixel``: a pixel-space DDPM (diffusers ``UNet2DModel`` + scheduler). The
  bundled model (``--model bundled``, the default) is the class-conditional MNIST digit model
  shipped in ``latentgeo/bundled/digits`` (a ``DDIMPipeline`` folder plus ``latentgeo.json``
  with its class count, null class, default guidance and steps). Any folder with a
  ``latentgeo.json`` of that format loads the same way; other ``UNet2DModel`` pipelines
  (``DDPMPipeline``, ``DDIMPipeline``) load as unconditional ``pixel`` models.
  Seed = x_T (C, H, W) in pixel space; x_0 in [-1, 1] maps to the image by (x + 1) / 2.
* ``sd``: Stable Diffusion 1.x/2.x-style pipelines (``UNet2DConditionModel`` + ``AutoencoderKL``
  + CLIP text encoder and tokenizer). Seed = the VAE latent x_T (4, H/8, W/8); the image is
  ``vae.decode(x_0 / scaling_factor)``.

Rendering never calls the pipeline's own loop: it runs :func:`latentgeo.ddim.ddim_sample` over
the pipeline's network with a ``DDIMScheduler`` built from the pipeline's scheduler config, so
that inversion (:mod:`latentgeo.inversion`) can invert exactly the sampler used here. The
network predicts epsilon, v or x_0 (``prediction_type``); :meth:`Backend.noise_fn` always returns
epsilon. Classifier-free guidance (Ho & Salimans 2022): eps = eps_u + g (eps_c - eps_u), the
conditional and unconditional halves evaluated in one batched call.

Offline only: ``load_model`` sets ``HF_HUB_OFFLINE=1`` (unless already set) and passes
``local_files_only=True``; an id that is neither a local folder nor in the Hugging Face cache
fails at once with a :class:`~latentgeo.errors.ModelError`.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from latentgeo.ddim import NoiseFn, ddim_sample
from latentgeo.errors import InputError, ModelError, ShapeError

#: The folder of the bundled digit model inside the package.
BUNDLED_NAME = "bundled"
_BUNDLED_SUBDIR = "digits"
_META_FILE = "latentgeo.json"

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}

#: Pipeline classes that load as the ``sd`` kind (the rest are refused by name).
SD_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline",
                "StableDiffusionInpaintPipeline", "AltDiffusionPipeline")
#: Pipeline classes that load as the ``pixel`` kind.
PIXEL_PIPELINES = ("DDPMPipeline", "DDIMPipeline")


def bundled_path() -> Path:
    """Directory of the bundled digit model (a diffusers ``DDIMPipeline`` folder)."""
    return Path(str(resources.files("latentgeo") / "bundled" / _BUNDLED_SUBDIR))


def parse_device(device: str) -> torch.device:
    """'cpu', 'cuda', 'cuda:N' or 'mps' -> torch.device; ModelError when it is not available."""
    text = str(device).strip().lower()
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise ModelError(f"--device {device!r}: unknown device (use cpu, cuda, cuda:N or mps)") \
            from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelError(f"--device {device}: CUDA is not available on this machine "
                             "(torch.cuda.is_available() is False); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ModelError(f"--device {device}: only {torch.cuda.device_count()} CUDA "
                             "device(s) present")
    elif dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ModelError(f"--device {device}: Apple MPS is not available on this machine; "
                             "use --device cpu")
    elif dev.type != "cpu":
        raise ModelError(f"--device {device!r}: unsupported device type (use cpu, cuda, "
                         "cuda:N or mps)")
    return dev


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """'float32' | 'float16' | 'bfloat16' (and fp32/fp16/bf16/half) -> torch.dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).strip().lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ModelError(f"--dtype {dtype!r}: unknown dtype (use float32, float16 or bfloat16)")
    return _DTYPES[key]


def eps_from_prediction(out: torch.Tensor, x_t: torch.Tensor, a_t: float,
                        prediction_type: str) -> torch.Tensor:
    """Convert a network output to epsilon at noise level a_t = alpha-bar_t.

    x_t = sqrt(a) x0 + sqrt(1-a) eps (DDPM forward process). ``epsilon``: eps = out.
    ``v_prediction`` (Salimans & Ho 2022, v = sqrt(a) eps - sqrt(1-a) x0): eps = sqrt(a) v +
    sqrt(1-a) x_t. ``sample`` (out = x0): eps = (x_t - sqrt(a) x0) / sqrt(1-a).
    All float32 tensors of x_t's shape.
    """
    if prediction_type == "epsilon":
        return out
    if prediction_type == "v_prediction":
        return a_t ** 0.5 * out + (1.0 - a_t) ** 0.5 * x_t
    if prediction_type == "sample":
        return (x_t - a_t ** 0.5 * out) / (1.0 - a_t) ** 0.5
    raise ModelError(f"unsupported prediction_type {prediction_type!r} "
                     "(expected epsilon, v_prediction or sample)")


@dataclass
class Backend:
    """One loaded model, whatever its kind (see the module docstring).

    Seeds and latents are float32 on the CPU or ``device``; the network runs in ``dtype``.
    """

    name: str
    kind: str
    latent_shape: tuple[int, int, int]
    image_size: tuple[int, int]
    image_channels: int
    device: torch.device
    dtype: torch.dtype
    default_guidance: float
    default_steps: int
    unet: Any = field(repr=False)
    scheduler: Any = field(repr=False)
    prediction_type: str = "epsilon"
    num_classes: int = 0
    null_class: int | None = None
    vae: Any = field(default=None, repr=False)
    text_encoder: Any = field(default=None, repr=False)
    tokenizer: Any = field(default=None, repr=False)
    pipeline_class: str = ""
    _prompt_cache: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    # -- the DDIM grid ------------------------------------------------------------------------
    def timesteps(self, steps: int) -> tuple[list[int], torch.Tensor, float]:
        """Descending DDIM grid of ``steps`` timesteps (diffusers' ``DDIMScheduler`` spacing for
        this pipeline's config), ``alphas_cumprod`` (float64, cpu) and the final alpha-bar
        (1.0 with ``set_alpha_to_one``, else ``alphas_cumprod[0]``)."""
        if int(steps) < 1:
            raise InputError(f"--steps {steps}: must be at least 1")
        n_train = int(self.scheduler.config.num_train_timesteps)
        if int(steps) > n_train:
            raise InputError(f"--steps {steps}: the model was trained with {n_train} timesteps")
        self.scheduler.set_timesteps(int(steps))
        ts = [int(t) for t in self.scheduler.timesteps]
        alphas = self.scheduler.alphas_cumprod.detach().to("cpu", torch.float64)
        return ts, alphas, float(self.scheduler.final_alpha_cumprod)

    # -- conditions ---------------------------------------------------------------------------
    def check_condition(self, condition: Any) -> None:
        """Refuse conditions this kind of model cannot take (class for sd, prompt for pixel)."""
        if self.kind == "sd":
            if condition is not None and not isinstance(condition, str) and not (
                    isinstance(condition, (list, tuple))
                    and all(isinstance(c, str) for c in condition)):
                raise InputError(f"{self.name} is a text-to-image model: give --prompt, "
                                 "not --class")
            return
        if condition is None:
            return
        if isinstance(condition, str):
            raise InputError(f"{self.name} is not a text-to-image model: --prompt is not "
                             "supported (use --class for the bundled model)")
        labels = [condition] if isinstance(condition, int) else list(condition)
        if not self.num_classes:
            raise InputError(f"{self.name} is unconditional: --class is not supported")
        bad = [c for c in labels if not isinstance(c, int) or not 0 <= c < self.num_classes]
        if bad:
            raise InputError(f"--class {bad[0]}: must be in 0..{self.num_classes - 1}")

    def _labels(self, condition: Any, batch: int) -> torch.Tensor | None:
        if not self.num_classes:
            return None
        if condition is None:
            labels = [self.null_class] * batch
        elif isinstance(condition, int):
            labels = [condition] * batch
        else:
            labels = list(condition)
            if len(labels) != batch:
                raise ShapeError(f"{len(labels)} class labels for a batch of {batch} seeds")
        return torch.tensor(labels, dtype=torch.long, device=self.device)

    def _embed_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        missing = [p for p in dict.fromkeys(prompts) if p not in self._prompt_cache]
        if missing:
            tok = self.tokenizer(list(missing), padding="max_length", truncation=True,
                                 max_length=self.tokenizer.model_max_length,
                                 return_tensors="pt")
            with torch.no_grad():
                emb = self.text_encoder(tok.input_ids.to(self.device))[0]
            for p, e in zip(missing, emb):
                self._prompt_cache[p] = e.to(self.dtype)
        return torch.stack([self._prompt_cache[p] for p in prompts])

    def _prompts(self, condition: Any, batch: int) -> list[str]:
        if condition is None:
            return [""] * batch
        if isinstance(condition, str):
            return [condition] * batch
        prompts = list(condition)
        if len(prompts) != batch:
            raise ShapeError(f"{len(prompts)} prompts for a batch of {batch} seeds")
        return prompts

    # -- the noise predictor ------------------------------------------------------------------
    def noise_fn(self, condition: Any = None, guidance: float | None = None) -> NoiseFn:
        """eps_fn(x_t (B, *latent_shape) float32, t int) -> eps float32, same shape and device.

        ``condition``: class int | list[int] | None (pixel kinds; None = null class, i.e.
        unconditional) or prompt str | list[str] | None (sd; None = the empty prompt).
        Classifier-free guidance eps_u + g (eps_c - eps_u) when ``guidance`` != 1 and the
        condition is not already the unconditional one; both halves in one batched call.
        """
        self.check_condition(condition)
        g = self.default_guidance if guidance is None else float(guidance)
        alphas = self.scheduler.alphas_cumprod.detach().to("cpu", torch.float64)
        unconditional = condition is None or (self.kind != "sd" and not self.num_classes)

        def eps_fn(x_t: torch.Tensor, t: int) -> torch.Tensor:
            b = x_t.shape[0]
            x_in = x_t.to(self.device, self.dtype)
            guided = g != 1.0 and not unconditional
            if self.kind == "sd":
                cond = self._embed_prompts(self._prompts(condition, b))
                if guided:
                    cond = torch.cat([cond, self._embed_prompts([""] * b)])
                extra = {"encoder_hidden_states": cond}
            else:
                labels = self._labels(condition, b)
                if guided:
                    labels = torch.cat([labels, self._labels(None, b)])
                extra = {"class_labels": labels} if labels is not None else {}
            if guided:
                x_in = torch.cat([x_in, x_in])
            t_in = torch.full((x_in.shape[0],), int(t), device=self.device, dtype=torch.long)
            with torch.no_grad():
                out = self.unet(x_in, t_in, **extra, return_dict=False)[0]
            out = out.to(torch.float32)
            if guided:
                out_c, out_u = out.chunk(2)
                out = out_u + g * (out_c - out_u)
            x32 = x_t.to(self.device, torch.float32)
            eps = eps_from_prediction(out, x32, float(alphas[int(t)]), self.prediction_type)
            return eps.to(x_t.device)

        return eps_fn

    # -- pixels <-> latents -------------------------------------------------------------------
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, image_channels, H, W) float in [0, 1] -> x_0 latents (B, *latent_shape)
        float32. Pixel kinds: 2 img - 1. sd: the VAE posterior mean times ``scaling_factor``
        (deterministic, no sampling)."""
        expect = (self.image_channels, *self.image_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != expect:
            raise ShapeError(f"images of shape {tuple(images.shape)} do not fit {self.name}, "
                             f"which expects (B, {', '.join(map(str, expect))})")
        x = images.to(torch.float32) * 2.0 - 1.0
        if self.kind != "sd":
            return x
        with torch.no_grad():
            dist = self.vae.encode(x.to(self.device, self.dtype)).latent_dist
            z = dist.mean.to(torch.float32) * float(self.vae.config.scaling_factor)
        return z.to(images.device)

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """x_0 latents (B, *latent_shape) -> images (B, image_channels, H, W) float32 in [0, 1].
        Pixel kinds: (x + 1) / 2 clamped; sd: VAE decode of x / ``scaling_factor``."""
        if self.kind == "sd":
            with torch.no_grad():
                z = x0.to(self.device, self.dtype) / float(self.vae.config.scaling_factor)
                x0 = self.vae.decode(z, return_dict=False)[0].to(torch.float32)
        return ((x0.to(torch.float32) + 1.0) / 2.0).clamp(0.0, 1.0).to("cpu")

    def check_seeds(self, seeds: torch.Tensor) -> torch.Tensor:
        """Return seeds as (B, *latent_shape) float32; one unbatched seed is accepted.
        ShapeError naming both shapes otherwise."""
        if not isinstance(seeds, torch.Tensor) or not torch.is_floating_point(seeds):
            raise ShapeError(f"seeds must be a float tensor of shape (B, "
                             f"{', '.join(map(str, self.latent_shape))})")
        if tuple(seeds.shape) == self.latent_shape:
            seeds = seeds.unsqueeze(0)
        if seeds.ndim != 4 or tuple(seeds.shape[1:]) != self.latent_shape:
            raise ShapeError(f"seeds of shape {tuple(seeds.shape)} do not fit {self.name}, "
                             f"whose seeds have shape {self.latent_shape}")
        return seeds.to(torch.float32)


# -- rendering ----------------------------------------------------------------------------------
def render(backend: Backend, seeds: torch.Tensor, condition: Any = None, steps: int | None = None,
           guidance: float | None = None, batch_size: int = 16,
           callback: Callable[..., None] | None = None) -> torch.Tensor:
    """Seeds x_T (B, *latent_shape) float32 -> images (B, C, H, W) float32 in [0, 1], on the CPU.

    = ``backend.decode(ddim_sample(backend.noise_fn(condition, guidance), seeds,
    *backend.timesteps(steps)))``: deterministic DDIM (Song et al. 2021, Eq. 12, eta = 0).
    ``condition`` may be a list with one entry per seed. Runs in chunks of ``batch_size``;
    ``callback(i, x)`` is called after every network step of every chunk
    (ceil(B / batch_size) * steps calls). On the CPU the result is bit-for-bit reproducible.
    """
    seeds = backend.check_seeds(seeds)
    steps = backend.default_steps if steps is None else int(steps)
    grid = backend.timesteps(steps)
    backend.check_condition(condition)
    per_seed = isinstance(condition, (list, tuple))
    if per_seed and len(condition) != seeds.shape[0]:
        raise ShapeError(f"{len(condition)} conditions for {seeds.shape[0]} seeds")
    if batch_size < 1:
        raise InputError(f"batch size {batch_size}: must be at least 1")
    out = []
    for start in range(0, seeds.shape[0], batch_size):
        chunk = seeds[start:start + batch_size].to(backend.device)
        cond = list(condition[start:start + batch_size]) if per_seed else condition
        x0 = ddim_sample(backend.noise_fn(cond, guidance), chunk, grid[1], grid[0], grid[2],
                         callback)
        out.append(backend.decode(x0))
    return torch.cat(out)


# -- loading ------------------------------------------------------------------------------------
def load_model(spec: str = BUNDLED_NAME, device: str = "cpu", dtype: str = "float32") -> Backend:
    """Load ``spec`` ('bundled', a local pipeline folder, or a cached Hugging Face id).

    Never downloads: ``HF_HUB_OFFLINE=1`` is set unless already set, and every
    ``from_pretrained`` gets ``local_files_only=True``. Raises ModelError with one clear line
    for unknown ids/paths, unsupported pipeline classes, or an unavailable device.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    dev = parse_device(device)
    dt = parse_dtype(dtype)
    spec = str(spec).strip() or BUNDLED_NAME
    if spec == BUNDLED_NAME:
        path = bundled_path()
        if not (path / _META_FILE).is_file():
            raise ModelError(f"the bundled model is missing from this installation ({path})")
        return _load_pixel(path, BUNDLED_NAME, dev, dt)
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelError(f"--model {spec}: is a file; expected a diffusers pipeline folder "
                             "(with model_index.json) or a model id")
        if (path / _META_FILE).is_file():
            return _load_pixel(path, spec, dev, dt)
        if not (path / "model_index.json").is_file():
            raise ModelError(f"--model {spec}: folder has no model_index.json; not a diffusers "
                             "pipeline folder")
        _check_class(_read_json(path / "model_index.json", spec).get("_class_name"), spec)
    return _load_pipeline(spec, dev, dt)


def _read_json(path: Path, spec: str) -> dict:
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"--model {spec}: unreadable {path.name} ({e})") from None
    if not isinstance(obj, dict):
        raise ModelError(f"--model {spec}: {path.name} is not a JSON object")
    return obj


def _check_class(class_name: Any, spec: str) -> None:
    if class_name is None or class_name in SD_PIPELINES + PIXEL_PIPELINES:
        return
    raise ModelError(f"--model {spec}: pipeline class {class_name} is not supported (supported: "
                     f"{', '.join(SD_PIPELINES + PIXEL_PIPELINES)})")


def _quiet_diffusers() -> None:
    import diffusers
    from diffusers.utils import logging as dlog

    dlog.set_verbosity_error()
    dlog.disable_progress_bar()
    del diffusers
    try:
        from transformers.utils import logging as tlog

        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
    except ImportError:  # transformers is optional (only SD pipelines need it)
        pass


def _ddim_from(scheduler_config: Any) -> Any:
    from diffusers import DDIMScheduler

    config = dict(scheduler_config)
    # DDIM's own clip_sample would clip x0 inside scheduler.step; our sampler never calls step,
    # but keep the config honest for anyone who does.
    return DDIMScheduler.from_config(config)


def _load_pixel(path: Path, name: str, dev: torch.device, dt: torch.dtype) -> Backend:
    """A pixel-space UNet2DModel folder with latentgeo.json (the bundled format)."""
    _quiet_diffusers()
    from diffusers import DDIMScheduler, UNet2DModel

    meta = _read_json(path / _META_FILE, name)
    try:
        unet = UNet2DModel.from_pretrained(path / "unet", local_files_only=True)
        scheduler = DDIMScheduler.from_pretrained(path / "scheduler", local_files_only=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelError(f"--model {name}: cannot load the model folder {path} "
                         f"({_first_line(e)})") from None
    return _pixel_backend(unet, _ddim_from(scheduler.config), name, dev, dt, meta, "bundled")


def _pixel_backend(unet: Any, scheduler: Any, name: str, dev: torch.device, dt: torch.dtype,
                   meta: dict, kind: str) -> Backend:
    unet = unet.to(dev, dt).eval()
    unet.requires_grad_(False)
    size = unet.config.sample_size
    hw = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
    num_classes = int(meta.get("num_classes") or 0)
    null_class = meta.get("null_class")
    embeds = unet.config.num_class_embeds
    if num_classes and (embeds is None or null_class is None or int(null_class) >= int(embeds)):
        raise ModelError(f"--model {name}: latentgeo.json declares {num_classes} classes, "
                         f"null class {null_class}, but the UNet has num_class_embeds={embeds}")
    channels = int(unet.config.in_channels)
    return Backend(
        name=name, kind=kind, latent_shape=(channels, *hw), image_size=hw,
        image_channels=channels, device=dev, dtype=dt,
        default_guidance=float(meta.get("guidance", 1.0)),
        default_steps=int(meta.get("steps", 50)), unet=unet, scheduler=scheduler,
        prediction_type=str(scheduler.config.prediction_type), num_classes=num_classes,
        null_class=int(null_class) if num_classes else None,
        pipeline_class=str(meta.get("pipeline_class", "DDIMPipeline")))


def _load_pipeline(spec: str, dev: torch.device, dt: torch.dtype) -> Backend:
    _quiet_diffusers()
    from diffusers import DiffusionPipeline

    try:
        with warnings.catch_warnings():  # newer diffusers renamed torch_dtype to dtype
            warnings.simplefilter("ignore", FutureWarning)
            pipe = DiffusionPipeline.from_pretrained(spec, local_files_only=True, torch_dtype=dt)
    except ImportError as e:
        raise ModelError(f"--model {spec}: a library the pipeline needs is missing "
                         f"({_first_line(e)}); install latentgeo[sd]") from None
    except (OSError, ValueError) as e:
        where = "local folder" if Path(spec).exists() else "Hugging Face cache"
        raise ModelError(f"--model {spec}: not found or not loadable from the {where} "
                         f"(latentgeo never downloads; fetch it first with "
                         f"`hf download {spec}`) [{_first_line(e)}]") from None
    cls = type(pipe).__name__
    _check_class(cls, spec)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    unet = getattr(pipe, "unet", None)
    from diffusers import AutoencoderKL, UNet2DConditionModel, UNet2DModel

    scheduler = _ddim_from(pipe.scheduler.config)
    if isinstance(unet, UNet2DModel):
        return _pixel_backend(unet, scheduler, spec, dev, dt, {}, "pixel")
    vae = getattr(pipe, "vae", None)
    if not (isinstance(unet, UNet2DConditionModel) and isinstance(vae, AutoencoderKL)
            and getattr(pipe, "text_encoder", None) is not None
            and getattr(pipe, "tokenizer", None) is not None):
        raise ModelError(f"--model {spec}: pipeline class {cls} is not supported (need a "
                         "UNet2DConditionModel, an AutoencoderKL and a CLIP text encoder)")
    for m in (unet, vae, pipe.text_encoder):
        m.to(dev, dt).eval()
        m.requires_grad_(False)
    size = unet.config.sample_size
    hw = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    return Backend(
        name=spec, kind="sd", latent_shape=(int(unet.config.in_channels), *hw),
        image_size=(hw[0] * scale, hw[1] * scale), image_channels=int(vae.config.in_channels),
        device=dev, dtype=dt, default_guidance=7.5, default_steps=50, unet=unet,
        scheduler=scheduler, prediction_type=str(scheduler.config.prediction_type),
        vae=vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, pipeline_class=cls)


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    text = lines[0] if lines else type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def num_batches(n: int, batch_size: int) -> int:
    """ceil(n / batch_size): the number of chunks :func:`render` runs."""
    return math.ceil(n / batch_size)
