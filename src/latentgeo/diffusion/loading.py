"""``load_model``: a model spec -> the family adapter that fits it, offline only.

Specs: ``bundled`` (the DDPM digit model shipped in the package), ``bundled-flow`` (its
rectified-flow twin), a local folder (a diffusers pipeline folder with ``model_index.json``, or
a folder in the bundled format with ``latentgeo.json``), or a Hugging Face id already in the
local cache. The pipeline class in ``model_index.json`` picks the family (:data:`FAMILIES`);
classes no family supports are refused by name before any weights load.

Nothing here downloads: every ``from_pretrained`` gets ``local_files_only=True`` (the process
environment is left alone), so an id that is not cached fails at once with one line.
"""

from __future__ import annotations

import importlib
import json
import warnings
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from latentgeo.diffusion.backends.base import Backend, parse_device, parse_dtype
from latentgeo.errors import ModelError

BUNDLED_NAME = "bundled"
BUNDLED_FLOW_NAME = "bundled-flow"
#: Bundled model names -> their folder under ``latentgeo/bundled``.
BUNDLED: dict[str, str] = {BUNDLED_NAME: "digits", BUNDLED_FLOW_NAME: "digits-flow"}
META_FILE = "latentgeo.json"

#: Pipeline class -> (module under latentgeo.diffusion.backends, constructor name).
FAMILIES: dict[str, tuple[str, str]] = {
    "DDPMPipeline": ("pixel", "pixel_backend_from_pipeline"),
    "DDIMPipeline": ("pixel", "pixel_backend_from_pipeline"),
    "StableDiffusionPipeline": ("sd", "sd_backend"),
    "StableDiffusionImg2ImgPipeline": ("sd", "sd_backend"),
    "AltDiffusionPipeline": ("sd", "sd_backend"),
}

#: Pipeline classes refused with a reason rather than "unsupported".
REFUSED: dict[str, str] = {
    "StableDiffusionInpaintPipeline": "inpainting UNets take 9 input channels (image and mask), "
                                      "not a seed alone",
    "StableDiffusionXLInpaintPipeline": "inpainting UNets take 9 input channels (image and "
                                        "mask), not a seed alone",
    "StableDiffusionXLImg2ImgPipeline": "the SDXL refiner denoises from an image, not from a "
                                        "seed (use the SDXL base model)",
}


def register_family(pipeline_class: str, module: str, constructor: str) -> None:
    """Map a diffusers pipeline class name to ``latentgeo.diffusion.backends.MODULE.CONSTRUCTOR``
    (called as ``constructor(pipe, name, device, dtype)``)."""
    FAMILIES[pipeline_class] = (module, constructor)


def bundled_path(name: str = BUNDLED_NAME) -> Path:
    """Folder of a bundled model inside the installed package."""
    return Path(str(resources.files("latentgeo") / "bundled" / BUNDLED[name]))


def read_json(path: Path, name: str) -> dict:
    """A JSON object from ``path``; ModelError naming the file otherwise."""
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise ModelError(f"{name}: unreadable {path.name} ({first_line(e)})") from None
    if not isinstance(obj, dict):
        raise ModelError(f"{name}: {path.name} is not a JSON object")
    return obj


