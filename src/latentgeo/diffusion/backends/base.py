"""The backend protocol: what every model family gives the sampler, the inversion and the CLI.

A backend is one loaded model behind five things (k-diffusion's ``external.py`` idea: a family
is a small adapter, not a branch in shared code):

* ``latent_shape`` — the seed's shape (C, H, W), always the *unpacked* spatial layout (FLUX
  packs 2x2 patches inside its adapter, so files and ``stats`` see (C, H, W));
* ``grid(steps)`` — the :class:`~latentgeo.diffusion.grid.Grid` its pipeline samples on;
* ``model_fn(condition, guidance)`` — model(x, t) -> the network's raw output, classifier-free
  guidance applied (Ho & Salimans 2022: out_u + g (out_c - out_u), both halves in one call);
* ``encode(images)`` / ``decode(x0)`` — images in [0, 1] <-> clean latents.

Latents and seeds are float32 (float64 when a caller passes float64, e.g. reference tests);
the network runs in ``dtype``. Nothing here disables autograd: ``decode`` and the model function
differentiate when the caller records gradients (seed optimisation); the render and inversion
helpers wrap ``torch.no_grad`` themselves.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from latentgeo.diffusion.grid import Grid
from latentgeo.diffusion.sampler import ModelFn
from latentgeo.errors import InputError, ModelError, ShapeError

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float64": torch.float64, "fp64": torch.float64, "double": torch.float64,
}


def parse_device(device: str | torch.device) -> torch.device:
    """'cpu', 'cuda', 'cuda:N' or 'mps' -> torch.device; ModelError when it is not available."""
    text = str(device).strip().lower()
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise ModelError(f"device {device!r} is unknown (use cpu, cuda, cuda:N or mps)") \
            from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelError(f"device {device}: CUDA is not available on this machine "
                             "(torch.cuda.is_available() is False)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ModelError(f"device {device}: only {torch.cuda.device_count()} CUDA "
                             "device(s) present")
    elif dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ModelError(f"device {device}: Apple MPS is not available on this machine")
    elif dev.type != "cpu":
        raise ModelError(f"device {device!r} is not supported (use cpu, cuda, cuda:N or mps)")
    return dev


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """'float32' | 'float16' | 'bfloat16' | 'float64' (and short names) -> torch.dtype."""
    if isinstance(dtype, torch.dtype):
        if dtype in _DTYPES.values():
            return dtype
        raise ModelError(f"dtype {dtype} is not supported (use float32, float16 or bfloat16)")
    key = str(dtype).strip().lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ModelError(f"dtype {dtype!r} is unknown (use float32, float16 or bfloat16)")
    return _DTYPES[key]


#: Largest ``sample_size`` side a config may declare (pixels or latent cells): far above any
#: real model (SDXL latents: 128), small enough that a malformed config cannot claim terabytes.
MAX_SAMPLE_SIDE = 16384


def hw_of(size: Any, name: str) -> tuple[int, int]:
    """A config's ``sample_size`` (int or [h, w]) as (h, w) positive ints."""
    try:
        hw = (int(size), int(size)) if isinstance(size, (int, float)) else \
            (int(size[0]), int(size[1]))
    except (TypeError, ValueError, IndexError):
        raise ModelError(f"{name}: sample_size {size!r} in its config is not a size") from None
    if min(hw) < 1 or max(hw) > MAX_SAMPLE_SIDE:
        raise ModelError(f"{name}: sample_size {size!r} in its config is not a size (1 to "
                         f"{MAX_SAMPLE_SIDE} per side)")
    return hw


def pick_image_size(height: int | None, width: int | None, default: tuple[int, int],
                    multiple: int, name: str, why: str) -> tuple[int, int]:
    """(height, width) in pixels for a family whose sizes must be multiples of ``multiple``
    (``why`` says which constraint that is); a missing value takes ``default``'s, as the
    family's pipeline does (``height = height or default``). InputError naming the value."""
    out = []
    for label, value, fallback in (("height", height, default[0]), ("width", width, default[1])):
        v = fallback if value is None else value
        try:
            ok = not isinstance(v, bool) and int(v) == v and int(v) >= 1 and int(v) % multiple == 0
        except (TypeError, ValueError, OverflowError):
            ok = False
        if not ok:
            raise InputError(f"{label} {v}: {name} needs a positive multiple of {multiple} "
                             f"({why})")
        out.append(int(v))
    return out[0], out[1]


