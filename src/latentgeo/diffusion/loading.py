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
import importlib.util
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
    "StableDiffusionXLPipeline": ("sdxl", "sdxl_backend"),
    "StableDiffusion3Pipeline": ("sd3", "sd3_backend"),
    "FluxPipeline": ("flux", "flux_backend"),
}

#: Pipeline classes refused with a reason rather than "unsupported".
REFUSED: dict[str, str] = {
    "StableDiffusionInpaintPipeline": "inpainting UNets take 9 input channels (image and mask), "
                                      "not a seed alone",
    "StableDiffusionXLInpaintPipeline": "inpainting UNets take 9 input channels (image and "
                                        "mask), not a seed alone",
    "StableDiffusionXLImg2ImgPipeline": "the SDXL refiner denoises from an image, not from a "
                                        "seed (use the SDXL base model)",
    "StableDiffusion3InpaintPipeline": "inpainting takes an image and a mask, not a seed alone",
    "FluxFillPipeline": "FLUX.1 Fill takes an image and a mask packed beside the seed (384 "
                        "input channels), not a seed alone",
    "FluxInpaintPipeline": "inpainting takes an image and a mask, not a seed alone",
    "FluxControlPipeline": "FLUX.1 Canny/Depth take a control image packed beside the seed, "
                           "not a seed alone",
    "FluxKontextPipeline": "FLUX.1 Kontext edits an input image, not a seed alone",
}


def register_family(pipeline_class: str, module: str, constructor: str) -> None:
    """Map a diffusers pipeline class name to ``latentgeo.diffusion.backends.MODULE.CONSTRUCTOR``
    (called as ``constructor(pipe, name, device, dtype, height=, width=, offload=)``)."""
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
               dtype: str | torch.dtype = "float32", height: int | None = None,
               width: int | None = None, offload: bool = False) -> Backend:
    """Load ``spec`` (module docstring) as a :class:`~latentgeo.diffusion.backends.base.Backend`
    on ``device`` with the networks in ``dtype``.

    height, width: image size in pixels (None: the pipeline's default, ``sample_size`` times
    the VAE's scale factor; FLUX: 128 times it). Each family checks its multiple (SD, SDXL: 8;
    SD3, FLUX: 16); pixel models render only at their trained size.
    offload: keep the networks on the CPU and move each to ``device`` only while it runs
    (diffusers' model CPU offload; needs the ``accelerate`` package and a GPU device).

    Raises ModelError with one line for unknown ids/paths, unsupported pipeline classes,
    malformed folders or an unavailable device; InputError for a size the family refuses."""
    dev = parse_device(device)
    dt = parse_dtype(dtype)
    spec = str(spec).strip() or BUNDLED_NAME
    if offload:
        check_offload(spec, dev)
    if spec in BUNDLED:
        path = bundled_path(spec)
        if not (path / META_FILE).is_file():
            raise ModelError(f"{spec}: the bundled model is missing from this installation "
                             f"({path})")
        return load_bundled_format(path, spec, dev, dt, height, width, offload)
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelError(f"{spec}: is a file; expected a diffusers pipeline folder (with "
                             "model_index.json) or a model id")
        if (path / META_FILE).is_file():
            return load_bundled_format(path, spec, dev, dt, height, width, offload)
        if not (path / "model_index.json").is_file():
            raise ModelError(f"{spec}: folder has no model_index.json; not a diffusers "
                             "pipeline folder")
        check_pipeline_class(read_json(path / "model_index.json", spec).get("_class_name"),
                             spec)
    return load_pipeline(spec, dev, dt, height, width, offload)


def accelerate_available() -> bool:
    """Whether the ``accelerate`` package (diffusers' CPU offload hooks) is installed."""
    return importlib.util.find_spec("accelerate") is not None


def check_offload(spec: str, dev: torch.device) -> None:
    """Refuse CPU offload where it cannot work, before any weights load."""
    if not accelerate_available():
        raise ModelError(f"{spec}: CPU offload needs the accelerate package, which is not "
                         "installed (pip install accelerate)")
    if dev.type == "cpu":
        raise ModelError(f"{spec}: CPU offload moves each network to an accelerator while it "
                         "runs; device cpu has none (use cuda or mps)")


def enable_offload(pipe: Any, spec: str, dev: torch.device) -> None:
    """diffusers' model CPU offload (accelerate hooks): each network moves to ``dev`` when it
    runs and back to the CPU when the next one starts."""
    try:
        pipe.enable_model_cpu_offload(device=dev)
    except (ImportError, ValueError, RuntimeError) as e:
        raise ModelError(f"{spec}: CPU offload failed ({first_line(e)})") from None


def check_pipeline_class(class_name: Any, spec: str) -> None:
    """Refuse a pipeline class before loading its weights."""
    if not isinstance(class_name, str) or not class_name:
        raise ModelError(f"{spec}: model_index.json names no pipeline class (_class_name)")
    if class_name in REFUSED:
        raise ModelError(f"{spec}: {class_name} is not supported: {REFUSED[class_name]}")
    if class_name not in FAMILIES:
        raise ModelError(f"{spec}: pipeline class {class_name} is not supported (supported: "
                         f"{', '.join(sorted(FAMILIES))})")


def load_bundled_format(path: Path, name: str, dev: torch.device, dt: torch.dtype,
                        height: int | None = None, width: int | None = None,
                        offload: bool = False) -> Backend:
    """A folder with ``unet/``, ``scheduler/`` and ``latentgeo.json`` (the bundled format)."""
    if offload:
        raise ModelError(f"{name}: CPU offload is for large multi-network pipelines; this "
                         "model is one small UNet")
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
                         str(meta.get("pipeline_class", "latentgeo")), height=height,
                         width=width)


def load_pipeline(spec: str, dev: torch.device, dt: torch.dtype, height: int | None = None,
                  width: int | None = None, offload: bool = False) -> Backend:
    """``DiffusionPipeline.from_pretrained(spec, local_files_only=True)`` -> its family
    (sizes and offload as :func:`load_model`)."""
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
    backend = build(pipe, spec, dev, dt, height=height, width=width, offload=offload)
    if offload:
        enable_offload(pipe, spec, dev)
    return backend