def first_line(e: BaseException) -> str:
    """The first non-empty line of an exception message, at most 200 characters."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    text = lines[0] if lines else type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def quiet_libraries() -> None:
    """Silence diffusers' and transformers' loggers and progress bars (ours is Rich)."""
    from diffusers.utils import logging as dlog

    dlog.set_verbosity_error()
    dlog.disable_progress_bar()
    try:
        from transformers.utils import logging as tlog

        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
    except ImportError:  # transformers is only needed by text-to-image pipelines
        pass


def load_model(spec: str = BUNDLED_NAME, device: str | torch.device = "cpu",
               dtype: str | torch.dtype = "float32") -> Backend:
    """Load ``spec`` (module docstring) as a :class:`~latentgeo.diffusion.backends.base.Backend`
    on ``device`` with the networks in ``dtype``. Raises ModelError with one line for unknown
    ids/paths, unsupported pipeline classes, malformed folders or an unavailable device."""
    dev = parse_device(device)
    dt = parse_dtype(dtype)
    spec = str(spec).strip() or BUNDLED_NAME
    if spec in BUNDLED:
        path = bundled_path(spec)
        if not (path / META_FILE).is_file():
            raise ModelError(f"{spec}: the bundled model is missing from this installation "
                             f"({path})")
        return load_bundled_format(path, spec, dev, dt)
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelError(f"{spec}: is a file; expected a diffusers pipeline folder (with "
                             "model_index.json) or a model id")
        if (path / META_FILE).is_file():
            return load_bundled_format(path, spec, dev, dt)
        if not (path / "model_index.json").is_file():
            raise ModelError(f"{spec}: folder has no model_index.json; not a diffusers "
                             "pipeline folder")
        check_pipeline_class(read_json(path / "model_index.json", spec).get("_class_name"),
                             spec)
    return load_pipeline(spec, dev, dt)


def check_pipeline_class(class_name: Any, spec: str) -> None:
    """Refuse a pipeline class before loading its weights."""
    if not isinstance(class_name, str) or not class_name:
        raise ModelError(f"{spec}: model_index.json names no pipeline class (_class_name)")
    if class_name in REFUSED:
        raise ModelError(f"{spec}: {class_name} is not supported: {REFUSED[class_name]}")
    if class_name not in FAMILIES:
        raise ModelError(f"{spec}: pipeline class {class_name} is not supported (supported: "
                         f"{', '.join(sorted(FAMILIES))})")


def load_bundled_format(path: Path, name: str, dev: torch.device, dt: torch.dtype) -> Backend:
    """A folder with ``unet/``, ``scheduler/`` and ``latentgeo.json`` (the bundled format)."""
    quiet_libraries()
    import diffusers
    from diffusers import UNet2DModel

    from latentgeo.diffusion.backends.pixel import pixel_backend

    meta = read_json(path / META_FILE, name)
    sched_cfg = read_json(path / "scheduler" / "scheduler_config.json", name) \
        if (path / "scheduler" / "scheduler_config.json").is_file() else {}
    sched_cls = getattr(diffusers, str(sched_cfg.get("_class_name", "")), None)
    if sched_cls is None:
        raise ModelError(f"{name}: scheduler/scheduler_config.json names no diffusers "
                         "scheduler class")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            unet = UNet2DModel.from_pretrained(path / "unet", local_files_only=True)
            scheduler = sched_cls.from_pretrained(path / "scheduler", local_files_only=True)
    except (OSError, ValueError, RuntimeError, TypeError, KeyError) as e:
        raise ModelError(f"{name}: cannot load the model folder {path} ({first_line(e)})") \
            from None
    return pixel_backend(unet, scheduler, name, dev, dt, meta,
                         str(meta.get("pipeline_class", "latentgeo")))


def load_pipeline(spec: str, dev: torch.device, dt: torch.dtype) -> Backend:
    """``DiffusionPipeline.from_pretrained(spec, local_files_only=True)`` -> its family."""
    quiet_libraries()
    from diffusers import DiffusionPipeline

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pipe = DiffusionPipeline.from_pretrained(spec, local_files_only=True,
                                                     torch_dtype=dt)
    except ImportError as e:
        raise ModelError(f"{spec}: a library the pipeline needs is missing "
                         f"({first_line(e)}); install latentgeo[sd]") from None
    except (OSError, ValueError, TypeError, KeyError, RuntimeError) as e:
        where = "local folder" if Path(spec).exists() else "Hugging Face cache"
        raise ModelError(f"{spec}: not found or not loadable from the {where} (latentgeo "
                         f"never downloads; fetch it first with `hf download {spec}`) "
                         f"[{first_line(e)}]") from None
    cls = type(pipe).__name__
    check_pipeline_class(cls, spec)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    module, constructor = FAMILIES[cls]
    build = getattr(importlib.import_module(f"latentgeo.diffusion.backends.{module}"),
                    constructor)
    return build(pipe, spec, dev, dt)