def place(module: Any, device: torch.device, dtype: torch.dtype, offload: bool = False) -> Any:
    """Move a network to ``device`` in ``dtype``; with ``offload`` it stays on the CPU in
    ``dtype`` (model CPU offload moves it to the device while it runs)."""
    if module is None:
        return None
    return module.to(dtype) if offload else module.to(device, dtype)


def freeze(*modules: Any) -> None:
    """Evaluation mode, no parameter gradients (seeds are what gets optimised)."""
    for m in modules:
        if m is not None:
            m.eval()
            m.requires_grad_(False)


def weights_fingerprint(*modules: Any) -> str:
    """A short hex fingerprint of networks: class, config and, per parameter, its name, shape,
    dtype and 16 values spread over it. Tells two trainings apart without hashing gigabytes.

    The config's private keys (``_name_or_path``, ``_diffusers_version``, ...) are left out:
    they say where and with what the weights were loaded, not what they are, so a model moved
    or installed elsewhere keeps its fingerprint."""
    h = hashlib.sha256()
    for m in modules:
        if m is None:
            continue
        h.update(type(m).__name__.encode())
        config = getattr(m, "config", None)
        if config is not None:
            cfg = dict(config) if not hasattr(config, "to_dict") else config.to_dict()
            cfg = {k: v for k, v in cfg.items() if not str(k).startswith("_")}
            h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
        for name, p in m.state_dict().items():
            flat = p.detach().reshape(-1)
            idx = torch.linspace(0, max(flat.numel() - 1, 0), 16).round().long()
            sample = flat[idx].to("cpu", torch.float64) if flat.numel() else flat.cpu()
            h.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
            h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def cfg_combine(out: torch.Tensor, guidance: float) -> torch.Tensor:
    """Classifier-free guidance on a batched [conditional; unconditional] output (2B, ...):
    out_u + g (out_c - out_u) (Ho & Salimans 2022, Eq. 6), in out's dtype."""
    out_c, out_u = out.chunk(2)
    return out_u + guidance * (out_c - out_u)


@dataclass
class Backend:
    """Fields every family shares; subclasses implement ``grid``, ``model_fn``, ``encode``,
    ``decode``, ``check_condition`` and ``fingerprint`` (module docstring).

    name: the spec it was loaded from. family: 'pixel', 'sd', 'sdxl', 'sd3' or 'flux'.
    conditioning: 'class' (num_classes labels + a null class), 'text' or 'none'.
    """

    name: str
    family: str
    latent_shape: tuple[int, ...]
    image_size: tuple[int, int]
    image_channels: int
    device: torch.device
    dtype: torch.dtype
    default_guidance: float
    default_steps: int
    conditioning: str = "none"
    num_classes: int = 0
    null_class: int | None = None
    pipeline_class: str = ""
    _fingerprint: str | None = field(default=None, repr=False)
    #: Soft tokens every network call applies, both guidance branches (latentgeo.align).
    soft_tokens: Any = field(default=None, repr=False)

    # -- to implement -------------------------------------------------------------------------
    def grid(self, steps: int) -> Grid:  # pragma: no cover - abstract
        raise NotImplementedError

    def model_fn(self, condition: Any = None, guidance: float | None = None) -> ModelFn:
        raise NotImplementedError  # pragma: no cover - abstract

    def encode(self, images: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def decode(self, x0: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def networks(self) -> Sequence[Any]:  # pragma: no cover - abstract
        """The modules whose weights define the model (for ``fingerprint``)."""
        raise NotImplementedError

    # -- shared -------------------------------------------------------------------------------
    @property
    def kind(self) -> str:
        """Short family name (kept for files written by the first release)."""
        return self.family

    def fingerprint(self) -> str:
        """16 hex digits identifying the weights (:func:`weights_fingerprint`), cached."""
        if self._fingerprint is None:
            self._fingerprint = weights_fingerprint(*self.networks())
        return self._fingerprint

    def token_scope(self, network: Any, t: torch.Tensor) -> Any:
        """Context for one network call at per-row times ``t`` (B,): ``soft_tokens`` hooked
        into ``network`` (:meth:`latentgeo.align.tokens.SoftTokens.applied`), or nothing."""
        if self.soft_tokens is None:
            return contextlib.nullcontext()
        return self.soft_tokens.applied(network, t)

    def check_steps(self, steps: int, limit: int) -> int:
        """Steps as a positive int no larger than ``limit`` (the training timesteps)."""
        if isinstance(steps, bool) or int(steps) != steps or int(steps) < 1:
            raise InputError(f"steps {steps}: must be a whole number >= 1")
        if int(steps) > limit:
            raise InputError(f"steps {steps}: {self.name} supports at most {limit}")
        return int(steps)

    def guidance_or_default(self, guidance: float | None) -> float:
        g = self.default_guidance if guidance is None else float(guidance)
        if not torch.isfinite(torch.tensor(g)):
            raise InputError(f"guidance {guidance}: must be a finite number")
        return g

    def check_condition(self, condition: Any) -> None:
        """Refuse conditions this model cannot take (a class for a text model, a prompt for a
        class model, anything for an unconditional one)."""
        if condition is None:
            return
        items = list(condition) if isinstance(condition, (list, tuple)) else [condition]
        if self.conditioning == "text":
            if not all(isinstance(c, str) for c in items):
                raise InputError(f"{self.name} is a text-to-image model: it takes a prompt, "
                                 "not a class")
            return
        if any(isinstance(c, str) for c in items):
            raise InputError(f"{self.name} is not a text-to-image model: it takes no prompt")
        if self.conditioning != "class":
            raise InputError(f"{self.name} is unconditional: it takes no class")
        bad = [c for c in items if isinstance(c, bool) or not isinstance(c, int)
               or not 0 <= c < self.num_classes]
        if bad:
            raise InputError(f"class {bad[0]}: must be in 0..{self.num_classes - 1}")

    def is_unconditional(self, condition: Any) -> bool:
        """True when ``condition`` asks for the unconditional model (guidance has no effect)."""
        return condition is None or self.conditioning == "none"

    def effective_guidance(self, condition: Any, guidance: float | None) -> float:
        """The guidance scale a render with this condition actually applies (1 when there is
        nothing to guide towards)."""
        return 1.0 if self.is_unconditional(condition) else self.guidance_or_default(guidance)

    def check_seeds(self, seeds: torch.Tensor) -> torch.Tensor:
        """Seeds as (B, *latent_shape) floats (float64 kept, else float32); one unbatched seed
        is accepted. ShapeError naming both shapes otherwise."""
        shape = tuple(self.latent_shape)
        if not isinstance(seeds, torch.Tensor) or not torch.is_floating_point(seeds):
            raise ShapeError(f"seeds must be a float tensor of shape (B, "
                             f"{', '.join(map(str, shape))})")
        if tuple(seeds.shape) == shape:
            seeds = seeds.unsqueeze(0)
        if seeds.ndim != len(shape) + 1 or tuple(seeds.shape[1:]) != shape:
            raise ShapeError(f"seeds of shape {tuple(seeds.shape)} do not fit {self.name}, "
                             f"whose seeds have shape {shape}")
        return seeds if seeds.dtype == torch.float64 else seeds.to(torch.float32)

    def check_images(self, images: torch.Tensor) -> None:
        expect = (self.image_channels, *self.image_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != expect:
            raise ShapeError(f"images of shape {tuple(images.shape)} do not fit {self.name}, "
                             f"which expects (B, {', '.join(map(str, expect))})")

    def per_row(self, condition: Any, batch: int) -> list[Any]:
        """One condition per row: a list is checked against the batch, a single value (or None)
        repeated."""
        if isinstance(condition, (list, tuple)):
            if len(condition) != batch:
                raise ShapeError(f"{len(condition)} conditions for a batch of {batch}")
            return list(condition)
        return [condition] * batch


def to_unit_images(x: torch.Tensor) -> torch.Tensor:
    """Model-range images in [-1, 1] -> float32 in [0, 1] (diffusers' ``denormalize``:
    (x / 2 + 0.5).clamp(0, 1)); float64 stays float64 (float64 gradient checks)."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return (x.to(dtype) / 2.0 + 0.5).clamp(0.0, 1.0)


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] -> [-1, 1] float32 (diffusers' ``normalize``: 2 x - 1)."""
    return images.to(torch.float32) * 2.0 - 1.0
